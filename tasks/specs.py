"""Task specs: the strings of the scripts' --mixture / --val-mixture / --eval-tasks flags made into Tasks,
and the (train, val) data that midtraining, SFT and DPO read. Load specs and show examples:
    python -m tasks.specs gsm8k:train:/data/gsm8k_train_chat.jsonl custom:mine.jsonl --show 2"""
import argparse
import json
import os
import random
import re

from nanochat.common import HelpFormatter, exit_on, print0
from nanochat.download import DownloadError
from tasks.arc import ARC, ARC_SPLITS
from tasks.chatlog import ChatLog
from tasks.common import Task, TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.identity import IdentityConversations, IdentityPreferences, load_persona
from tasks.mmlu import MMLU, MMLU_SPLITS
from tasks.preferences import Preferences
from tasks.smoltalk import SmolTalk
from tasks.spelling import SimpleSpelling, SpellingBee

SPEC_HELP = """\
A task spec is NAME[:ARG...][[START:STOP[:STEP]]]. ARGs are a split/variant word, a number (size),
or a local data file (anything with a '/' or ending in .jsonl/.json/.parquet/.txt/.csv):
  smoltalk[:train|test][:FILE]              general chat (HuggingFaceTB/smol-smoltalk)
  mmlu[:auxiliary_train|dev|validation|test][:SUBJECT][:FILE]   (train = auxiliary_train)
  arc[:easy|challenge][:train|validation|test][:FILE]          default easy
  gsm8k[:train|test][:FILE]                 math with calculator tool calls
  humaneval[:test][:FILE]                   code (eval only)
  spelling[:train|test][:N] (= spellingbee) count letters with a python tool call, N examples
  simplespelling[:train|test][:N]           spell words letter by letter
  custom:FILE                               your conversations (messages or Alpaca jsonl/parquet)
  chatlog:EXPORT:me=NAME[:gap=MINUTES][:speaker_names]   a chat export, you the assistant (tasks/chatlog.py)
  identity:PERSONA.json[:N]                 who-am-I conversations for your persona
  preferences[:train|test][:FILE]           DPO pairs (default HuggingFaceH4/ultrafeedback_binarized)
  identity_pairs:PERSONA.json[:N]           DPO pairs: persona answer vs a generic one
Add the word skip_bad to leave out (and report) bad records of a file instead of failing,
e.g. "preferences:skip_bad:/data/hh.jsonl".
Examples: "smoltalk", "mmlu:auxiliary_train", "gsm8k[:2000]", "arc:challenge:test",
  "custom:/data/mine.jsonl", "identity:persona.json:500". A spec listed twice is oversampled."""

def build_task(spec, default_split="train"):
    """Turn a CLI spec string into a Task (grammar: SPEC_HELP). default_split: 'train' or 'test'."""
    # NAME:ARG..., then an optional python-like slice [START:STOP:STEP]
    if not (match := re.fullmatch(r"([^\[\]]+?)(?:\[(\d*):(\d*)(?::(\d*))?\])?", spec.strip())):
        raise ValueError(f"bad task spec {spec!r}.\n{SPEC_HELP}")
    body, start, stop, step = match.groups()
    sliced = {"start": int(start or 0), "stop": int(stop) if stop else None, "step": int(step or 1)}
    name, *args = body.split(":")
    name = name.strip().lower()
    # an ARG is told apart by its form: a path, a number (a size), or a word (split, variant, subject)
    paths = [a for a in args if "/" in a or os.sep in a or a.endswith((".jsonl", ".json", ".parquet", ".txt", ".csv"))]
    path = paths[0] if paths else None
    words = [a for a in args if a not in paths and not a.isdigit() and a != "skip_bad"]
    numbers = [int(a) for a in args if a.isdigit()]
    # the number of a generated task is its size
    size = numbers[0] if numbers else 1000
    # None: each task's default (bad records fail your files, are left out of downloads)
    skip_bad = True if "skip_bad" in args else None
    def pick(allowed, default):
        return next((w for w in words if w in allowed), default)
    # an argument that no part of the spec used is a typo: say so rather than ignore it
    def check_args(*used, sized=False, needs_file=None):
        if extra := [w for w in words if w not in used] + ([] if sized else numbers):
            raise ValueError(f"task spec {spec!r}: unknown argument(s) {extra}.\n{SPEC_HELP}")
        if needs_file and path is None:
            raise ValueError(f"task spec {spec!r}: {name} needs {needs_file}")
    if name in ("smoltalk", "gsm8k", "preferences", "prefs"):
        split = pick(("train", "test"), default_split)
        check_args(split)
        if name in ("preferences", "prefs"):
            return Preferences(path, split=split, skip_bad=skip_bad, **sliced)
        return (SmolTalk if name == "smoltalk" else GSM8K)(split, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "mmlu":
        # MMLU's training split is auxiliary_train
        words = ["auxiliary_train" if w == "train" else w for w in words]
        split = pick(MMLU_SPLITS, "auxiliary_train" if default_split == "train" else "test")
        # the other word, if any, is a subject: mmlu:test:astronomy
        subset = next((w for w in words if w != split), "all")
        check_args(split, subset)
        return MMLU(split, subset=subset, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "arc":
        variant, split = pick(("easy", "challenge"), "easy"), pick(ARC_SPLITS, default_split)
        check_args(variant, split)
        return ARC(variant, split, data_path=path, skip_bad=skip_bad, **sliced)
    if name == "humaneval":
        # its only split, test, may be named
        check_args("test")
        return HumanEval(data_path=path, skip_bad=skip_bad, **sliced)
    if name in ("spelling", "spellingbee", "simplespelling"):
        split = pick(("train", "test"), default_split)
        check_args(split, sized=True)
        return (SimpleSpelling if name == "simplespelling" else SpellingBee)(size=size, split=split, **sliced)
    # your own files: a bad record is an error unless the spec says skip_bad
    if name == "custom":
        check_args(needs_file="a file, e.g. custom:/data/mine.jsonl")
        return CustomJSON(path, skip_bad=bool(skip_bad), **sliced)
    if name == "chatlog":  # its me=NAME, gap=MINUTES and speaker_names words are ChatLog's to check
        check_args(*words, needs_file="a chat export, e.g. chatlog:/data/discord.json:me=alice")
        return ChatLog(path, words, **sliced)
    if name in ("identity", "identity_pairs"):
        check_args(sized=True, needs_file=f"a persona file, e.g. {name}:persona.json")
        cls = IdentityConversations if name == "identity" else IdentityPreferences
        return cls(load_persona(path), n=size, **sliced)
    raise ValueError(f"bad task spec {spec!r}.\n{SPEC_HELP}")

def build_tasks(specs, default_split, flag, scored=False):
    """[build_task(spec)] of the specs of `flag`; a failed download says which flag and spec asked for it.
    scored=True (--eval-tasks): every task must be one that can be scored, checked before any model is loaded."""
    tasks = []
    for spec in specs:
        try:
            tasks.append(build_task(spec, default_split))
        except DownloadError as e:  # download.py's hint is generic: only here is it known where the spec came from
            raise type(e)(f"{e}\n(from {flag} {spec}: give it a local file, or list {flag} without it; "
                          f"`{flag}` alone means none)") from None
        if scored and type(tasks[-1]).evaluate is Task.evaluate:  # no eval_type, no evaluate(): a training set
            raise ValueError(f"{flag} {spec}: {type(tasks[-1]).__name__} has no answers to score. Give your questions as "
                             'multiple choice, arc:test:FILE ({"question", "choices": [...], "answer": index} per line), or '
                             'gsm8k:test:FILE ({"question", "answer": "... #### 42"}); for a loss: --val-mixture custom:FILE')
    return tasks

# -----------------------------------------------------------------------------
# The data of midtraining, SFT and DPO, from their data flags
def train_val_mixtures(train_tasks, val_tasks=None, holdout=500, seed=42):
    """(train, val) TaskMixtures; without val_tasks, val is held out of the training mixture."""
    if not train_tasks:
        raise ValueError("nothing to train on (with --data-only, give --data files or a --persona)")
    if val_tasks:
        return TaskMixture(train_tasks, seed=seed), TaskMixture(val_tasks, seed=seed)
    # the first `holdout` examples of the shuffled mixture, at most a tenth of it, are not trained on
    total = sum(len(task) for task in train_tasks)
    if (held := min(holdout, total // 10)) < 1:
        raise ValueError(f"only {total} training example(s): too few to hold out a validation set "
                         "(give more data, or a validation set explicitly)")
    return TaskMixture(train_tasks, seed=seed, start=held), TaskMixture(train_tasks, seed=seed, stop=held)

def build_chat_tasks(args, default_val, pairs=False):
    """(train, val) mixtures from the data flags; pairs=True: DPO's preference pairs."""
    # the user's own files first, so a mistake there stops the run before anything is downloaded
    # (and before any model is loaded): a bad record is reported as file:line: field
    files, persona = (Preferences, IdentityPreferences) if pairs else (CustomJSON, IdentityConversations)
    own = [files(path) for path in args.data]
    if args.persona:
        own.append(persona(load_persona(args.persona), n=args.persona_examples))
    args.mixture = [] if args.data_only else args.mixture  # as the checkpoint's user_config records what was trained on
    train_tasks = build_tasks(args.mixture, "train", "--mixture") + own
    # no --val-mixture: the default specs; with --data-only (or --val-mixture alone): held out of the data
    val_specs = args.val_mixture if args.val_mixture is not None else [] if args.data_only else default_val
    val_tasks = build_tasks(val_specs, "test", "--val-mixture")
    train, val = train_val_mixtures(train_tasks, val_tasks, args.val_holdout, seed=args.seed)
    noun = "pairs" if pairs else "conversations"
    print0(f"training data: {len(train):,} {noun} from {len(train_tasks)} source(s) | validation: "
           f"{len(val):,} " + ("from --val-mixture" if val_tasks else f"held out of the training {noun}"))
    return train, val

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load task specs (validating their data) and show examples.",
                                     epilog=SPEC_HELP, formatter_class=HelpFormatter)
    parser.add_argument("specs", nargs="+", help="task specs, e.g. gsm8k:train custom:/data/mine.jsonl")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="default split")
    parser.add_argument("--show", type=int, default=1, help="how many examples of each task to print")
    parser.add_argument("--seed", type=int, default=0, help="which examples to show (random, seeded)")
    cli = parser.parse_args()
    # random examples, seeded: the same ones again for the same --seed
    rng = random.Random(cli.seed)
    for spec in cli.specs:
        with exit_on(ValueError, FileNotFoundError, DownloadError):  # a bad file: its file:line: field, not a traceback
            task = build_task(spec, cli.split)
        print(f"== {spec}: {task}")
        for index in rng.sample(range(len(task)), min(cli.show, len(task))):
            print(f"-- [{index}]\n{json.dumps(task[index], indent=2, ensure_ascii=False)}")
