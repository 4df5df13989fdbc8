"""
Tasks: datasets seen as lists of conversations, plus how to grade a model's answer.

A conversation is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
(see DESIGN.md). Assistant content may also be a list of parts
{"type": "text"|"python"|"python_output", "text": str} for tool use. A Task is an indexable,
sliceable list of conversations:

    task = GSM8K("train", stop=1000)            # the first 1000 problems
    len(task), task[0]                          # -> 1000, {"messages": [...]}
    task.evaluate(task[0], "... #### 72")       # -> 1.0 or 0.0

Where the data comes from: every task takes `data_path=` (a local .jsonl or .parquet file, or a
list of them); without it, the task fetches its default Hugging Face dataset file once, into
$NANOCHAT_BASE_DIR/hf_datasets/ (see hf_file). Offline, point the tasks at local files. With the
small open datasets in shared/data (DATA=.../shared/data) everything works without internet:

    GSM8K("train", data_path=f"{DATA}/chat/gsm8k_train_chat.jsonl")
    GSM8K("test",  data_path=f"{DATA}/eval/gsm8k_test.jsonl")
    ARC("easy", "test", data_path=f"{DATA}/eval/arc_easy.jsonl")        # also arc_challenge.jsonl
    MMLU("test", data_path=f"{DATA}/eval/mmlu_test_26subjects.jsonl")   # or mmlu_dev_fewshot.jsonl
    HumanEval(data_path=f"{DATA}/eval/humaneval.jsonl")
    CustomJSON(f"{DATA}/chat/selfinstruct_seed_tasks_chat.jsonl")       # general chat instead of SmolTalk
    Preferences(f"{DATA}/preference/hh_rlhf_harmless_base_test.jsonl")
    SpellingBee(), SimpleSpelling(), IdentityConversations(persona)     # generated, no data needed

Loading validates every record; a bad file raises ValueError naming file:line:field of the
first bad record and how many are bad, so nothing is dropped silently.
The CLI spec grammar for --mixture flags is in build_task() at the bottom;
`python -m tasks.common SPEC...` loads specs and shows an example of each.
"""
import os
import re
import json
import time
import operator
import bisect
import random
import argparse
from urllib.parse import quote

import numpy as np
import requests

from nanochat.common import get_base_dir, print0

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")

# -----------------------------------------------------------------------------
# Task, and the two ways of combining tasks


class Task:
    """
    An indexable list of examples (usually conversations) with an optional start/stop/step
    view over the underlying dataset. Subclasses implement num_examples() and get_example(i);
    evaluation tasks also set eval_type and implement evaluate().
    """

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step} "
                             "(need 0 <= start <= stop and step >= 1)")
        self.start, self.stop, self.step = start, stop, step

    # what subclasses provide
    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    @property
    def eval_type(self):
        """'categorical' (answer is one of conversation['letters']) or 'generative' (free text)."""
        raise NotImplementedError(f"{type(self).__name__} is a training set and has no evaluation")

    def evaluate(self, conversation, completion):
        """Grade the model's `completion` (str) to `conversation`: 1.0 right, 0.0 wrong."""
        raise NotImplementedError(f"{type(self).__name__} is a training set and has no evaluation")

    # the sliced view
    def _range(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self._range())

    def __getitem__(self, index):
        # operator.index accepts numpy integers too; range indexing checks bounds, handles negatives
        return self.get_example(self._range()[operator.index(index)])

    def __iter__(self):
        for physical_index in self._range():
            yield self.get_example(physical_index)

    def __repr__(self):
        return f"{type(self).__name__}(len={len(self)})"


class TaskMixture(Task):
    """
    All examples of all tasks, in one deterministic shuffled order (seeded), so a training run
    sees the sources interleaved. A task listed twice is seen twice per pass (oversampling).
    """

    def __init__(self, tasks, seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("TaskMixture needs at least one task")
        lengths = [len(task) for task in self.tasks]
        self.task_ids = np.repeat(np.arange(len(self.tasks), dtype=np.int32), lengths)
        self.local_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        order = np.random.default_rng(seed).permutation(len(self.task_ids))
        self.task_ids, self.local_ids = self.task_ids[order], self.local_ids[order]

    def num_examples(self):
        return len(self.task_ids)

    def locate(self, index):
        """(task, index within that task) behind mixture example `index` (unsliced)."""
        return self.tasks[int(self.task_ids[index])], int(self.local_ids[index])

    def get_example(self, index):
        task, local_index = self.locate(index)
        return task[local_index]


class TaskSequence(Task):
    """The tasks one after another, unshuffled (e.g. a curriculum, or one eval pass over several)."""

    def __init__(self, tasks, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        self.offsets = np.cumsum([0] + [len(task) for task in self.tasks]).tolist()

    def num_examples(self):
        return self.offsets[-1]

    def locate(self, index):
        which = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[which], index - self.offsets[which]

    def get_example(self, index):
        task, local_index = self.locate(index)
        return task[local_index]


# -----------------------------------------------------------------------------
# Downloading Hugging Face dataset files (cached, atomic, retried)

HF_URL = "https://huggingface.co"


class DownloadError(RuntimeError):
    pass


def hf_file(repo_id, filename, revision="main", retries=5, backoff=2.0, timeout=60):
    """
    Local path of `filename` from the Hugging Face dataset `repo_id`, downloading it on first use
    to $NANOCHAT_BASE_DIR/hf_datasets/<repo_id>/<revision>/<filename>. $NANOCHAT_HF_URL replaces
    https://huggingface.co (a mirror, or a loopback server in tests). The file is written to a
    .tmp name and renamed into place only when complete, so a cached file is always whole.
    """
    local_path = os.path.join(get_base_dir(), "hf_datasets", repo_id, revision, filename)
    if os.path.exists(local_path):
        return local_path
    base_url = os.environ.get("NANOCHAT_HF_URL", HF_URL).rstrip("/")
    url = f"{base_url}/datasets/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
    os.makedirs(os.path.dirname(local_path), exist_ok=True)
    tmp_path = f"{local_path}.tmp{os.getpid()}"  # per process: DDP ranks may download at once
    how_to_fix = (f"Fetch it on a machine with internet and put it at\n  {local_path}\n"
                  "or give the task a local file instead (every task takes data_path=..., and a "
                  "--mixture spec takes a path, e.g. 'gsm8k:train:/path/train.jsonl'; see tasks/common.py).")
    last_error = None
    for attempt in range(1, retries + 1):
        try:
            print0(f"Downloading {url}" + (f" (attempt {attempt}/{retries})" if attempt > 1 else ""))
            with requests.get(url, stream=True, timeout=timeout) as response:
                if response.status_code in (401, 403, 404):  # retrying will not help
                    raise DownloadError(f"{url} answered HTTP {response.status_code}: the dataset file "
                                        f"does not exist or is not public.\n{how_to_fix}")
                response.raise_for_status()
                expected = response.headers.get("Content-Length")
                written = 0
                with open(tmp_path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        written += len(chunk)
                if expected is not None and written != int(expected):
                    raise IOError(f"connection closed after {written} of {expected} bytes")
            os.replace(tmp_path, local_path)
            return local_path
        except DownloadError:
            _remove(tmp_path)
            raise
        except (requests.RequestException, OSError) as e:
            _remove(tmp_path)
            last_error = e
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise DownloadError(f"Could not download {url} after {retries} attempts "
                        f"(last error: {type(last_error).__name__}: {last_error}).\n"
                        f"This machine may be offline. {how_to_fix}")


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# -----------------------------------------------------------------------------
# Reading records from jsonl / parquet files, and validating all of them up front


class RecordError(ValueError):
    """What is wrong with one record; `field` says where inside it, e.g. 'messages[2].role'."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class _UnparsableLine:
    """Kept in place of a jsonl line that is not valid JSON, so it is reported with the others."""

    def __init__(self, error):
        self.error = error


class Records:
    """
    The raw records of one or more .jsonl/.parquet files under one index. jsonl is parsed up front
    (blank lines skipped, line numbers kept for error messages); parquet stays an Arrow table,
    which is compact, and a row becomes a dict only when accessed.
    """

    def __init__(self, paths, columns=None):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("no data files given")
        self.files = []  # (path, kind, data): data is [(line_number, record)] or a pyarrow Table
        for path in map(str, paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file not found: {path}")
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq
                self.files.append((path, "parquet", pq.read_table(path, columns=columns)))
            elif path.endswith((".jsonl", ".json")):
                self.files.append((path, "jsonl", _read_jsonl(path)))
            else:
                raise ValueError(f"{path}: unsupported file type (expected .jsonl or .parquet)")
        self.offsets = np.cumsum([0] + [len(data) for _, _, data in self.files]).tolist()

    def __len__(self):
        return self.offsets[-1]

    def _locate(self, index):
        which = bisect.bisect_right(self.offsets, index) - 1
        return self.files[which], index - self.offsets[which]

    def __getitem__(self, index):
        (_, kind, data), i = self._locate(index)
        return data[i][1] if kind == "jsonl" else data.slice(i, 1).to_pylist()[0]

    def where(self, index):
        """'file:line' for jsonl (1-based line), 'file:row N' for parquet (0-based row)."""
        (path, kind, data), i = self._locate(index)
        return f"{path}:{data[i][0]}" if kind == "jsonl" else f"{path}:row {i}"

    def __iter__(self):
        for _, kind, data in self.files:
            if kind == "jsonl":
                yield from (record for _, record in data)
            else:
                for batch in data.to_batches(max_chunksize=4096):
                    yield from batch.to_pylist()


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_number, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((line_number, _UnparsableLine(e)))
    return rows


def check_all(records, convert, keep=None, skip_bad=False, max_listed=10):
    """
    Run `convert` (record -> example, raising RecordError) over every record and return the
    indices of the records to use (those passing `keep`, if given). Any bad record -> ValueError
    naming the first one (file:line: field: problem) and how many are bad. skip_bad=True (the
    default only for downloaded datasets, which we cannot fix; an explicit choice for your own
    files) leaves the bad records out instead, printing the same report.
    """
    bad, indices = [], []
    for index, record in enumerate(records):
        try:
            if isinstance(record, _UnparsableLine):
                raise RecordError("json", f"not valid JSON ({record.error})")
            if not isinstance(record, dict):
                raise RecordError("record", f"expected a JSON object, got {type(record).__name__}")
            example = convert(record)
        except RecordError as e:
            bad.append((index, e))
            continue
        if keep is None or keep(record, example):
            indices.append(index)
    if bad:
        first_index, first_error = bad[0]
        summary = (f"{records.where(first_index)}: {first_error}\n"
                   f"{len(bad)} of {len(records)} records are bad (first ones: "
                   + ", ".join(records.where(i) for i, _ in bad[:max_listed])
                   + (", ..." if len(bad) > max_listed else "") + ")")
        if not skip_bad:
            raise ValueError(summary + "\nNothing was loaded: fix or remove those records "
                             "(or, knowingly, pass skip_bad=True / add ':skip_bad' to the task spec).")
        print0(f"WARNING: leaving out {len(bad)} bad records (skip_bad): {summary}")
    return indices


class RecordTask(Task):
    """A Task over records in files: every record is checked when loading, converted on access."""

    def __init__(self, paths, convert, keep=None, skip_bad=False, columns=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.records = Records(paths, columns=columns)
        self.convert = convert
        self.indices = check_all(self.records, convert, keep=keep, skip_bad=skip_bad)

    def num_examples(self):
        return len(self.indices)

    def get_example(self, index):
        return self.convert(self.records[self.indices[index]])


def data_paths_or_download(data_path, repo_id, filenames, skip_bad=None, revision="main"):
    """
    (paths, skip_bad): the user's local file(s), else the default files downloaded from Hugging
    Face. skip_bad=None means: bad records are an error in your files, and are left out (with a
    warning) of downloaded datasets, which you cannot fix.
    """
    if data_path is not None:
        return data_path, bool(skip_bad)
    paths = [hf_file(repo_id, name, revision) for name in filenames]
    return paths, True if skip_bad is None else skip_bad


# -----------------------------------------------------------------------------
# Conversation validation and the chat record formats


def check_messages(messages, field="messages", final_role="assistant"):
    """
    Validate and normalise a message list: optional leading system message, then user/assistant
    alternating starting with user, ending with `final_role` (assistant for training; user for a
    DPO prompt). Content must be a non-empty string; assistant content may be a list of parts.
    Returns clean {"role", "content"} copies; raises RecordError naming the field.
    """
    if not isinstance(messages, list):
        raise RecordError(field, f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RecordError(field, "empty message list")
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    clean = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(where, f"expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise RecordError(f"{where}.role", f"expected {expected!r}, got {role!r} (after an optional "
                                  "first system message, turns alternate user/assistant starting with user)")
        clean.append({"role": role, "content": _check_content(message.get("content"), role, f"{where}.content")})
    if len(clean) == start:
        raise RecordError(field, "only a system message, no conversation")
    if final_role is not None and clean[-1]["role"] != final_role:
        raise RecordError(f"{field}[{len(clean) - 1}].role",
                          f"the conversation must end with the {final_role}, got {clean[-1]['role']!r}")
    return clean


def _check_content(content, role, field):
    if isinstance(content, str):
        if not content.strip():
            raise RecordError(field, "empty content")
        return content
    if role == "assistant" and isinstance(content, list):
        if not content:
            raise RecordError(field, "empty list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise RecordError(f"{field}[{j}]", f"expected {{'type': one of {', '.join(PART_TYPES)}, 'text': str}}")
        if not any(part["text"].strip() for part in content if part["type"] != "python_output"):
            raise RecordError(field, "empty content (no text or code in any part)")
        return [{"type": part["type"], "text": part["text"]} for part in content]
    allowed = "a string or a list of parts" if role == "assistant" else "a string"
    raise RecordError(field, f"expected {allowed}, got {type(content).__name__}")


def _nonempty_str(record, key, optional=False):
    value = record.get(key)
    if value is None and optional:
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
        instruction = _nonempty_str(record, "instruction")
        extra_input = _nonempty_str(record, "input", optional=True)
        output = _nonempty_str(record, "output")
        user = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    raise RecordError("messages", "missing (expected 'messages', or Alpaca-style 'instruction'/'input'/'output')")


# -----------------------------------------------------------------------------
# Multiple choice (MMLU, ARC): a lettered prompt; the assistant answers with the letter

LETTERS = "ABCDEFGHIJ"


def multiple_choice_conversation(question, choices, answer, **extras):
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    user = (f"{question}\n\n{options}\n\n"
            f"Answer with the letter of the correct choice ({', '.join(letters[:-1])} or {letters[-1]}).")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letters[answer]}],
            "letters": list(letters), **extras}


def check_multiple_choice(question, choices, answer, answer_letter=None):
    """Validate the common MC fields; returns (question, choices, answer_index)."""
    if not isinstance(question, str) or not question.strip():
        raise RecordError("question", "missing or empty")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise RecordError("choices", f"expected a list of 2 to {len(LETTERS)} strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise RecordError(f"choices[{i}]", "missing or empty")
    if answer is None and isinstance(answer_letter, str) and answer_letter in LETTERS:
        answer = LETTERS.index(answer_letter)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RecordError("answer", f"expected a choice index 0..{len(choices) - 1}, got {answer!r}")
    if answer_letter is not None and answer_letter != LETTERS[answer]:
        raise RecordError("answer_letter", f"{answer_letter!r} disagrees with answer={answer}")
    return question, choices, answer


def first_letter(completion, letters):
    """The answer letter in a completion like 'B', ' B.', '(B) Paris' or 'B: Paris'; None if absent."""
    match = re.match(r"\s*\(?([A-Za-z])(?![A-Za-z])", completion)
    letter = match.group(1).upper() if match else None
    return letter if letter in letters else None


class MultipleChoiceTask(RecordTask):
    @property
    def eval_type(self):
        return "categorical"

    def evaluate(self, conversation, completion):
        correct = conversation["messages"][-1]["content"]
        return float(first_letter(completion, conversation["letters"]) == correct)


# -----------------------------------------------------------------------------
# CLI specs -> Tasks (the training and eval scripts' --mixture / --task flags)

SPEC_HELP = """\
A task spec is NAME[:ARG...][[START:STOP[:STEP]]]. ARGs are a split/variant word, a number (size),
or a local data file (anything with a '/' or ending in .jsonl/.json/.parquet):
  smoltalk[:train|test][:FILE]              general chat (HuggingFaceTB/smol-smoltalk)
  mmlu[:auxiliary_train|dev|validation|test][:SUBJECT][:FILE]   (train = auxiliary_train)
  arc[:easy|challenge][:train|validation|test][:FILE]          default easy
  gsm8k[:train|test][:FILE]                 math with calculator tool calls
  humaneval[:test][:FILE]                   code (eval only)
  spelling[:train|test][:N] (= spellingbee) count letters with a python tool call, N examples
  simplespelling[:train|test][:N]           spell words letter by letter
  custom:FILE                               your conversations (messages or Alpaca jsonl/parquet)
  identity:PERSONA.json[:N]                 who-am-I conversations for your persona
  preferences[:train|test][:FILE]           DPO pairs (default HuggingFaceH4/ultrafeedback_binarized)
  identity_pairs:PERSONA.json[:N]           DPO pairs: persona answer vs a generic one
Add the word skip_bad to leave out (and report) bad records of a file instead of failing,
e.g. "preferences:skip_bad:/data/hh.jsonl".
Examples: "smoltalk", "mmlu:auxiliary_train", "gsm8k[:2000]", "arc:challenge:test",
  "custom:/data/mine.jsonl", "identity:persona.json:500". A spec listed twice is oversampled."""

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _is_path(arg):
    return "/" in arg or os.sep in arg or arg.endswith(_FILE_SUFFIXES)


def build_task(spec, default_split="train"):
    """Turn a CLI spec string into a Task (grammar: SPEC_HELP). default_split: 'train' or 'test'."""
    from tasks.smoltalk import SmolTalk
    from tasks.mmlu import MMLU, MMLU_SPLITS
    from tasks.arc import ARC, ARC_SPLITS
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.spelling import SpellingBee, SimpleSpelling
    from tasks.customjson import CustomJSON
    from tasks.preferences import Preferences
    from tasks.identity import IdentityConversations, IdentityPreferences, load_persona

    bad = ValueError(f"bad task spec {spec!r}.\n{SPEC_HELP}")
    match = re.fullmatch(r"([^\[\]]+?)(?:\[(\d*):(\d*)(?::(\d*))?\])?", spec.strip())
    if not match:
        raise bad
    body, start, stop, step = match.groups()
    sliced = {"start": int(start or 0), "stop": int(stop) if stop else None, "step": int(step or 1)}
    name, *args = body.split(":")
    for i in range(len(args) - 1, 0, -1):  # on Windows, re-join drive letters: C:\data\x.jsonl
        if os.name == "nt" and len(args[i - 1]) == 1 and args[i - 1].isalpha() and args[i][:1] in ("\\", "/"):
            args[i - 1:i + 1] = [args[i - 1] + ":" + args[i]]
    name = name.strip().lower()
    paths = [a for a in args if _is_path(a)]
    words = [a for a in args if not _is_path(a) and not a.isdigit() and a != "skip_bad"]
    skip_bad = True if "skip_bad" in args else None  # None: each task's default (see data_paths_or_download)
    numbers = [int(a) for a in args if a.isdigit()]
    path = paths[0] if paths else None

    def pick(allowed, default):
        chosen = [w for w in words if w in allowed]
        return chosen[0] if chosen else default

    def leftover(*used, sized=False):
        extra = [w for w in words if w not in used] + ([] if sized else numbers)
        if extra:
            raise ValueError(f"task spec {spec!r}: unknown argument(s) {extra}.\n{SPEC_HELP}")

    if name == "smoltalk":
        split = pick(("train", "test"), default_split)
        leftover(split)
        return SmolTalk(split, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "mmlu":
        words = ["auxiliary_train" if w == "train" else w for w in words]  # MMLU's training split
        split = pick(MMLU_SPLITS, "auxiliary_train" if default_split == "train" else "test")
        subjects = [w for w in words if w != split]
        subset = subjects[0] if subjects else "all"
        leftover(split, subset)
        return MMLU(split, subset=subset, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "arc":
        variant = pick(("easy", "challenge"), "easy")
        split = pick(ARC_SPLITS, default_split)
        leftover(variant, split)
        return ARC(variant, split, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "gsm8k":
        split = pick(("train", "test"), default_split)
        leftover(split)
        return GSM8K(split, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "humaneval":
        leftover("test")
        return HumanEval(data_path=path, skip_bad=skip_bad, **sliced)
    if name in ("spelling", "spellingbee", "simplespelling"):
        split = pick(("train", "test"), default_split)
        leftover(split, sized=True)
        cls = SimpleSpelling if name == "simplespelling" else SpellingBee
        return cls(size=numbers[0] if numbers else 1000, split=split, **sliced)
    if name == "custom":
        leftover()
        if path is None:
            raise ValueError(f"task spec {spec!r}: custom needs a file, e.g. custom:/data/mine.jsonl")
        return CustomJSON(path, skip_bad=bool(skip_bad), **sliced)
    if name in ("identity", "identity_pairs"):
        leftover(sized=True)
        if path is None:
            raise ValueError(f"task spec {spec!r}: {name} needs a persona file, e.g. {name}:persona.json")
        cls = IdentityConversations if name == "identity" else IdentityPreferences
        return cls(load_persona(path), n=numbers[0] if numbers else 1000, **sliced)
    if name in ("preferences", "prefs"):
        split = pick(("train", "test"), default_split)
        leftover(split)
        return Preferences(path, split=split, skip_bad=skip_bad, **sliced)
    raise bad


def build_mixture(specs, seed=42, default_split="train"):
    """A TaskMixture from a list of specs or one comma-separated string of them."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return TaskMixture([build_task(s, default_split) for s in specs], seed=seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load task specs (validating their data) and show examples.",
                                     epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="task specs, e.g. gsm8k:train custom:/data/mine.jsonl")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="default split")
    parser.add_argument("--show", type=int, default=1, help="how many examples of each task to print")
    parser.add_argument("--seed", type=int, default=0, help="which examples to show (random, seeded)")
    cli = parser.parse_args()
    rng = random.Random(cli.seed)
    for spec in cli.specs:
        task = build_task(spec, cli.split)
        print(f"== {spec}: {task}")
        for index in rng.sample(range(len(task)), min(cli.show, len(task))):
            print(f"-- [{index}]\n{json.dumps(task[index], indent=2, ensure_ascii=False)}")
