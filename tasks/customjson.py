"""CustomJSON: your own conversations, from .jsonl (one record per line), a .json array of records, or .parquet.
    CustomJSON("mine.jsonl"); in the training scripts: --data mine.jsonl, or --mixture custom:mine.jsonl
CustomEval: your own questions to score (chat_eval -a custom:FILE): multiple choice, or exact match."""
import os
import random
import re

from tasks.common import (RecordError, RecordTask, chat_record_to_conversation, check_messages, first_letter,
                          multiple_choice_conversation, nonempty_str)

# A record is one of
#   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}: an optional first
#       system message, then user/assistant alternating, ending with the assistant; assistant content
#       may be a list of tool-use parts {"type": "text"|"python"|"python_output", "text": "..."}
#   {"instruction": "...", "input": "...", "output": "..."} (Alpaca style, input optional):
#       user = instruction + "\n\n" + input (when there is an input), assistant = output
class CustomJSON(RecordTask):
    # skip_bad=False: a bad record of your own file stops the run, naming file:line: field, for you to fix
    def __init__(self, path, skip_bad=False, **slice_kwargs):
        super().__init__(path, chat_record_to_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.path = path

# -----------------------------------------------------------------------------
# An evaluation file holds one kind of question (EVAL_FORMATS): its answer is the conversation's last message
MULTIPLE_CHOICE, EXACT_MATCH = "multiple choice", "exact match"
EVAL_FORMATS = """multiple choice {"question", "choices": [...], "answer": index or "answer_letter": "B"}, scored by the
  answer letters' logits; exact match {"prompt": str, "answer": str}, {"messages": [system?, user, ..., user],
  "answer": str} or Alpaca {"instruction", "input"?, "output"}: the reply's first line (as many lines as the answer)
  must equal the answer, both lowercased, whitespace collapsed, quotes around and .!?,;: at the end dropped"""

# what exact match compares: a chat model dresses a label up (' Positive.', '"yes"'), still the label; 'no way' is not 'no'
def normalize_answer(text):
    return re.sub(r"^[\"'`\s]+|[\"'`\s.!?,;:]+$", "", " ".join(text.lower().split()))

# a question of an evaluation file as a conversation, with its "kind" (a RecordError names a bad field)
def eval_conversation(record):
    if "choices" in record:
        return multiple_choice_conversation(record.get("question"), record.get("choices"), record.get("answer"),
                                            record.get("answer_letter"), kind=MULTIPLE_CHOICE)
    if "instruction" in record or "output" in record:
        return dict(chat_record_to_conversation(record), kind=EXACT_MATCH)
    if "messages" not in record and "prompt" not in record:
        raise RecordError("prompt", f"missing: expected one of these records:\n{EVAL_FORMATS}")
    # the question's turns (after an optional system message, ending with the user), then the expected answer
    prompt = check_messages(record["messages"], final_role="user") if "messages" in record else \
        [{"role": "user", "content": nonempty_str(record, "prompt")}]
    return {"messages": prompt + [{"role": "assistant", "content": nonempty_str(record, "answer")}], "kind": EXACT_MATCH}

class CustomEval(RecordTask):
    """Questions of one kind from one file, each asked after the same `fewshot` solved examples, drawn (seeded) from
    fewshot_path or, without one, from the file itself, and then not scored."""
    def __init__(self, path, fewshot=0, fewshot_path=None, seed=42):
        super().__init__(path, eval_conversation)
        # no shots while the file's questions are checked, nor while the shots themselves are read (pool[i] below)
        self.path, self.shots = path, []
        if not self.indices:
            raise ValueError(f"{path}:1: no questions in the file; expected one of these records:\n{EVAL_FORMATS}")
        kinds = [self.get_example(i)["kind"] for i in range(len(self))]
        self.kind = kinds[0]
        if mixed := [i for i, kind in enumerate(kinds) if kind != self.kind]:
            raise ValueError(f"{self.records.where(self.indices[mixed[0]])}: a '{kinds[mixed[0]]}' question in a file "
                             f"whose first ({self.records.where(self.indices[0])}) is '{self.kind}': one kind per file")
        # the same file (by any name) gives the shots from its own questions, and asks only the others
        own = fewshot_path is None or os.path.abspath(fewshot_path) == os.path.abspath(path)
        pool = self if own else CustomEval(fewshot_path)
        if pool.kind != self.kind or fewshot > len(pool) - own:
            raise ValueError(f"--fewshot {fewshot}: {pool.path} has {len(pool)} {pool.kind} questions; {path} needs "
                             f"{fewshot} {self.kind} ones" + (" and one more to ask" if own else ""))
        picks = random.Random(seed).sample(range(len(pool)), fewshot)
        self.shots = [pool[i] for i in picks]
        if own:
            self.indices = [index for i, index in enumerate(self.indices) if i not in picks]
        # the confusion table's rows: every rank reads the same labels from the file
        self.labels = sorted({normalize_answer(self[i]["messages"][-1]["content"]) for i in range(len(self))}
                             if self.kind == EXACT_MATCH else [])
    @property
    def eval_type(self):
        return "categorical" if self.kind == MULTIPLE_CHOICE else "generative"
    def get_example(self, index):
        # [the question's system message], user (shot 1), assistant (its answer; a letter), ..., the question's turns
        conversation = super().get_example(index)
        messages = conversation["messages"]
        system = messages[:1] if messages[0]["role"] == "system" else []
        shots = [message for shot in self.shots for message in shot["messages"] if message["role"] != "system"]
        return dict(conversation, messages=system + shots + messages[len(system):])

    # (the right answer, the model's) as exact match compares them: a chat model may explain after its answer
    def graded(self, conversation, completion):
        answer = conversation["messages"][-1]["content"]
        reply = "\n".join(completion.strip().splitlines()[:answer.strip().count("\n") + 1])
        return normalize_answer(answer), normalize_answer(reply)
    def evaluate(self, conversation, completion):
        if self.kind == MULTIPLE_CHOICE:
            return float(first_letter(completion, conversation["letters"]) == conversation["messages"][-1]["content"])
        answer, reply = self.graded(conversation, completion)
        return float(answer == reply)
