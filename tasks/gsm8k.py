"""
GSM8K: grade-school math word problems with worked solutions (Cobbe et al., MIT licence).
Hugging Face: openai/gsm8k, files main/train-00000-of-00001.parquet and main/test-...parquet,
rows {"question", "answer"}. Offline: data_path= a jsonl of either {"question", "answer"}
(shared/data/eval/gsm8k_test.jsonl) or {"messages": [user, assistant]}
(shared/data/chat/gsm8k_train_chat.jsonl).

The solutions carry calculator annotations: "48/2 = <<48/2=24>>24 clips". We turn each one into
a tool call, so the model learns to emit the expression as python and read the result back:
  [text "48/2 = "] [python "48/2"] [python_output "24"] [text "24 clips"]
The final line "#### 72" is the answer; evaluate() compares that number.
"""
import math
import re

from tasks.common import RecordTask, RecordError, data_paths_or_download, check_messages

HF_REPO = "openai/gsm8k"
HF_FILES = {"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"}

ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)
FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def solution_to_parts(solution):
    """A GSM8K solution string -> assistant content parts with calculator tool calls."""
    parts, position = [], 0
    for match in ANNOTATION.finditer(solution):
        if "=" not in match.group(1):
            raise RecordError("answer", f"calculator annotation {match.group(0)!r} has no '='")
        expression, result = match.group(1).rsplit("=", 1)
        if solution[position:match.start()]:
            parts.append({"type": "text", "text": solution[position:match.start()]})
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        position = match.end()
    if solution[position:]:
        parts.append({"type": "text", "text": solution[position:]})
    return parts


def normalize_number(text):
    text = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):  # a model can write a 400-digit "number": compare it as text
        return text
    return int(value) if value == int(value) else value


def extract_answer(text):
    """The number after the last '#### ' in text, normalised (commas removed, 72.0 == 72); None if absent."""
    matches = FINAL_ANSWER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def gsm8k_conversation(record):
    if "messages" in record:
        messages = check_messages(record["messages"])
        if len(messages) != 2 or not isinstance(messages[1]["content"], str):
            raise RecordError("messages", "expected one user question and one assistant solution (a string)")
        question, solution = messages[0]["content"], messages[1]["content"]
        field = "messages[1].content"
    else:
        question, solution, field = record.get("question"), record.get("answer"), "answer"
        for key, value in (("question", question), ("answer", solution)):
            if not isinstance(value, str) or not value.strip():
                raise RecordError(key, "missing or empty")
    if solution.count("<<") != solution.count(">>"):
        raise RecordError(field, "unbalanced calculator annotations << >>")
    answer = extract_answer(solution)
    if answer is None:
        raise RecordError(field, "no final answer line '#### <number>'")
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution_to_parts(solution)}],
            "answer": answer}


class GSM8K(RecordTask):
    def __init__(self, split="train", data_path=None, skip_bad=None, **slice_kwargs):
        if split not in HF_FILES:
            raise ValueError(f"GSM8K split must be one of {tuple(HF_FILES)}, got {split!r}")
        paths, skip_bad = data_paths_or_download(data_path, HF_REPO, [HF_FILES[split]], skip_bad)
        super().__init__(paths, gsm8k_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.split = split

    @property
    def eval_type(self):
        return "generative"

    def evaluate(self, conversation, completion):
        predicted = extract_answer(completion)
        return float(predicted is not None and predicted == conversation["answer"])
