"""Tasks: datasets seen as indexable, sliceable lists of conversations, plus how to grade a model's answer.
    task = GSM8K("train", stop=1000)        # the first 1000 problems: len(task) == 1000, task[0] == {"messages": ...}
    task.evaluate(task[0], "... #### 72")   # -> 1.0 or 0.0; `python -m tasks.specs SPEC...` shows a task's examples"""
import bisect
import json
import operator
import os
import re

import numpy as np
import pyarrow.parquet as pq

from nanochat.common import print0
from nanochat.download import hf_dataset_file
# the conversation checks live by the tokenizer, which renders them; scripts import them from here too
from nanochat.tokenizer import RecordError, check_messages

# -----------------------------------------------------------------------------
# Task, and the two ways of combining tasks
class Task:
    """A list of examples (usually conversations) seen through a start/stop/step slice."""
    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step} "
                             "(need 0 <= start <= stop and step >= 1)")
        self.start, self.stop, self.step = start, stop, step

    # the examples: self.items, or a subclass's own; an evaluation task also sets eval_type and implements evaluate()
    def num_examples(self):
        return len(self.items)
    def get_example(self, index):
        return self.items[index]
    @property
    def eval_type(self):
        """'categorical' (answer is one of conversation['letters']) or 'generative' (free text)."""
        raise NotImplementedError(f"{type(self).__name__} is a training set and has no evaluation")
    def evaluate(self, conversation, completion):
        """Grade the model's `completion` (str) to `conversation`: 1.0 right, 0.0 wrong."""
        raise NotImplementedError(f"{type(self).__name__} is a training set and has no evaluation")

    # the sliced view: like a list's, a stop past the end is clipped
    def _range(self):
        return range(self.num_examples())[self.start:self.stop:self.step]
    def __len__(self):
        return len(self._range())
    def __getitem__(self, index):
        # operator.index accepts numpy integers too; range indexing checks bounds, handles negatives
        return self.get_example(self._range()[operator.index(index)])
    def __iter__(self):
        return map(self.get_example, self._range())
    def __repr__(self):
        return f"{type(self).__name__}(len={len(self)})"

# (which part, index within it) for parts laid end to end, part i starting at offsets[i]
def _locate(offsets, index):
    which = bisect.bisect_right(offsets, index) - 1
    return which, index - offsets[which]

class TaskMixture(Task):
    """All examples of all tasks in one seeded shuffled order; a task listed twice is seen twice."""
    def __init__(self, tasks, seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("TaskMixture needs at least one task")
        lengths = [len(task) for task in self.tasks]
        order = np.random.default_rng(seed).permutation(sum(lengths))
        # two flat arrays, not a list of pairs: a mixture of millions of examples stays small
        self.task_ids = np.repeat(np.arange(len(self.tasks), dtype=np.int32), lengths)[order]
        self.local_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])[order]
    def num_examples(self):
        return len(self.task_ids)
    def locate(self, index):
        """(task, index within that task) behind mixture example `index` (unsliced)."""
        return self.tasks[int(self.task_ids[index])], int(self.local_ids[index])
    def get_example(self, index):
        task, local_index = self.locate(index)
        return task[local_index]

# -----------------------------------------------------------------------------
# Reading records from jsonl / json / parquet files, and validating all of them up front
class Records:
    """The raw records of one or more .jsonl/.json/.parquet files under one index."""
    def __init__(self, paths, columns=None):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("no data files given")
        self.files = []  # (path, kind, data): data is [(where in the file, record)] or a pyarrow Table
        for path in map(str, paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file not found: {path}")
            if not path.endswith((".parquet", ".jsonl", ".json")):
                raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
            # parquet stays an Arrow table (compact): a row becomes a dict only when it is read
            data = pq.read_table(path, columns=columns) if path.endswith(".parquet") else _read_json_records(path)
            self.files.append((path, "jsonl" if isinstance(data, list) else "parquet", data))
        # where each file's records start in the one index
        self.offsets = np.cumsum([0] + [len(data) for _, _, data in self.files]).tolist()
    def __len__(self):
        return self.offsets[-1]
    def __getitem__(self, index):
        which, i = _locate(self.offsets, index)
        _, kind, data = self.files[which]
        return data[i][1] if kind == "jsonl" else data.slice(i, 1).to_pylist()[0]
    def where(self, index):
        """'file:line' for JSON Lines (1-based), 'file[N]' for a JSON array, 'file:row N' for parquet (0-based)."""
        which, i = _locate(self.offsets, index)
        path, kind, data = self.files[which]
        return f"{path}{data[i][0]}" if kind == "jsonl" else f"{path}:row {i}"
    def __iter__(self):
        for _, kind, data in self.files:
            if kind == "jsonl":
                yield from (record for _, record in data)
            else:
                for batch in data.to_batches(max_chunksize=4096):
                    yield from batch.to_pylist()

def _read_json_records(path):
    """[(where, record)]: JSON Lines (where = ':line', 1-based), or one JSON array of records ('[index]')."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # a JSON array, like Alpaca's own alpaca_data.json (often pretty-printed); else JSON Lines
    array = _decode(text) if text.lstrip().startswith("[") else None
    if isinstance(array, list):
        return [(f"[{index}]", record) for index, record in enumerate(array)]
    # blank lines skipped, line numbers kept for the error messages; a line that is not JSON keeps its error
    # in its place, to be reported with the other bad records (no JSON value decodes to an exception)
    lines = [(f":{number}", _decode(line)) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    failed = [(where, e) for where, e in lines if isinstance(e, json.JSONDecodeError)]
    # a broken array, or not one line of JSON (a pretty-printed object): no JSON Lines file with a few bad lines
    if failed and (array is not None or len(failed) == len(lines)):
        as_array = f"; as a JSON array: line {array.lineno}: {array.msg}" if array else ""
        raise ValueError(f"{path}{failed[0][0]}: expected JSON Lines or a JSON array "
                         f"(as JSON Lines: {failed[0][1].msg}{as_array})")
    return lines

def _decode(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return e

def check_all(records, convert, keep=None, skip_bad=False, max_listed=10):
    """Indices of the records to use: `convert` (raising RecordError) passes them, and `keep` if given."""
    bad, indices = [], []
    for index, record in enumerate(records):
        try:
            if isinstance(record, json.JSONDecodeError):
                raise RecordError("json", f"not valid JSON ({record})")
            if not isinstance(record, dict):
                raise RecordError("record", f"expected a JSON object, got {type(record).__name__}")
            example = convert(record)
            if keep is None or keep(record, example):
                indices.append(index)
        except RecordError as e:
            bad.append((index, e))
    if bad:
        # nothing is dropped silently: the first bad record (file:line: field: problem), and how many
        listed = ", ".join(records.where(i) for i, _ in bad[:max_listed]) + (", ..." if len(bad) > max_listed else "")
        summary = (f"{records.where(bad[0][0])}: {bad[0][1]}\n"
                   f"{len(bad)} of {len(records)} records are bad (first ones: {listed})")
        if not skip_bad:
            raise ValueError(summary + "\nNothing was loaded: fix or remove those records "
                             "(or, knowingly, pass skip_bad=True / add ':skip_bad' to the task spec).")
        # skip_bad: the caller chose to go on without them, but the report is printed all the same
        print0(f"WARNING: leaving out {len(bad)} bad records (skip_bad): {summary}")
    return indices

class RecordTask(Task):
    """A Task over records in files: every record is checked when loading, converted on access."""
    def __init__(self, paths, convert, keep=None, skip_bad=False, columns=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.records, self.convert = Records(paths, columns=columns), convert
        # only the indices of good records are kept: an example is converted again when it is read,
        # which keeps a downloaded dataset of 100k+ conversations as compact as its Arrow table
        self.indices = check_all(self.records, convert, keep=keep, skip_bad=skip_bad)
    def num_examples(self):
        return len(self.indices)
    def get_example(self, index):
        return self.convert(self.records[self.indices[index]])

class HubTask(RecordTask):
    """A split of a Hugging Face dataset: the user's local file(s) data_path, else its files split_files[split]."""
    def __init__(self, split, data_path, repo_id, split_files, convert, skip_bad=None, **kwargs):
        if split not in split_files:
            raise ValueError(f"{type(self).__name__} split must be one of {tuple(split_files)}, got {split!r}")
        paths = [hf_dataset_file(repo_id, name) for name in split_files[split]] if data_path is None else data_path
        # skip_bad=None: bad records are an error in your files, left out (warned) of a download you cannot fix
        super().__init__(paths, convert, skip_bad=(data_path is None) if skip_bad is None else skip_bad, **kwargs)
        self.split, self.paths = split, paths

# -----------------------------------------------------------------------------
# The chat record formats
def nonempty_str(record, key, optional=False):
    if (value := record.get(key)) is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(key, "missing" if value is None else f"expected a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise RecordError(key, "empty")
    return value

def chat_record_to_conversation(record):
    """{"messages": [...]} as is (validated), or Alpaca {"instruction", "input", "output"}."""
    if "messages" in record:
        return {"messages": check_messages(record["messages"])}
    if "instruction" in record or "output" in record:
        keys = ("instruction", "input", "output")  # checked in this order; input is optional
        instruction, extra, output = (nonempty_str(record, key, optional=key == "input") for key in keys)
        # an empty input adds nothing, not two stray newlines
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    raise RecordError("messages", "missing (expected 'messages', or Alpaca-style 'instruction'/'input'/'output')")

# -----------------------------------------------------------------------------
# Multiple choice (MMLU, ARC): a lettered prompt; the assistant answers with the letter
LETTERS = "ABCDEFGHIJ"

def multiple_choice_conversation(question, choices, answer, answer_letter=None, **extras):
    """The checked MC fields as a conversation: a lettered prompt, answered with a letter; else RecordError."""
    if not isinstance(question, str) or not question.strip():
        raise RecordError("question", "missing or empty")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise RecordError("choices", f"expected a list of 2 to {len(LETTERS)} strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise RecordError(f"choices[{i}]", "missing or empty")
    # a record may give only the letter
    if answer is None and isinstance(answer_letter, str) and answer_letter in LETTERS:
        answer = LETTERS.index(answer_letter)
    # bool is an int in Python: True would pass as answer 1
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RecordError("answer", f"expected a choice index 0..{len(choices) - 1}, got {answer!r}")
    if answer_letter is not None and answer_letter != LETTERS[answer]:
        raise RecordError("answer_letter", f"{answer_letter!r} disagrees with answer={answer}")
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    user = (f"{question}\n\n{options}\n\n"
            f"Answer with the letter of the correct choice ({', '.join(letters[:-1])} or {letters[-1]}).")
    # the letters travel with the conversation: the grader accepts only those as answers
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letters[answer]}],
            "letters": list(letters), **extras}

def first_letter(completion, letters):
    """The answer letter in a completion like 'B', ' B.', '(B) Paris' or 'B: Paris'; None if absent."""
    # a letter not followed by another letter: 'B' and 'B.' are answers, 'Because' is not
    letter = match.group(1).upper() if (match := re.match(r"\s*\(?([A-Za-z])(?![A-Za-z])", completion)) else None
    return letter if letter in letters else None

class MultipleChoiceTask(HubTask):
    eval_type = "categorical"
    def evaluate(self, conversation, completion):
        # the reference answer is the assistant's letter
        return float(first_letter(completion, conversation["letters"]) == conversation["messages"][-1]["content"])
