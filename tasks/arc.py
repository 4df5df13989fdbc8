"""
ARC (AI2 Reasoning Challenge): grade-school science multiple-choice questions, CC BY-SA 4.0.
Hugging Face: allenai/ai2_arc, files ARC-Easy/<split>-00000-of-00001.parquet and
ARC-Challenge/<split>-00000-of-00001.parquet, rows {"question", "choices": {"text", "label"},
"answerKey"}. Offline: data_path= a jsonl with {"question", "choices": [str], "answer": int,
"answer_letter"?} per line, e.g. shared/data/eval/arc_easy.jsonl / arc_challenge.jsonl.
"""
from tasks.common import (MultipleChoiceTask, RecordError, data_paths_or_download, check_multiple_choice,
                          multiple_choice_conversation)

HF_REPO = "allenai/ai2_arc"
ARC_VARIANTS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}
ARC_SPLITS = ("train", "validation", "test")


def arc_conversation(record):
    choices, answer = record.get("choices"), record.get("answer")
    if isinstance(choices, dict):  # Hugging Face layout: parallel text/label lists + answerKey
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise RecordError("choices", "expected {'text': [...], 'label': [...]} of equal length")
        if record.get("answerKey") not in labels:
            raise RecordError("answerKey", f"{record.get('answerKey')!r} is not one of the labels {labels}")
        choices, answer = texts, labels.index(record["answerKey"])
    question, choices, answer = check_multiple_choice(record.get("question"), choices, answer,
                                                      record.get("answer_letter"))
    return multiple_choice_conversation(question, choices, answer)


class ARC(MultipleChoiceTask):
    def __init__(self, variant="easy", split="test", data_path=None, skip_bad=None, **slice_kwargs):
        if variant not in ARC_VARIANTS or split not in ARC_SPLITS:
            raise ValueError(f"ARC needs variant in {tuple(ARC_VARIANTS)} and split in {ARC_SPLITS}, "
                             f"got {variant!r}, {split!r}")
        hf_files = [f"{ARC_VARIANTS[variant]}/{split}-00000-of-00001.parquet"]
        paths, skip_bad = data_paths_or_download(data_path, HF_REPO, hf_files, skip_bad)
        super().__init__(paths, arc_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.variant, self.split = variant, split
