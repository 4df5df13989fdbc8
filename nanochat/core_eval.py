"""CORE: the in-context-learning suite of DCLM, one number for how much a *base* model knows and can
do from a few solved examples in its prompt: 0 is chance, 1 perfect. scripts/base_eval.py runs it.
    tasks = local_tasks("shared/data/eval")      # or bundle_tasks(download_eval_bundle())
    evaluate_core(model, tokenizer, tasks, device)["core"]"""
import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm
import yaml

from nanochat.common import DataError, get_base_dir, get_dist_info, print0
from nanochat.download import DownloadError, download_file
from nanochat.task_eval import all_reduce_sum, right_padded

# A task is a jsonl of items of one type (the records of llm-foundry's "eval gauntlet"):
#   multiple_choice    {"query", "choices", "gold"}: the model picks the choice of the lowest mean loss after the query
#   schema             {"context_options", "continuation", "gold"}: the model picks the context under which the
#                      continuation has the lowest mean loss (Winograd: what does "it" mean)
#   language_modeling  {"context", "continuation"}: right iff greedy decoding gives the continuation
MC, SCHEMA, LM = TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EXAMPLE_SEPARATOR = "\n\n"  # between the few-shot examples and before the item
FEWSHOT_SEED = 1234         # item i draws its examples with random.Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337          # --max-per-task takes the first N items of a seeded shuffle
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

@dataclass
class CoreTask:
    label: str
    task_type: str                 # one of TASK_TYPES
    path: str                      # the jsonl
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0   # chance accuracy, as a fraction
    fields: dict = field(default_factory=dict)  # our field name -> the record's (e.g. query <- ctx)

# -----------------------------------------------------------------------------
# Where the tasks come from: local files in the shared format (offline), or the eval bundle
# The tasks of the shared local format (shared/data/eval and its core/ folder): file, type, shots, delimiter and chance
# level, following DCLM's settings for the same tasks. Baselines are chance for the number of choices in these files
# (commonsense_qa has 4 here), except boolq's, which like DCLM's is the majority class ("yes", 62%).
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
    """The LOCAL_TASKS found under data_dir (or directly in data_dir instead of data_dir/core/)."""
    tasks = []
    for label, rel_path, task_type, shots, delimiter, baseline, fields in LOCAL_TASKS:
        candidates = (os.path.join(data_dir, rel_path), os.path.join(data_dir, os.path.basename(rel_path)))
        if path := next((c for c in candidates if os.path.isfile(c)), None):
            tasks.append(CoreTask(label, task_type, path, shots, delimiter, baseline, dict(fields)))
    if not tasks:
        raise DataError(f"{data_dir}: none of the CORE task files is there (expected e.g. "
                        f"{', '.join(t[1] for t in LOCAL_TASKS[:4])}, ...)")
    return tasks

# The eval bundle nanochat uses (22 tasks): core.yaml (the task list), eval_meta_data.csv (random
# baselines) and eval_data/**.jsonl, downloaded once into $NANOCHAT_BASE_DIR/eval_bundle
def bundle_tasks(bundle_dir):
    """The tasks of an eval bundle folder: core.yaml says what they are, eval_meta_data.csv their chance level."""
    yaml_path, csv_path = os.path.join(bundle_dir, "core.yaml"), os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (yaml_path, csv_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: {bundle_dir} is not an eval bundle "
                            f"(core.yaml + eval_meta_data.csv + eval_data/)")
    with open(yaml_path, encoding="utf-8") as f:
        try:
            configs = yaml.safe_load(f)["icl_tasks"]
        except (yaml.YAMLError, TypeError, KeyError) as e:  # not YAML, not a mapping, no icl_tasks
            raise DataError(f"{yaml_path}: cannot read the task list 'icl_tasks' ({type(e).__name__}: {e})") from None
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or []):
            raise DataError(f"{csv_path}:1: expected the columns 'Eval Task' and 'Random baseline', "
                            f"got {reader.fieldnames}")
        # task -> (line, raw value): only the baselines of the tasks in core.yaml must be numbers
        baselines = {row["Eval Task"]: (lineno, row["Random baseline"]) for lineno, row in enumerate(reader, start=2)}
    tasks = []
    # only the fields we use are checked; the rest of llm-foundry's settings are ignored
    for i, config in enumerate(configs):
        where = f"{yaml_path}: task #{i + 1} ({config.get('label', '?')})"
        try:
            label, uri, task_type = config["label"], config["dataset_uri"], config["icl_task_type"]
        except KeyError as e:
            raise DataError(f"{where}: missing field {e.args[0]!r}") from None
        if task_type not in TASK_TYPES:
            raise DataError(f"{where}: icl_task_type {task_type!r} is not one of {TASK_TYPES}")
        if label not in baselines:
            raise DataError(f"{csv_path}: no 'Random baseline' row for task {label!r}")
        lineno, raw = baselines[label]
        try:
            baseline = float(raw) / 100  # the CSV gives percent
        except (TypeError, ValueError):
            raise DataError(f"{csv_path}:{lineno}: 'Random baseline' of {label!r} is not a number: {raw!r}") from None
        # core.yaml lists the shot counts to try ([10] or a block list): CORE uses the first
        shots = config.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append(CoreTask(label, task_type, os.path.join(bundle_dir, "eval_data", uri), int(shots),
                              str(config.get("continuation_delimiter", " ")), baseline))
    return tasks

def download_eval_bundle(base_dir=None, url=None, **kwargs):
    """$NANOCHAT_BASE_DIR/eval_bundle, downloaded and extracted on first use; kwargs go to download_file."""
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    # $NANOCHAT_EVAL_BUNDLE_URL (or `url`): a mirror, or a loopback server in tests
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    print0(f"Downloading the CORE eval bundle from {url}")
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    try:
        download_file(url, zip_path, check=lambda tmp: None if zipfile.is_zipfile(tmp) else "not a zip file", **kwargs)
    except DownloadError as e:
        raise type(e)(f"{e}\nOffline? Fetch {EVAL_BUNDLE_URL} elsewhere and unzip it so that {bundle_dir}/core.yaml "
                      f"exists (or pass --bundle-dir FOLDER), or evaluate on local files in the shared format with "
                      f"--data-dir (e.g. shared/data/eval).") from None
    # extract to a temporary folder renamed into place only when complete: a half-extracted bundle never looks like one
    try:
        with tempfile.TemporaryDirectory(dir=base_dir, prefix=".eval_bundle.") as tmp_dir:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(tmp_dir)
            extracted = os.path.join(tmp_dir, "eval_bundle")
            if not os.path.isdir(extracted):  # a zip of the folder's contents rather than the folder
                extracted = tmp_dir
            if not os.path.isfile(os.path.join(extracted, "core.yaml")):
                raise DataError(f"{url}: the zip holds no eval_bundle/core.yaml")
            if os.path.isdir(bundle_dir):  # an incomplete leftover (no core.yaml): replace it
                shutil.rmtree(bundle_dir)
            os.replace(extracted, bundle_dir)
    finally:
        os.remove(zip_path)  # extracted, or useless: either way not worth keeping
    print0(f"CORE eval bundle ready in {bundle_dir}")
    return bundle_dir

# -----------------------------------------------------------------------------
# Items: read, check, render, tokenize. Bad data raises a DataError naming file:line and the field.
def _check_item(record, task_type):
    """The fields of one record for its task type, validated; raises ValueError naming the field."""
    def text(key, allow_empty=False):
        if not isinstance(value := record.get(key), str) or (not allow_empty and not value):
            raise ValueError(f"field {key!r}: expected a {'' if allow_empty else 'non-empty '}string, got {value!r}"[:200])
        return value
    def options(key):
        value = record.get(key)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"field {key!r}: expected a list of at least 2 non-empty strings")
        if isinstance(gold := record.get("gold"), bool) or not isinstance(gold, int) or not 0 <= gold < len(value):
            raise ValueError(f"field 'gold': expected an index 0..{len(value) - 1}, got {gold!r}")
        return {key: value, "gold": gold}
    if task_type == MC:
        return {**options("choices"), "query": text("query", allow_empty=True)}
    if task_type == SCHEMA:
        return {**options("context_options"), "continuation": text("continuation")}
    return {"context": text("context", allow_empty=True), "continuation": text("continuation")}

def load_items(task):
    """All items of a task, validated (DataError names file:line and the field)."""
    if not os.path.isfile(task.path):
        raise DataError(f"{task.path}: task file of {task.label!r} not found")
    items = []
    with open(task.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(record := json.loads(line), dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                record.update({ours: record.get(theirs) for ours, theirs in task.fields.items()})
                items.append(_check_item(record, task.task_type))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise DataError(f"{task.path}:{lineno}: {e}") from None
    if not items:
        raise DataError(f"{task.path}: no items")
    return items

# A prompt: num_fewshot solved examples of the same task, separated by blank lines, then the
# item; the task's continuation_delimiter joins context and continuation
def render_prompts(item, task_type, delimiter, fewshot=()):
    """[(context, context + continuation)]: one pair per choice / context option, one for LM."""
    # a solved example is its own right answer (the gold pair; LM items have just one), rendered alike
    prefix = "".join(render_prompts(ex, task_type, delimiter)[ex.get("gold", 0)][1] + EXAMPLE_SEPARATOR for ex in fewshot)
    if task_type == MC:
        pairs = [(item["query"], choice) for choice in item["choices"]]
    elif task_type == SCHEMA:
        pairs = [(option, item["continuation"]) for option in item["context_options"]]
    else:
        pairs = [(item["context"].rstrip(), item["continuation"])]
    return [(prefix + context + delimiter, prefix + context + delimiter + rest) for context, rest in pairs]

def fewshot_examples(items, index, num_fewshot):
    """num_fewshot other items, the same for item `index` whatever the rank or subset."""
    if num_fewshot <= 0:
        return []
    # a seed per item, and one spare pick, so the item itself can be left out
    picks = random.Random(FEWSHOT_SEED + index).sample(range(len(items)), min(num_fewshot + 1, len(items)))
    return [items[j] for j in picks if j != index][:num_fewshot]

def tokenize_prompts(tokenizer, prompts, max_len=None):
    """[(ids, start, end)]: <|bos|> + full text, with the continuation at ids[start:end]."""
    bos = tokenizer.get_bos_token_id()
    # the context is encoded with its trailing whitespace stripped, so a delimiter space joins the
    # next word as BPE does; the continuation starts where the two encodings stop matching
    encoded, out = tokenizer.encode([text for pair in prompts for text in (pair[0].rstrip(), pair[1])], prepend=bos), []
    for context_ids, full_ids in zip(encoded[0::2], encoded[1::2]):
        start, end = len(os.path.commonprefix([context_ids, full_ids])), len(full_ids)  # (works on any sequences)
        if start >= end:
            raise ValueError(f"the continuation is empty after tokenization: {full_ids[-8:]}")
        if max_len is not None and end > max_len:
            # too long for the model: crop from the left, keeping a token before the continuation
            cut = end - max_len
            full_ids, start, end = full_ids[cut:], max(start - cut, 1), max_len
        out.append((full_ids, start, end))
    return out

# -----------------------------------------------------------------------------
# Scoring
@torch.no_grad()
def score_item(model, sequences, task_type, gold, device, pad_id):
    """Whether the model answers one item right, running its sequences [(ids, start, end)] as one batch."""
    batch = right_padded([ids for ids, _, _ in sequences], pad_id, device)
    logits = model(batch)  # (rows, width, vocab); position t predicts token t + 1
    if task_type == LM:
        _, start, end = sequences[0]
        return torch.equal(logits[0, start - 1:end - 1].argmax(dim=-1), batch[0, start:end])
    # mean loss over each row's continuation tokens only (the rest of the logits are never needed)
    mean_losses = torch.stack([F.cross_entropy(logits[row, start - 1:end - 1].float(), batch[row, start:end])
                               for row, (_, start, end) in enumerate(sequences)])
    return int(mean_losses.argmin().item()) == gold

def evaluate_task(model, tokenizer, task, items, device, max_seq_len=None, indices=None):
    """Accuracy on `indices` (default: all) of `items`, few-shot examples from all; the same on every rank."""
    max_seq_len = max_seq_len or getattr(getattr(model, "config", None), "sequence_len", None)
    _, rank, _, world_size = get_dist_info()
    pad_id = tokenizer.get_bos_token_id()
    # rank r scores items r, r + world_size, ... of `indices`; the counts are summed over ranks below
    mine, correct = list(range(len(items)) if indices is None else indices)[rank::world_size], 0
    # a bar only when a task takes long enough to look like a hang (10 s), on one rank
    for index in tqdm(mine, desc=task.label, unit="item", leave=False, delay=10, disable=rank != 0):
        prompts = render_prompts(items[index], task.task_type, task.continuation_delimiter,
                                 fewshot_examples(items, index, task.num_fewshot))
        try:
            sequences = tokenize_prompts(tokenizer, prompts, max_seq_len)
        except ValueError as e:
            raise DataError(f"{task.path}: item {index} of {task.label!r}: {e}") from None
        correct += int(score_item(model, sequences, task.task_type, items[index].get("gold"), device, pad_id))
    correct, total = all_reduce_sum([correct, len(mine)], device)
    return correct / total if total else float("nan")

# centered accuracy: 0 is chance and 1 perfect, so tasks with 2 and with 4 choices average fairly
def centered(accuracy, random_baseline):
    return (accuracy - random_baseline) / (1.0 - random_baseline)

def subset_indices(num_items, max_per_task):
    """All indices, or max_per_task of them: the first of a seeded shuffle (a fair sample, the same every run)."""
    order = list(range(num_items))
    if max_per_task is None or max_per_task < 0 or max_per_task >= num_items:
        return order
    random.Random(SUBSET_SEED).shuffle(order)
    return sorted(order[:max_per_task])

def evaluate_core(model, tokenizer, tasks, device, max_per_task=-1, max_seq_len=None, log=print0):
    """{"results": {task label: its accuracy, centered accuracy, ...}, "core": the CORE score} of `model`."""
    results = {}
    for task in tasks:
        t0, items = time.time(), load_items(task)
        indices = subset_indices(len(items), max_per_task)
        accuracy = evaluate_task(model, tokenizer, task, items, device, max_seq_len, indices)
        results[task.label] = {"accuracy": accuracy, "centered": centered(accuracy, task.random_baseline),
                               "random_baseline": task.random_baseline, "num_items": len(indices),
                               "type": task.task_type, "num_fewshot": task.num_fewshot}
        if log:
            log(f"{task.label:<34} {task.task_type:<18} {task.num_fewshot:>2}-shot  n={len(indices):<5} "
                f"accuracy {accuracy:.4f}  centered {results[task.label]['centered']:+.4f}  ({time.time() - t0:.1f}s)")
    # CORE: the mean centered accuracy over the tasks
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"results": results, "core": core}
