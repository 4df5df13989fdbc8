"""
Muon: MomentUm Orthogonalized by Newton-Schulz, for the 2-D weight matrices of the
transformer blocks (embedding and lm_head use AdamW, see gpt.setup_optimizers).

One step per matrix W with gradient G:
    buf <- momentum * buf + (1 - momentum) * G            (EMA momentum)
    U   <- lerp(G, buf, momentum)  if nesterov  else buf
    W   <- W - lr * sqrt(max(1, rows/cols)) * NewtonSchulz(U)
NewtonSchulz replaces U = A S B^T by roughly A B^T: every direction of the update gets about
the same step size, which is what makes Muon train faster than Adam on hidden matrices.
The sqrt(rows/cols) factor keeps the per-element update size comparable for tall matrices.

Distributed contract (DistMuon, and DistAdamW in adamw.py):
  - the model is NOT wrapped in DDP: step() averages the gradients across ranks itself
    (reduce-scatter), updates the parameters this rank owns, and all-gathers the results, so
    every rank ends the step with identical parameters.
  - gradient clipping must see the averaged gradient. A loop that clips calls
    nanochat.distributed.all_reduce_gradients(model), clips, then
    opt.step(grads_already_averaged=True) so the optimizer does not reduce a second time.
    Clipping before the optimizer's own reduction would clip each rank's local gradient: wrong.
  - every optimizer here accepts grads_already_averaged (the single-process ones ignore it),
    so a loop calls them all the same way.
"""
import torch
import torch.distributed as dist

from nanochat.distributed import has_tensor_collectives

# Quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X. These widely published coefficients
# maximise the slope at 0 (fast growth of small singular values) at the price of not converging
# exactly to 1: after 5 steps singular values land roughly in [0.7, 1.2], which Muon tolerates.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_dtype(device):
    """bf16 where matmuls have bf16 hardware (CUDA; CPUs with AVX512-BF16/AMX, ~8x faster than
    fp32 there), fp32 elsewhere. bf16 is precise enough for an update direction."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):  # a torch build without the oneDNN query
            pass
    return torch.float32


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    Approximate orthogonalisation of G (..., rows, cols): same singular vectors, singular
    values pushed near 1. Batched over leading dims. Computed in `dtype` (default:
    newton_schulz_dtype(G.device)), which is also the dtype returned.
    """
    assert G.ndim >= 2
    a, b, c = NS_COEFFS
    shape = G.shape
    X = G.to(dtype or newton_schulz_dtype(G.device)).reshape(-1, *shape[-2:])  # (batch, rows, cols)
    tall = G.size(-2) > G.size(-1)
    # scale so the spectral norm is <= 1 (Frobenius norm bounds it), where the iteration converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        # the Gram matrix on the short side (the cheaper one), and a polynomial applied from that side:
        # p(X X^T) X == X p(X^T X), the same singular-value map. No transposed copies: X keeps its layout.
        # baddbmm folds the scaled sums into the matmuls (one pass less each; ~1.4x faster in bf16 on CPU)
        if tall:
            A = X.mT @ X
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, X, B, beta=a)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X.reshape(shape)


def _group_by_shape(params):
    """One param group per matrix shape, so each group is orthogonalised in one batched call."""
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor) or p.ndim != 2:
            raise ValueError("Muon takes a flat list of 2-D parameters (matrices); "
                             f"got {type(p).__name__} of shape {getattr(p, 'shape', None)}")
    by_shape = {}  # insertion order: identical on every rank for the same model
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return [dict(params=ps) for ps in by_shape.values()]


def _muon_update(params, grads, group, state, ns_dtype):
    """Momentum + Newton-Schulz + scaled update, batched over same-shape params."""
    momentum = group["momentum"]
    bufs = []
    for p in params:
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        bufs.append(st["momentum_buffer"])
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
    # stacked straight into the Newton-Schulz dtype (one pass), and added back from it with type
    # promotion into the fp32 params: no fp32 copies of the whole stack on the way in or out
    dtype = ns_dtype or newton_schulz_dtype(params[0].device)
    stacked = torch.empty((len(params), *params[0].shape), dtype=dtype, device=params[0].device)
    torch._foreach_copy_(list(stacked.unbind(0)), updates)
    X = zeropower_via_newtonschulz5(stacked, steps=group["ns_steps"], dtype=dtype)
    rows, cols = params[0].shape
    scale = max(1.0, rows / cols) ** 0.5
    torch._foreach_add_(params, list(X.unbind(0)), alpha=-group["lr"] * scale)


class Muon(torch.optim.Optimizer):
    """Single-process Muon. Params: a flat list of 2-D tensors (grouped by shape internally).
    ns_dtype: Newton-Schulz precision, None = newton_schulz_dtype(device) (bf16 where fast)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(_group_by_shape(params), defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None, grads_already_averaged=False):
        # grads_already_averaged: accepted for a uniform loop; one process has nothing to average
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                _muon_update(params, [p.grad for p in params], group, self.state, self.ns_dtype)
        return loss


class DistMuon(Muon):
    """
    Muon sharded across ranks: within each same-shape group, param i is owned by rank
    i % world_size. step(): reduce-scatter (average) the gradients so each rank receives the
    averaged gradient of the params it owns -> each rank runs momentum + Newton-Schulz on its
    own params only (the expensive part, now split world_size ways) -> all-gather the updated
    params. Momentum buffers exist only for owned params. Needs every param to have a .grad
    on every rank (true for the transformer matrices).
    Without reduce_scatter support (old Gloo): all_reduce the gradients instead, same result.
    """

    @torch.no_grad()
    def step(self, closure=None, grads_already_averaged=False):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, ws = dist.get_rank(), dist.get_world_size()
        tensor_collectives = has_tensor_collectives()

        # phase 1: launch every gradient reduction, so communication overlaps across groups
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for p in params:
                if p.grad is None:
                    raise RuntimeError(f"DistMuon: a parameter of shape {tuple(p.shape)} has no grad on rank {rank}; "
                                       "every rank must produce gradients for every matrix")
            owned, works = [], []
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                i = base + rank
                if grads_already_averaged:
                    g = params[i].grad if i < len(params) else None
                elif tensor_collectives:
                    grads = [p.grad for p in chunk]
                    grads += [torch.zeros_like(grads[0])] * (ws - len(chunk))  # pad the last chunk
                    g = torch.empty_like(grads[0])
                    stacked = torch.cat(grads)  # (ws * rows, cols): rank r receives rows block r
                    works.append(dist.reduce_scatter_tensor(g, stacked, op=dist.ReduceOp.SUM, async_op=True))
                else:
                    works += [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in chunk]
                    g = params[i].grad if i < len(params) else None
                if i < len(params):
                    owned.append((params[i], g))
            pending.append((group, owned, works))

        # phase 2: update owned params as their reductions land, then all-gather every chunk
        gathers = []
        for group, owned, works in pending:
            for w in works:
                w.wait()
            if owned:
                owned_params = [p for p, _ in owned]
                owned_grads = [g for _, g in owned]
                if not grads_already_averaged:
                    torch._foreach_mul_(owned_grads, 1.0 / ws)  # SUM -> mean
                _muon_update(owned_params, owned_grads, group, self.state, self.ns_dtype)
            params = group["params"]
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                outputs = list(chunk) + [torch.empty_like(chunk[0]) for _ in range(ws - len(chunk))]
                gathers.append(dist.all_gather(outputs, outputs[rank], async_op=True))
        for w in gathers:
            w.wait()
        return loss
