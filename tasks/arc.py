"""ARC (AI2 Reasoning Challenge): grade-school science multiple-choice questions, CC BY-SA 4.0, from
allenai/ai2_arc. Offline, a jsonl of {"question", "choices": [str], "answer": int, "answer_letter"?}:
    ARC("easy", "test", data_path=f"{DATA}/eval/arc_easy.jsonl")   # or arc_challenge.jsonl"""
from tasks.common import MultipleChoiceTask, RecordError, multiple_choice_conversation

HF_REPO = "allenai/ai2_arc"
# a spec's variant word -> its folder in allenai/ai2_arc
ARC_VARIANTS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}
ARC_SPLITS = ("train", "validation", "test")

def arc_conversation(record):
    # a local record has the choices as a list and the answer as an index already
    choices, answer = record.get("choices"), record.get("answer")
    # Hugging Face's rows: {"choices": {"text": [...], "label": [...]}, "answerKey": one of the labels}
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise RecordError("choices", "expected {'text': [...], 'label': [...]} of equal length")
        if record.get("answerKey") not in labels:
            raise RecordError("answerKey", f"{record.get('answerKey')!r} is not one of the labels {labels}")
        # the labels may be "1".."4" instead of "A".."D": we re-letter the choices A, B, ...
        choices, answer = texts, labels.index(record["answerKey"])
    return multiple_choice_conversation(record.get("question"), choices, answer, record.get("answer_letter"))

class ARC(MultipleChoiceTask):
    def __init__(self, variant="easy", split="test", data_path=None, skip_bad=None, **slice_kwargs):
        if variant not in ARC_VARIANTS:
            raise ValueError(f"ARC variant must be one of {tuple(ARC_VARIANTS)}, got {variant!r}")
        hf_files = {name: [f"{ARC_VARIANTS[variant]}/{name}-00000-of-00001.parquet"] for name in ARC_SPLITS}
        super().__init__(split, data_path, HF_REPO, hf_files, arc_conversation, skip_bad, **slice_kwargs)
        self.variant = variant
