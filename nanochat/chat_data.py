"""
Conversations into training batches, for midtraining, SFT and DPO (and the data flags that
midtraining and SFT share: which conversations, and which are held out for validation).

Two batch shapes:
- packed (midtraining): rows of exactly T+1 tokens filled best-fit with whole rendered
  conversations, every row starting at a conversation's <|bos|>, like the pretraining loader;
- padded (SFT, DPO): one conversation (or answer) per row, padded to the longest row of the
  micro-batch; padding and unsupervised positions get target -1.

Loss normalisation (a known trap): a micro-batch of chat data holds a varying number of
supervised tokens, so "mean loss per micro-batch, averaged over micro-batches and ranks"
weights a token in a sparse micro-batch more than one in a dense micro-batch, and makes one
process with gradient accumulation differ from DDP. StepBatches instead reads one whole
optimizer step ahead, counts the supervised tokens (or pairs) of all its micro-batches on all
ranks, and gives each micro-batch the factor that turns its *sum* of losses into its share of
the step's mean: loss_scale = grad_accum * world_size / step_count. The Trainer divides by
grad_accum and the optimizers average over ranks, so every supervised token of the step
weighs exactly 1/step_count, whatever the layout. A step without any supervised token
contributes 0 (never 0/0 = NaN).

Resumable exactly: the state yielded with a batch is small JSON (where the stream continues,
which conversations sit in the packing buffer), and restarting from it gives the same batches.
"""
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import print0
from nanochat.dataloader import BestFitBuffer

STATE_VERSION = 1


def _state_for_rank(state, rank, world_size, what):
    """The Trainer stores one state per rank (a list) under DDP, a single dict otherwise."""
    if isinstance(state, (list, tuple)):
        if len(state) != world_size:
            raise ValueError(f"cannot resume the {what}: the checkpoint holds {len(state)} ranks, "
                             f"this run has {world_size}")
        state = state[rank]
    if not isinstance(state, dict) or state.get("kind") != what:
        raise ValueError(f"cannot resume: the checkpoint's loader state is not a {what} state")
    return state


def _check_identity(state, identity, what):
    mismatched = {k: (state.get(k), v) for k, v in identity.items() if state.get(k) != v}
    if mismatched:
        raise ValueError(f"cannot resume the {what} exactly, it was saved with different settings or data: "
                         + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatched.items()))


def epoch_permutation(num_items, epoch, seed):
    return np.random.default_rng([seed, epoch]).permutation(num_items)


# -----------------------------------------------------------------------------
# Padded rows (SFT, DPO)

def masked_targets(ids, mask):
    """Next-token targets of a rendered row: ids[i+1] where mask[i+1] is 1, else -1."""
    return [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def collate_padded(rows, pad_id, device="cpu"):
    """
    rows: list of (ids, mask). Returns inputs and targets (B, L-1), L = the longest row:
    inputs = ids[:-1] padded with pad_id, targets = masked_targets padded with -1.
    """
    length = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        targets[i, :n] = torch.tensor(masked_targets(ids, mask), dtype=torch.long)
    pin = torch.device(device).type == "cuda"
    if pin:
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)


class MicroBatchOrder:
    """
    The global stream of micro-batches over `num_items` examples: epoch e visits a seeded
    permutation, cut into micro-batches of `batch_size` (the last one of an epoch may be
    short). Global micro-batch g goes to rank g % world_size, so a step of one process with
    grad_accum = k * world_size reads the very micro-batches that world_size ranks with
    grad_accum = k read together (this is what makes DDP == accumulation testable).
    """

    def __init__(self, num_items, batch_size, seed=42):
        if num_items < 1:
            raise ValueError("no examples to train on")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.per_epoch = -(-num_items // batch_size)
        self._perm = (None, None)

    def indices(self, g):
        epoch, j = divmod(g, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.num_items, epoch, self.seed))
        return self._perm[1][j * self.batch_size:(j + 1) * self.batch_size].tolist(), epoch


def padded_batches(task, render, batch_size, *, rank=0, world_size=1, seed=42, resume_state=None,
                   what="padded batches"):
    """
    An iterator of (items, state), forever: items = [(index, render(task[index]))] for this
    rank's next micro-batch (see MicroBatchOrder); `render` makes a row of an example. A resume
    state that does not fit is a ValueError here, at the call, not at the first batch.
    """
    order = MicroBatchOrder(len(task), batch_size, seed)
    identity = {"kind": what, "version": STATE_VERSION, "num_items": len(task), "batch_size": batch_size,
                "seed": seed, "world_size": world_size}
    g = rank
    if resume_state:
        state = _state_for_rank(resume_state, rank, world_size, what)
        _check_identity(state, identity, what)
        g = state["next"]

    def generate(g):
        while True:
            indices, epoch = order.indices(g)
            g += world_size
            yield [(i, render(task[i])) for i in indices], dict(identity, next=g, epoch=epoch)
    return generate(g)


# -----------------------------------------------------------------------------
# Packed rows (midtraining)

class PackedConversations:
    """
    An iterator of (batch, state), forever: batch = {"inputs", "targets"} (B, T) on `device`,
    with "count" (supervised targets) and "tokens" (B * T) for StepBatches. Each row is T+1
    tokens of whole rendered conversations packed best-fit from a buffer of `buffer_size` (the
    longest that fits, again and again; when none fits, the shortest is cropped to fill the row),
    so every row starts with <|bos|> and nothing is padded. A conversation longer than a row is
    cut to one row. loss_on: "all" trains on every token (nanochat's midtraining), "assistant"
    only on the supervised tokens of the rendering (-1 elsewhere). Rank r reads conversations
    r, r + world_size, ... of each epoch's seeded permutation of `task`.
    """

    def __init__(self, task, tokenizer, B, T, *, rank=0, world_size=1, seed=42, loss_on="all",
                 buffer_size=256, resume_state=None, device="cpu", what="packed conversations"):
        if loss_on not in ("all", "assistant"):
            raise ValueError(f"loss_on must be 'all' or 'assistant', got {loss_on!r}")
        if len(task) < 1:
            raise ValueError("no conversations to train on")
        self.task, self.tokenizer, self.B, self.row_len = task, tokenizer, B, T + 1
        self.rank, self.world_size, self.seed, self.loss_on = rank, world_size, seed, loss_on
        self.buffer_size, self.device = buffer_size, device
        self.identity = {"kind": what, "version": STATE_VERSION, "num_items": len(task), "T": T, "seed": seed,
                         "world_size": world_size, "buffer_size": buffer_size, "loss_on": loss_on}
        self._perm = (None, None)
        self.buffer = BestFitBuffer()
        self.cursor = [0, rank % len(task)]  # (epoch, position) of the next conversation this rank reads
        self.stats = {"rows": 0, "cropped": 0}  # cropped = tokens of conversations cut off to fill a row
        if resume_state:  # checked here, when the loader is made, not at the first batch
            state = _state_for_rank(resume_state, rank, world_size, what)
            _check_identity(state, self.identity, what)
            self.cursor, self.stats = list(state["cursor"]), dict(state["stats"])
            for ref in state["buffer"]:
                self.buffer.add(self._render(*ref), tuple(ref))

    def _render(self, epoch, position):
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(len(self.task), epoch, self.seed))
        conversation = self.task[int(self._perm[1][position])]
        ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=self.row_len)
        return list(zip(ids, mask))

    def _fill_buffer(self):
        while len(self.buffer) < self.buffer_size:
            epoch, position = self.cursor
            self.buffer.add(self._render(epoch, position), (epoch, position))
            position += self.world_size
            if position >= len(self.task):  # next epoch, from this rank's first position again
                epoch, position = epoch + 1, self.rank % len(self.task)
            self.cursor = [epoch, position]

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.B):
            row = []
            while len(row) < self.row_len:
                self._fill_buffer()
                room = self.row_len - len(row)
                tokens = self.buffer.pop_largest_fitting(room)
                if tokens is None:
                    tokens = self.buffer.pop_shortest()
                    self.stats["cropped"] += len(tokens) - room
                    tokens = tokens[:room]
                row.extend(tokens)
            rows.append(row)
        self.stats["rows"] += self.B
        ids = torch.tensor([[t for t, _ in row] for row in rows], dtype=torch.long)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        if self.loss_on == "assistant":
            mask = torch.tensor([[m for _, m in row] for row in rows], dtype=torch.bool)
            targets[~mask[:, 1:]] = -1
        state = dict(self.identity, cursor=list(self.cursor), buffer=self.buffer.refs(), stats=dict(self.stats))
        batch = {"inputs": inputs.to(self.device), "targets": targets.to(self.device),
                 "count": int((targets >= 0).sum()), "tokens": inputs.numel()}
        return batch, state


# -----------------------------------------------------------------------------
# One optimizer step at a time, with the step's supervised count known to every micro-batch

class StepBatches:
    """
    The Trainer's next_batch(). Pulls `grad_accum` micro-batches at the start of each step from
    `micro_batches` (an iterator of (batch dict, state); each batch has "count", the number of
    supervised tokens or pairs, and "tokens", the positions the model processes), all-reduces
    the step's totals over ranks, and sets batch["loss_scale"] (see the module docstring).
    `step_tokens` is the step's processed token count over all ranks, for tok/s.
    """

    def __init__(self, micro_batches, grad_accum, world_size=1, device="cpu"):
        self.micro_batches, self.grad_accum, self.world_size = micro_batches, grad_accum, world_size
        self.device = device
        self.pending = deque()
        self.step_count = 0
        self.step_tokens = 0

    def __call__(self):
        if not self.pending:
            step = [next(self.micro_batches) for _ in range(self.grad_accum)]
            totals = torch.tensor([[b["count"], b["tokens"]] for b, _ in step], dtype=torch.float64).sum(0)
            if self.world_size > 1:
                totals = totals.to(self.device)
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            self.step_count, self.step_tokens = int(totals[0].item()), int(totals[1].item())
            scale = self.grad_accum * self.world_size / max(self.step_count, 1)
            for batch, _ in step:
                batch["loss_scale"] = scale
            self.pending.extend(step)
        return self.pending.popleft()


def scaled_token_loss(model, batch):
    """The micro-batch's share of the step's mean loss per supervised token."""
    return model(batch["inputs"], batch["targets"], loss_reduction="sum") * batch["loss_scale"]


def train_val_mixtures(train_tasks, val_tasks=None, holdout=500, seed=42):
    """
    (train, val) TaskMixtures. Without val_tasks, the first `holdout` examples of the shuffled
    training mixture (at most a tenth of it) are held out for validation and not trained on.
    """
    from tasks.common import TaskMixture
    if not train_tasks:
        raise ValueError("nothing to train on (with --data-only, give --data files or a --persona)")
    if val_tasks:
        return TaskMixture(train_tasks, seed=seed), TaskMixture(val_tasks, seed=seed)
    total = len(TaskMixture(train_tasks, seed=seed))
    held = min(holdout, total // 10)
    if held < 1:
        raise ValueError(f"only {total} training example(s): too few to hold out a validation set "
                         "(give more data, or a validation set explicitly)")
    return TaskMixture(train_tasks, seed=seed, start=held), TaskMixture(train_tasks, seed=seed, stop=held)


# -----------------------------------------------------------------------------
# The data flags of mid_train and chat_sft

def add_chat_data_args(parser, default_mixture, default_val, persona_examples):
    g = parser.add_argument_group("data")
    g.add_argument("--mixture", nargs="*", default=default_mixture,
                   help="training task specs (grammar below; a local copy of a default dataset: e.g. "
                        "'gsm8k:train:/data/gsm8k_train_chat.jsonl')")
    g.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="your conversations (.jsonl/.parquet, messages or Alpaca); repeatable; added to --mixture")
    g.add_argument("--data-only", action="store_true", help="train only on --data (and --persona), not --mixture")
    g.add_argument("--persona", default=None, help="persona.json: add who-am-I conversations (tasks/identity.py)")
    g.add_argument("--persona-examples", type=int, default=persona_examples, help="identity conversations to add")
    g.add_argument("--val-mixture", nargs="*", default=None,
                   help=f"validation task specs (default: {' '.join(default_val)}; with --data-only, or when "
                        "given with no specs: --val-holdout conversations held out of the training data)")
    g.add_argument("--val-holdout", type=int, default=500,
                   help="training conversations held out for validation when there is no --val-mixture "
                        "(at most a tenth of them)")
    g.add_argument("--max-seq-len", type=int, default=0, help="tokens per row (0: the model's context length)")
    g.add_argument("--num-epochs", type=float, default=1.0,
                   help="passes over the training data (used when --num-iterations=-1)")
    return parser


def build_chat_tasks(args, default_val, own=None, noun="conversations"):
    """(train, val) mixtures from the data flags. Every file is read and checked here, before any
    model is loaded: a bad record stops the run naming file:line: field. `own`: the user's own
    tasks (default: --data conversation files and --persona conversations; DPO passes its pairs)."""
    from tasks.common import build_task
    from tasks.customjson import CustomJSON
    from tasks.identity import IdentityConversations, load_persona
    # the user's own files first: a mistake there should stop us before any download
    if own is None:
        own = [CustomJSON(path) for path in args.data]
        if args.persona:
            own.append(IdentityConversations(load_persona(args.persona), n=args.persona_examples))
    train_tasks = ([] if args.data_only else [build_task(spec, "train") for spec in args.mixture]) + own
    val_specs = args.val_mixture
    if val_specs is None:
        val_specs = [] if args.data_only else default_val
    val_tasks = [build_task(spec, "test") for spec in val_specs]
    train, val = train_val_mixtures(train_tasks, val_tasks, args.val_holdout, seed=args.seed)
    print0(f"training data: {len(train):,} {noun} from {len(train_tasks)} source(s) | validation: "
           f"{len(val):,} " + ("from --val-mixture" if val_tasks else f"held out of the training {noun}"))
    return train, val
