"""
Small collective helpers shared by the sharded optimizers (DistAdamW, DistMuon) and the
training loops.

Why this exists: with the sharded optimizers the model is NOT wrapped in DDP; the optimizers
average gradients across ranks inside step(). A training loop that clips gradients must clip
the *averaged* gradient, so it calls `all_reduce_gradients(model)` first, clips, and then
calls `opt.step(grads_already_averaged=True)` so the optimizers skip their own reduction.

Averaging is done as SUM followed by a multiply with 1/world_size (ReduceOp.AVG is not
available on every backend), identically on every path so results match bit for bit where
possible.
"""
import torch
import torch.distributed as dist


def dist_world_size():
    """world size of the default process group, 1 when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_distributed():
    return dist_world_size() > 1


# Set True (tests do) to force the portable path: all_reduce + list all_gather.
FORCE_PORTABLE_COLLECTIVES = False
_tensor_collectives_support = {}


def has_tensor_collectives():
    """
    Whether the default process group implements reduce_scatter_tensor and
    all_gather_into_tensor (NCCL does; Gloo only in recent PyTorch). Probed once with a tiny
    collective that every rank runs in the same order; an unsupported backend raises locally,
    before communicating, on every rank alike, so no rank is left waiting.
    """
    if FORCE_PORTABLE_COLLECTIVES:
        return False
    backend = dist.get_backend()
    if backend not in _tensor_collectives_support:
        supported = True
        if backend != "nccl":
            ws = dist.get_world_size()
            try:
                dist.reduce_scatter_tensor(torch.empty(1), torch.zeros(ws))
                dist.all_gather_into_tensor(torch.empty(ws), torch.zeros(1))
            except (RuntimeError, NotImplementedError, ValueError):
                supported = False
        _tensor_collectives_support[backend] = supported
    return _tensor_collectives_support[backend]


def _params_with_grad(model_or_params):
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return [p for p in params if p.grad is not None]


@torch.no_grad()
def all_reduce_gradients(model_or_params):
    """
    Average .grad of every parameter across ranks, in place. No-op in a single process.
    Returns True when a reduction happened (then step with grads_already_averaged=True).
    """
    ws = dist_world_size()
    if ws == 1:
        return False
    grads = [p.grad for p in _params_with_grad(model_or_params)]
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for w in works:
        w.wait()
    torch._foreach_mul_(grads, 1.0 / ws)
    return True
