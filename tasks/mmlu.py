"""
MMLU: 57-subject multiple-choice exam questions (Hendrycks et al., MIT licence).
Hugging Face: cais/mmlu, config "all", files all/<split>-00000-of-00001.parquet.
auxiliary_train (~100k questions from other MC datasets) is for training; dev (5 per subject),
validation and test are for evaluation. Offline: data_path= a jsonl with
{"question", "choices": [str], "answer": int, "answer_letter"?, "subject"?} per line, e.g.
shared/data/eval/mmlu_test_26subjects.jsonl or mmlu_dev_fewshot.jsonl.
"""
from tasks.common import MultipleChoiceTask, data_paths_or_download, check_multiple_choice, multiple_choice_conversation

HF_REPO = "cais/mmlu"
MMLU_SPLITS = ("auxiliary_train", "dev", "validation", "test")


def mmlu_conversation(record):
    if isinstance(record.get("train"), dict):  # the separate auxiliary_train config nests each row
        record = record["train"]
    question, choices, answer = check_multiple_choice(record.get("question"), record.get("choices"),
                                                      record.get("answer"), record.get("answer_letter"))
    return multiple_choice_conversation(question, choices, answer, subject=record.get("subject") or "")


class MMLU(MultipleChoiceTask):
    def __init__(self, split="test", subset="all", data_path=None, skip_bad=None, **slice_kwargs):
        if split not in MMLU_SPLITS:
            raise ValueError(f"MMLU split must be one of {MMLU_SPLITS}, got {split!r}")
        hf_files = [f"all/{split}-00000-of-00001.parquet"]
        paths, skip_bad = data_paths_or_download(data_path, HF_REPO, hf_files, skip_bad)
        keep = None if subset == "all" else (lambda record, example: example["subject"] == subset)
        super().__init__(paths, mmlu_conversation, keep=keep, skip_bad=skip_bad, **slice_kwargs)
        if len(self.indices) == 0:
            raise ValueError(f"MMLU: no questions with subject {subset!r} in {paths} "
                             "(subset is 'all' or a subject name like 'college_biology')")
        self.split, self.subset = split, subset
