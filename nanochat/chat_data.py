"""Conversations into training batches: packed rows (midtraining) or padded rows (SFT, DPO: one conversation
per row), and StepBatches, which weighs every supervised token of an optimizer step the same."""
import functools

import numpy as np
import torch
import torch.distributed as dist

from nanochat.dataloader import BestFitBuffer, resumed_state

# Loader states are small JSON in the checkpoint's meta, so that a resumed run sees the very same batches
STATE_VERSION = 1

@functools.lru_cache(maxsize=8)  # a loader reads one epoch for many batches: each permutation is made once
def epoch_permutation(num_items, epoch, seed):
    return np.random.default_rng([seed, epoch]).permutation(num_items)

# -----------------------------------------------------------------------------
# Padded rows (SFT, DPO)
def collate_padded(rows, pad_id, device="cpu"):
    """(inputs, targets) of (B, L-1), L the longest of the (ids, mask) rows, padded with pad_id and -1."""
    length = max(len(ids) for ids, _ in rows) - 1
    inputs, targets = (torch.full((len(rows), length), fill, dtype=torch.long) for fill in (pad_id, -1))
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        # next-token targets: ids[j+1] where mask[j+1] is 1 (the model is to produce it), else -1 (ignored)
        targets[i, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])], dtype=torch.long)
    # page-locked host memory lets the copy to the GPU run asynchronously with compute
    if pin := torch.device(device).type == "cuda":
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)

def padded_batches(task, render, batch_size, *, rank=0, world_size=1, seed=42, resume_state=None, what="padded batches"):
    """(items, state) forever: items = [(index, render(task[index]))] of this rank's next micro-batch."""
    # Each epoch a seeded permutation of the examples, cut into micro-batches of batch_size (the last may be
    # short). Global micro-batch g goes to rank g % world_size, so a step of one process with grad_accum
    # = k * world_size reads the very micro-batches that world_size ranks with grad_accum = k read
    # together: that is what makes DDP == gradient accumulation (and testable)
    if len(task) < 1:
        raise ValueError("no examples to train on")
    per_epoch = -(-len(task) // batch_size)  # micro-batches per epoch (ceil)
    identity = {"kind": what, "version": STATE_VERSION, "num_items": len(task), "batch_size": batch_size,
                "seed": seed, "world_size": world_size}
    # a resume state that does not fit is a ValueError here, at the call, not at the first batch
    g = resumed_state(resume_state, rank, identity, what)["next"] if resume_state else rank
    def generate(g):
        while True:
            epoch, j = divmod(g, per_epoch)
            indices = epoch_permutation(len(task), epoch, seed)[j * batch_size:(j + 1) * batch_size].tolist()
            g += world_size
            yield [(i, render(task[i])) for i in indices], dict(identity, next=g, epoch=epoch)
    return generate(g)

# -----------------------------------------------------------------------------
# Packed rows (midtraining)
class PackedConversations:
    """(batch, state) forever: batch = {"inputs", "targets"} (B, T), "count" (supervised targets) and "tokens"."""
    # Rows of T+1 tokens packed best-fit with whole conversations: each row starts with a <|bos|>,
    # nothing is padded, as in pretraining. loss_on: "all" tokens, or only the "assistant"'s.
    def __init__(self, task, tokenizer, B, T, *, rank=0, world_size=1, seed=42, loss_on="all",
                 buffer_size=256, resume_state=None, device="cpu", what="packed conversations"):
        if loss_on not in ("all", "assistant"):
            raise ValueError(f"loss_on must be 'all' or 'assistant', got {loss_on!r}")
        if len(task) < 1:
            raise ValueError("no conversations to train on")
        self.task, self.tokenizer, self.B, self.row_len, self.buffer_size = task, tokenizer, B, T + 1, buffer_size
        self.rank, self.world_size, self.seed, self.loss_on, self.device = rank, world_size, seed, loss_on, device
        self.identity = {"kind": what, "version": STATE_VERSION, "num_items": len(task), "T": T, "seed": seed,
                         "world_size": world_size, "buffer_size": buffer_size, "loss_on": loss_on}
        self.buffer = BestFitBuffer(self.row_len)
        # rank r reads conversations r, r + world_size, ... of each epoch's seeded permutation
        self.cursor = [0, rank % len(task)]  # (epoch, position) of the next conversation this rank reads
        self.stats = {"rows": 0, "cropped": 0}  # cropped = tokens of conversations cut off to fill a row
        if resume_state:  # checked here, when the loader is made, not at the first batch
            state = resumed_state(resume_state, rank, self.identity, what)
            self.cursor, self.stats = list(state["cursor"]), dict(state["stats"])
            for ref in state["buffer"]:
                self.buffer.add(self._render(*ref), tuple(ref))
    def _render(self, epoch, position):
        conversation = self.task[int(epoch_permutation(len(self.task), epoch, self.seed)[position])]
        return list(zip(*self.tokenizer.render_conversation(conversation, max_tokens=self.row_len)))  # (id, mask) pairs
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
                # the longest conversation that fits, again and again; when none fits, the
                # shortest is cropped to fill the row (a conversation longer than a row: cut to one)
                self._fill_buffer()
                row.extend(self.buffer.take(self.row_len - len(row), self.stats))
            rows.append(row)
        self.stats["rows"] += self.B
        ids = torch.tensor([[t for t, _ in row] for row in rows], dtype=torch.long)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        if self.loss_on == "assistant":
            mask = torch.tensor([[m for _, m in row] for row in rows], dtype=torch.bool)
            targets[~mask[:, 1:]] = -1
        batch = {"inputs": inputs.to(self.device), "targets": targets.to(self.device),
                 "count": int((targets >= 0).sum()), "tokens": inputs.numel()}
        return batch, dict(self.identity, cursor=list(self.cursor), buffer=self.buffer.refs(), stats=dict(self.stats))

# -----------------------------------------------------------------------------
# One optimizer step at a time, with the step's supervised count known to every micro-batch
class StepBatches:
    """The micro-batches of one optimizer step at a time, each with "loss_scale", the factor that turns its
    *sum* of losses into its share of the step's mean over every supervised token."""
    # Why (a known trap): chat micro-batches hold different numbers of supervised tokens, so "mean per micro-batch,
    # averaged over micro-batches and ranks" weighs a token of a sparse micro-batch more than one of a dense one, and
    # one process with accumulation then differs from DDP. Here the step's count is summed over its micro-batches and
    # ranks first; with loss_scale = grad_accum * world_size / count, the loop's division by grad_accum and the
    # optimizer's average over ranks give every token weight 1 / count. No token: 0, never NaN.
    def __init__(self, micro_batches, grad_accum, world_size=1, device="cpu"):
        self.micro_batches, self.grad_accum, self.world_size = micro_batches, grad_accum, world_size
        self.device = torch.device(device)
        self.step_tokens = 0  # positions this rank processes in the step (host int, for tok/s)
    def next_step(self):
        """[(batch, loader state)] * grad_accum. No host sync: the count stays on the device."""
        step = [next(self.micro_batches) for _ in range(self.grad_accum)]
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        count = torch.tensor(sum(b["count"] for b, _ in step), dtype=dtype).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
        # a true division in float64 (then rounded to fp32), as the old host-side float did
        numerator = torch.tensor(float(self.grad_accum * self.world_size), dtype=dtype, device=self.device)
        scale = (numerator / count.clamp(min=1)).float()
        self.step_tokens = sum(b["tokens"] for b, _ in step)
        for batch, _ in step:
            batch["loss_scale"] = scale
        return step

def scaled_token_loss(model, batch):
    """The micro-batch's share of the step's mean loss per supervised token."""
    return model(batch["inputs"], batch["targets"], loss_reduction="sum") * batch["loss_scale"]
