"""GSM8K: grade-school math word problems with worked solutions (Cobbe et al., MIT licence), openai/gsm8k;
offline, a jsonl of {"question", "answer"} or {"messages": [user, assistant]}:
    GSM8K("test", data_path=f"{DATA}/eval/gsm8k_test.jsonl")   # or chat/gsm8k_train_chat.jsonl"""
import math
import re

from tasks.common import HubTask, RecordError, check_messages, nonempty_str

HF_REPO = "openai/gsm8k"
HF_FILES = {"train": ["main/train-00000-of-00001.parquet"], "test": ["main/test-00000-of-00001.parquet"]}
# a calculator annotation in a solution: "<<48/2=24>>"
ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)
# the solution's last line, "#### 72" (also "#### 1,200" or "#### -2.5")
FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")

def solution_to_parts(solution):
    """A GSM8K solution string -> assistant content parts with calculator tool calls."""
    # "48/2 = <<48/2=24>>24 clips" -> [text "48/2 = "] [python "48/2"] [python_output "24"] [text "24 clips"]:
    # the model learns to emit the expression as python and to read the result back
    # split on the annotations' group: text, annotation, text, ..., text (a text piece may be empty)
    pieces = ANNOTATION.split(solution)
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for annotation, text in zip(pieces[1::2], pieces[2::2]):
        if "=" not in annotation:
            raise RecordError("answer", f"calculator annotation {'<<' + annotation + '>>'!r} has no '='")
        expression, result = annotation.rsplit("=", 1)
        parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        parts += [{"type": "text", "text": text}] if text else []
    return parts

def extract_answer(text):
    """The number after the last '#### ' in text, normalised (commas removed, 72.0 == 72); None if absent."""
    if not (matches := FINAL_ANSWER.findall(text)):
        return None
    # FINAL_ANSWER admits only digits, one '.' and a leading '-': float() parses any match
    value = float(number := matches[-1].replace(",", ""))
    # not a finite number, compared as text: a model can write a 400-digit "number" (float: inf)
    return number if not math.isfinite(value) else int(value) if value == int(value) else value

def gsm8k_conversation(record):
    # the chat form (shared/data's train file) carries the same solution text as its assistant reply
    if "messages" in record:
        messages = check_messages(record["messages"])
        if len(messages) != 2 or not isinstance(messages[1]["content"], str):
            raise RecordError("messages", "expected one user question and one assistant solution (a string)")
        (question, solution), field = [m["content"] for m in messages], "messages[1].content"
    else:
        question, solution, field = nonempty_str(record, "question"), nonempty_str(record, "answer"), "answer"
    if solution.count("<<") != solution.count(">>"):
        raise RecordError(field, "unbalanced calculator annotations << >>")
    if (answer := extract_answer(solution)) is None:
        raise RecordError(field, "no final answer line '#### <number>'")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": solution_to_parts(solution)}]
    return {"messages": messages, "answer": answer}

class GSM8K(HubTask):
    eval_type = "generative"
    def __init__(self, split="train", data_path=None, skip_bad=None, **slice_kwargs):
        super().__init__(split, data_path, HF_REPO, HF_FILES, gsm8k_conversation, skip_bad, **slice_kwargs)
    def evaluate(self, conversation, completion):
        predicted = extract_answer(completion)
        return float(predicted is not None and predicted == conversation["answer"])
