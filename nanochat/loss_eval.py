"""
Bits per byte: the validation loss made independent of the tokenizer, so any two models compare.

    bpb = evaluate_bpb(model, val_loader, steps, get_token_bytes(device))
"""
import math
from itertools import islice

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import get_rank

@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """bpb = sum(nats) / (ln 2 * sum(bytes)) over `steps` batches of (inputs, targets[, state]), or fewer
    if `batches` ends first (a loader of one pass over a small split). token_bytes[id]: UTF-8 bytes of a
    token, 0 for specials. The caller sets eval mode and autocast."""
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    accumulate = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=accumulate, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    # a bar only for evaluations long enough to look like a hang (10 s), and on one rank
    for inputs, targets, *_ in tqdm(islice(batches, steps), total=steps, desc="eval", unit="batch", leave=False,
                                    delay=10, disable=get_rank() != 0):
        # model(x, y, loss_reduction="none"): the loss in nats of every target, (B, T)
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)
        targets = targets.reshape(-1)
        # special tokens (0 bytes) and ignored targets (-1) count in neither sum: a model's loss on
        # <|bos|> says nothing about how well it models text
        num_bytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (loss.to(accumulate) * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    # sums over all ranks when distributed: every rank must call this, and all get the same answer
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if (total_bytes := total_bytes.item()) == 0:
        raise ValueError("evaluate_bpb saw no bytes: no batch, or every target was ignored or a special token "
                         "(a validation split shorter than one row of the context gives no batch)")
    # per byte of text, not per token: how much text a token holds depends on the vocabulary
    return total_nats.item() / (math.log(2) * total_bytes)
