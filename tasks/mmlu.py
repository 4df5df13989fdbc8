"""MMLU: 57-subject multiple-choice exam questions (Hendrycks et al., MIT licence), from cais/mmlu.
Offline, a jsonl of {"question", "choices": [str], "answer": int, "answer_letter"?, "subject"?}:
    MMLU("test", data_path=f"{DATA}/eval/mmlu_test_26subjects.jsonl")   # or mmlu_dev_fewshot.jsonl"""
from tasks.common import MultipleChoiceTask, multiple_choice_conversation

HF_REPO = "cais/mmlu"
# auxiliary_train (~100k questions from other MC datasets) is for training; dev (5 per subject),
# validation and test are for evaluation
MMLU_SPLITS = ("auxiliary_train", "dev", "validation", "test")
# config "all": every subject in one file per split
HF_FILES = {split: [f"all/{split}-00000-of-00001.parquet"] for split in MMLU_SPLITS}

def mmlu_conversation(record):
    if isinstance(record.get("train"), dict):  # the separate auxiliary_train config nests each row
        record = record["train"]
    return multiple_choice_conversation(record.get("question"), record.get("choices"), record.get("answer"),
                                        record.get("answer_letter"), subject=record.get("subject") or "")

class MMLU(MultipleChoiceTask):
    def __init__(self, split="test", subset="all", data_path=None, skip_bad=None, **slice_kwargs):
        keep = None if subset == "all" else (lambda record, example: example["subject"] == subset)
        super().__init__(split, data_path, HF_REPO, HF_FILES, mmlu_conversation, skip_bad, keep=keep, **slice_kwargs)
        if len(self.indices) == 0:
            raise ValueError(f"MMLU: no questions with subject {subset!r} in {self.paths} "
                             "(subset is 'all' or a subject name like 'college_biology')")
        self.subset = subset
