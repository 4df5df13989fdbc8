"""
CORE: the in-context-learning suite of DCLM (DataComp for Language Models), one number that says
how much a *base* model knows and can do from a few solved examples in its prompt.

Every task is a jsonl of items of one of three types (the llm-foundry "eval gauntlet" records):
  multiple_choice    {"query", "choices": [str], "gold": int}
      one context, one continuation per choice: the model picks the choice whose tokens have the
      lowest mean loss after the context
  schema             {"context_options": [str], "continuation": str, "gold": int}
      one context per option, a common continuation: the model picks the context under which
      the continuation has the lowest mean loss (e.g. Winograd: which noun does "it" refer to)
  language_modeling  {"context", "continuation"}
      right iff greedy decoding reproduces every token of the continuation exactly
A prompt is `num_fewshot` solved examples of the same task (drawn with a seed fixed per item,
never the item itself), separated by blank lines, then the item; `continuation_delimiter` joins
context and continuation. Prompts that do not fit the model are cropped from the left.

Per task: accuracy, then centered accuracy = (acc - random_baseline) / (1 - random_baseline),
so 0 is chance and 1 perfect. CORE = the mean centered accuracy over the tasks.

Where the tasks come from:
- the eval bundle nanochat uses (22 tasks: core.yaml, eval_meta_data.csv, eval_data/**.jsonl),
  downloaded once into $NANOCHAT_BASE_DIR/eval_bundle (download_eval_bundle), or any folder in
  that layout (bundle_tasks);
- local files in the shared format (local_tasks: a folder holding core/*.jsonl and the ARC /
  HellaSwag files, e.g. shared/data/eval), configured by the LOCAL_TASKS table below. Offline.

Evaluation is distributed: rank r scores items r, r + world_size, ...; the counts are summed.
"""
import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import requests
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_base_dir, get_dist_info, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EXAMPLE_SEPARATOR = "\n\n"  # between the few-shot examples and before the item
FEWSHOT_SEED = 1234         # item i draws its examples with random.Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337          # --max-per-task takes the first N items of a seeded shuffle
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class CoreDataError(ValueError):
    """Bad task data or configuration; the message names the file (and line, field)."""


@dataclass
class CoreTask:
    label: str
    task_type: str                 # one of TASK_TYPES
    path: str                      # the jsonl
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0   # chance accuracy, as a fraction
    fields: dict = field(default_factory=dict)  # our field name -> the record's (e.g. query <- ctx)


# The tasks of the shared local format (shared/data/eval and its core/ folder): file, type,
# shots, delimiter and chance level, following DCLM's settings for the same tasks. Baselines are
# chance for the number of choices in these files (commonsense_qa has 4 here), except boolq's,
# which like DCLM's is the majority class ("yes", 62%).
MC, SCHEMA, LM = TASK_TYPES
ANSWER = "\nAnswer: "
LOCAL_TASKS = [
    # label                file                        type    shots  delimiter  baseline  field mapping
    ("arc_easy",           "arc_easy.jsonl",            MC,     10,    ANSWER,    0.25,     {}),
    ("arc_challenge",      "arc_challenge.jsonl",       MC,     10,    ANSWER,    0.25,     {}),
    ("hellaswag",          "hellaswag_val.jsonl",       MC,     10,    " ",       0.25,
     {"query": "ctx", "choices": "endings", "gold": "label"}),
    ("copa",               "core/copa.jsonl",           MC,     0,     " ",       0.50,     {}),
    ("commonsense_qa",     "core/commonsense_qa.jsonl", MC,     10,    " ",       0.25,     {}),
    ("piqa",               "core/piqa.jsonl",           MC,     10,    ANSWER,    0.50,     {}),
    ("openbook_qa",        "core/openbook_qa.jsonl",    MC,     0,     " ",       0.25,     {}),
    ("boolq",              "core/boolq.jsonl",          MC,     10,    ANSWER,    0.62,     {}),
    ("winograd",           "core/winograd_wsc.jsonl",   SCHEMA, 0,     " ",       0.50,     {}),
    ("winogrande",         "core/winogrande.jsonl",     SCHEMA, 0,     " ",       0.50,     {}),
    ("lambada_openai",     "core/lambada_openai.jsonl", LM,     0,     " ",       0.0,      {}),
    ("bigbench_operators", "core/bigbench_operators.jsonl", LM, 10,    " ",       0.0,      {}),
]


def local_tasks(data_dir):
    """The LOCAL_TASKS found under data_dir (a file may also sit directly in data_dir instead of
    data_dir/core/). Raises CoreDataError when none is there."""
    tasks = []
    for label, rel_path, task_type, shots, delimiter, baseline, fields in LOCAL_TASKS:
        for candidate in (os.path.join(data_dir, rel_path), os.path.join(data_dir, os.path.basename(rel_path))):
            if os.path.isfile(candidate):
                tasks.append(CoreTask(label, task_type, candidate, shots, delimiter, baseline, dict(fields)))
                break
    if not tasks:
        raise CoreDataError(f"{data_dir}: none of the CORE task files is there (expected e.g. "
                            f"{', '.join(t[1] for t in LOCAL_TASKS[:4])}, ...)")
    return tasks


# -----------------------------------------------------------------------------
# The real eval bundle: core.yaml (task list) + eval_meta_data.csv (random baselines)

def _yaml_scalar(text, where):
    """One YAML scalar of the simple kind core.yaml uses: quoted strings, numbers, booleans,
    [flow, lists], bare words; a trailing # comment is dropped."""
    text = text.strip()
    if text.startswith('"'):
        end = 1
        while end < len(text) and text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        if end >= len(text):
            raise CoreDataError(f"{where}: unterminated string {text}")
        try:
            return json.loads(text[:end + 1])  # YAML's common double-quoted escapes (\n, \", \\) are JSON's
        except ValueError as e:
            raise CoreDataError(f"{where}: cannot read the string {text[:end + 1]} ({e})") from None
    if text.startswith("'"):
        end = 1
        while True:
            end = text.find("'", end)
            if end < 0:
                raise CoreDataError(f"{where}: unterminated string {text}")
            if text[end + 1:end + 2] == "'":  # '' is an escaped quote
                end += 2
                continue
            return text[1:end].replace("''", "'")
    text = text.split(" #", 1)[0].strip()
    if text.startswith("[") and text.endswith("]"):
        return [_yaml_scalar(item, where) for item in text[1:-1].split(",") if item.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def parse_core_yaml(text, path="core.yaml"):
    """The `icl_tasks:` list of core.yaml as a list of dicts. A small reader for exactly that shape
    (a list of flat mappings; block lists like `num_fewshot:\\n  - 10` too), so no YAML library."""
    tasks, current, current_indent, list_key, in_tasks = [], None, 0, None, False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            in_tasks = body.split(":", 1)[0].strip() == "icl_tasks"
            continue
        if not in_tasks:
            continue
        if body.startswith("- ") and list_key is not None and indent > current_indent:
            current[list_key].append(_yaml_scalar(body[2:], where))  # an item of a block list
            continue
        if body.startswith("-"):
            current = {}
            tasks.append(current)
            current_indent = indent
            body = body[1:].strip()
            if not body:
                continue
        if current is None or ":" not in body:
            raise CoreDataError(f"{where}: expected 'key: value' inside a '- label: ...' task, got {body!r}")
        key, value = body.split(":", 1)
        key = key.strip()
        if value.strip():
            current[key], list_key = _yaml_scalar(value, where), None
        else:
            current[key], list_key = [], key
    return tasks


def bundle_tasks(bundle_dir):
    """The tasks of an eval bundle folder: core.yaml says what (file, type, shots, delimiter),
    eval_meta_data.csv the chance level ('Random baseline', in percent)."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (yaml_path, csv_path):
        if not os.path.isfile(path):
            raise CoreDataError(f"{path} not found: {bundle_dir} is not an eval bundle "
                                f"(core.yaml + eval_meta_data.csv + eval_data/)")
    with open(yaml_path, encoding="utf-8") as f:
        configs = parse_core_yaml(f.read(), yaml_path)
    baselines = {}  # task -> (line, raw value); only the tasks in core.yaml must be numbers
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or []):
            raise CoreDataError(f"{csv_path}:1: expected the columns 'Eval Task' and 'Random baseline', "
                                f"got {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            baselines[row["Eval Task"]] = (lineno, row["Random baseline"])
    tasks = []
    for i, config in enumerate(configs):
        where = f"{yaml_path}: task #{i + 1} ({config.get('label', '?')})"
        try:
            label, uri, task_type = config["label"], config["dataset_uri"], config["icl_task_type"]
        except KeyError as e:
            raise CoreDataError(f"{where}: missing field {e.args[0]!r}") from None
        if task_type not in TASK_TYPES:
            raise CoreDataError(f"{where}: icl_task_type {task_type!r} is not one of {TASK_TYPES}")
        if label not in baselines:
            raise CoreDataError(f"{csv_path}: no 'Random baseline' row for task {label!r}")
        lineno, raw = baselines[label]
        try:
            baseline = float(raw) / 100  # the CSV gives percent
        except (TypeError, ValueError):
            raise CoreDataError(f"{csv_path}:{lineno}: 'Random baseline' of {label!r} is not a number: {raw!r}") from None
        shots = config.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append(CoreTask(label, task_type, os.path.join(bundle_dir, "eval_data", uri), int(shots),
                              str(config.get("continuation_delimiter", " ")), baseline))
    return tasks


def download_eval_bundle(base_dir=None, url=None, retries=5, backoff=2.0, timeout=(10, 120)):
    """$NANOCHAT_BASE_DIR/eval_bundle, downloaded and extracted on first use. The zip is written to
    a .tmp file and extracted into a temporary folder that is renamed into place only when
    complete, so a half-finished download never looks like a bundle. $NANOCHAT_EVAL_BUNDLE_URL
    (or `url`) replaces the default address (a mirror, or a loopback server in tests)."""
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    tmp_zip = f"{zip_path}.tmp{os.getpid()}"
    last_error = None
    for attempt in range(1, retries + 1):
        try:
            print0(f"Downloading the CORE eval bundle from {url}" + (f" (attempt {attempt}/{retries})" if attempt > 1 else ""))
            with requests.get(url, stream=True, timeout=timeout) as response:
                if response.status_code in (401, 403, 404):
                    last_error = f"HTTP {response.status_code}"
                    break  # retrying will not help
                response.raise_for_status()
                expected, written = response.headers.get("Content-Length"), 0
                with open(tmp_zip, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        written += len(chunk)
            if expected is not None and written != int(expected):
                raise OSError(f"connection closed after {written} of {expected} bytes")
            if not zipfile.is_zipfile(tmp_zip):
                raise OSError("the download is not a zip file")
            break
        except (requests.RequestException, OSError) as e:
            last_error = f"{type(e).__name__}: {e}"
            if os.path.exists(tmp_zip):
                os.remove(tmp_zip)
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    if not os.path.exists(tmp_zip):
        raise CoreDataError(
            f"could not download the CORE eval bundle from {url} ({last_error}). This machine may be offline.\n"
            f"Either fetch {EVAL_BUNDLE_URL} elsewhere and unzip it so that {bundle_dir}/core.yaml exists "
            f"(or pass --bundle-dir FOLDER), or evaluate on local files in the shared format with "
            f"--data-dir (e.g. shared/data/eval).")
    with tempfile.TemporaryDirectory(dir=base_dir, prefix=".eval_bundle.") as tmp_dir:
        with zipfile.ZipFile(tmp_zip) as archive:
            archive.extractall(tmp_dir)
        extracted = os.path.join(tmp_dir, "eval_bundle")
        if not os.path.isdir(extracted):  # a zip of the folder's contents rather than the folder
            extracted = tmp_dir
        if not os.path.isfile(os.path.join(extracted, "core.yaml")):
            raise CoreDataError(f"{url}: the zip holds no eval_bundle/core.yaml")
        if os.path.isdir(bundle_dir):  # an incomplete leftover (no core.yaml): replace it
            shutil.rmtree(bundle_dir)
        os.replace(extracted, bundle_dir)
    os.remove(tmp_zip)
    print0(f"CORE eval bundle ready in {bundle_dir}")
    return bundle_dir


# -----------------------------------------------------------------------------
# Items: read, check, render, tokenize

def _check_item(record, task_type):
    """The fields of one record for its task type, validated; raises ValueError naming the field."""
    def text(key, allow_empty=False):
        value = record.get(key)
        if not isinstance(value, str) or (not allow_empty and not value):
            raise ValueError(f"field {key!r}: expected a {'' if allow_empty else 'non-empty '}string, got {value!r}"[:200])
        return value

    def options(key):
        value = record.get(key)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"field {key!r}: expected a list of at least 2 non-empty strings"[:200])
        gold = record.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(value):
            raise ValueError(f"field 'gold': expected an index 0..{len(value) - 1}, got {gold!r}")
        return value, gold

    if task_type == MC:
        choices, gold = options("choices")
        return {"query": text("query", allow_empty=True), "choices": choices, "gold": gold}
    if task_type == SCHEMA:
        context_options, gold = options("context_options")
        return {"context_options": context_options, "continuation": text("continuation"), "gold": gold}
    return {"context": text("context", allow_empty=True), "continuation": text("continuation")}


def load_items(task):
    """All items of a task, validated (CoreDataError names file:line and the field)."""
    if not os.path.isfile(task.path):
        raise CoreDataError(f"{task.path}: task file of {task.label!r} not found")
    items = []
    with open(task.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                for ours, theirs in task.fields.items():
                    record[ours] = record.get(theirs)
                items.append(_check_item(record, task.task_type))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise CoreDataError(f"{task.path}:{lineno}: {e}") from None
    if not items:
        raise CoreDataError(f"{task.path}: no items")
    return items


def _solved(item, task_type, delimiter):
    """A few-shot example: the item with its right answer."""
    if task_type == MC:
        return item["query"] + delimiter + item["choices"][item["gold"]]
    if task_type == SCHEMA:
        return item["context_options"][item["gold"]] + delimiter + item["continuation"]
    return item["context"].rstrip() + delimiter + item["continuation"]


def render_prompts(item, task_type, delimiter, fewshot=()):
    """[(context, context + continuation)]: one pair per choice / context option, one for LM."""
    prefix = "".join(_solved(example, task_type, delimiter) + EXAMPLE_SEPARATOR for example in fewshot)
    if task_type == MC:
        context = prefix + item["query"] + delimiter
        return [(context, context + choice) for choice in item["choices"]]
    if task_type == SCHEMA:
        return [(prefix + option + delimiter, prefix + option + delimiter + item["continuation"])
                for option in item["context_options"]]
    context = prefix + item["context"].rstrip() + delimiter
    return [(context, context + item["continuation"])]


def fewshot_examples(items, index, num_fewshot):
    """num_fewshot other items, the same for item `index` whatever the rank or subset."""
    if num_fewshot <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + index)
    picks = rng.sample(range(len(items)), min(num_fewshot + 1, len(items)))
    return [items[j] for j in picks if j != index][:num_fewshot]


def _common_prefix_len(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_prompts(tokenizer, prompts, max_len=None):
    """[(ids, start, end)]: <|bos|> + full text, with the continuation at ids[start:end]. The
    continuation starts where the tokens of the context (trailing whitespace stripped, so a
    delimiter space joins the next word as BPE does) stop matching the full text's tokens. Too
    long sequences are cropped from the left, keeping at least one token before the continuation."""
    bos = tokenizer.get_bos_token_id()
    encoded = tokenizer.encode([text for pair in prompts for text in (pair[0].rstrip(), pair[1])], prepend=bos)
    out = []
    for context_ids, full_ids in zip(encoded[0::2], encoded[1::2]):
        start, end = _common_prefix_len(context_ids, full_ids), len(full_ids)
        if start >= end:
            raise ValueError(f"the continuation is empty after tokenization: {full_ids[-8:]}")
        if max_len is not None and end > max_len:
            cut = end - max_len
            full_ids, start, end = full_ids[cut:], max(start - cut, 1), max_len
        out.append((full_ids, start, end))
    return out


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_item(model, sequences, task_type, gold, device, pad_id):
    """Run one item's sequences [(ids, start, end)] as one right-padded batch (causal attention:
    the padding after a row never influences it). Returns (correct: bool, predicted index)."""
    width = max(len(ids) for ids, _, _ in sequences)
    batch = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, (ids, _, _) in enumerate(sequences):
        batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = batch.to(device)
    logits = model(batch)  # (rows, width, vocab); position t predicts token t + 1
    if task_type == LM:
        ids, start, end = sequences[0]
        predicted = logits[0, start - 1:end - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, batch[0, start:end])), None
    # mean loss over each row's continuation tokens only (the rest of the logits are never needed)
    mean_losses = torch.stack([F.cross_entropy(logits[row, start - 1:end - 1].float(), batch[row, start:end])
                               for row, (_, start, end) in enumerate(sequences)])
    predicted = int(mean_losses.argmin().item())
    return predicted == gold, predicted


def evaluate_task(model, tokenizer, task, items, device, max_seq_len=None, indices=None):
    """Accuracy of `model` on `task` (items: all of its items, which few-shot examples come from;
    indices: which of them to score, default all). Each rank scores its share; the counts are
    summed over ranks, so every rank returns the same accuracy."""
    indices = range(len(items)) if indices is None else list(indices)
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "sequence_len", None)
    _, rank, _, world_size = get_dist_info()
    pad_id = tokenizer.get_bos_token_id()
    counts = torch.zeros(2, dtype=torch.long, device=device)  # correct, total
    for position in range(rank, len(indices), world_size):
        index = indices[position]
        item = items[index]
        prompts = render_prompts(item, task.task_type, task.continuation_delimiter,
                                 fewshot_examples(items, index, task.num_fewshot))
        try:
            sequences = tokenize_prompts(tokenizer, prompts, max_seq_len)
        except ValueError as e:
            raise CoreDataError(f"{task.path}: item {index} of {task.label!r}: {e}") from None
        correct, _ = score_item(model, sequences, task.task_type, item.get("gold"), device, pad_id)
        counts[0] += int(correct)
        counts[1] += 1
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, total = counts.tolist()
    return correct / total if total else float("nan")


def centered(accuracy, random_baseline):
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def subset_indices(num_items, max_per_task):
    """All indices, or max_per_task of them: the first of a seeded shuffle (a fair sample, the
    same every run)."""
    if max_per_task is None or max_per_task < 0 or max_per_task >= num_items:
        return list(range(num_items))
    order = list(range(num_items))
    random.Random(SUBSET_SEED).shuffle(order)
    return sorted(order[:max_per_task])


def evaluate_core(model, tokenizer, tasks, device, max_per_task=-1, max_seq_len=None, log=print0):
    """Evaluate every task; returns {"results": {label: {accuracy, centered, random_baseline,
    num_items, type, num_fewshot}}, "core": mean centered accuracy}."""
    results = {}
    for task in tasks:
        t0 = time.time()
        items = load_items(task)
        indices = subset_indices(len(items), max_per_task)
        accuracy = evaluate_task(model, tokenizer, task, items, device, max_seq_len, indices)
        results[task.label] = {"accuracy": accuracy, "centered": centered(accuracy, task.random_baseline),
                               "random_baseline": task.random_baseline, "num_items": len(indices),
                               "type": task.task_type, "num_fewshot": task.num_fewshot}
        if log:
            log(f"{task.label:<34} {task.task_type:<18} {task.num_fewshot:>2}-shot  n={len(indices):<5} "
                f"accuracy {accuracy:.4f}  centered {results[task.label]['centered']:+.4f}  ({time.time() - t0:.1f}s)")
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"results": results, "core": core}
