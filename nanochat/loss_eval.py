"""
Bits per byte: the validation loss made independent of the tokenizer.

Mean loss per token depends on how much text a token holds, so models with different
vocabularies cannot be compared on it. Dividing the total loss (converted to bits) by the
number of UTF-8 bytes those tokens stand for can: bpb = sum(nats) / (ln 2 * sum(bytes)).
Special tokens (<|bos|> etc., 0 bytes) and ignored targets (-1) count in neither sum.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model(x, y, loss_reduction="none") -> per-token loss in nats, (B, T).
    batches: an iterator of (inputs, targets) or (inputs, targets, state) — `steps` are taken.
    token_bytes: int tensor (vocab_size,), bytes per token id, 0 for special tokens.
    Sums over all ranks when torch.distributed is initialised (every rank must call this).
    The caller picks the mode (model.eval()) and the autocast context.
    """
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    accumulate = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=accumulate, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)[:2]
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)
        targets = targets.reshape(-1)
        valid = targets >= 0
        num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (loss.to(accumulate) * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        raise ValueError("evaluate_bpb saw no bytes: every target was ignored or a special token")
    return total_nats.item() / (math.log(2) * total_bytes)
