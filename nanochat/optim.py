"""One optimizer for the model: param groups of kind "adamw" (embedding, lm_head) or "muon" (the block matrices)
in one MuonAdamW, or in DistMuonAdamW, which shards both across ranks (build_optimizer picks)."""
import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.adamw import adamw

# Quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X. These widely published coefficients
# maximise the slope at 0 (fast growth of small singular values) at the price of not converging
# exactly to 1: after 5 steps singular values land roughly in [0.7, 1.2], which Muon tolerates.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932): a different quintic per step, each the minimax-best one for
# where the step before left the singular values, so 5 steps land them much closer to 1. These are the published
# 5-step coefficients, computed with a 2 % safety margin: the input is scaled by 1 / (1.02 ||G||_F) to match.
POLAR_EXPRESS_COEFFS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
# what a group of each kind may say, and says unless told. Muon's last three: the Newton-Schulz schedule ("quintic"
# or "polar"), NorMuon's second-moment beta (0 = off) and the cautious weight decay (0 = off)
DEFAULTS = dict(adamw=dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                muon=dict(momentum=0.95, nesterov=True, ns_steps=5, ns="quintic", normuon_beta2=0.0, weight_decay=0.0))
# Set True (tests do) to force the portable path: all_reduce + list all_gather.
FORCE_PORTABLE_COLLECTIVES = False

def dist_world_size():
    """World size of the default process group, 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

def has_tensor_collectives():
    """Whether the process group has reduce_scatter_tensor and all_gather_into_tensor (NCCL; Gloo only lately)."""
    backend = dist.get_backend()
    return not FORCE_PORTABLE_COLLECTIVES and (backend == "nccl" or _probe_tensor_collectives(backend))

@functools.cache
def _probe_tensor_collectives(backend):
    # probed once with a tiny collective that every rank runs in the same order; an unsupported
    # backend raises locally, before communicating, on every rank alike: no rank is left waiting
    ws = dist.get_world_size()
    try:
        dist.reduce_scatter_tensor(torch.empty(1), torch.zeros(ws))
        dist.all_gather_into_tensor(torch.empty(ws), torch.zeros(1))
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False

@torch.no_grad()
def all_reduce_gradients(model):
    """Average every .grad of model across ranks, in place; True when it did (then step(grads_averaged=True))."""
    # for gradient clipping, which must see the averaged gradient (clipping each rank's local one is wrong);
    # a SUM then * 1/world_size, as in the optimizer: ReduceOp.AVG is not on every backend
    if (ws := dist_world_size()) == 1:
        return False
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for w in works:
        w.wait()
    torch._foreach_mul_(grads, 1.0 / ws)
    return True

def newton_schulz_dtype(device):
    """bf16 where matmuls have bf16 hardware (CUDA; CPUs with AVX512-BF16/AMX), fp32 elsewhere."""
    # bf16 is ~8x faster than fp32 on such CPUs, and precise enough for an update direction
    if device.type == "cpu":
        with contextlib.suppress(AttributeError, RuntimeError):  # a torch build without the oneDNN query: fp32
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32

def newton_schulz(G, steps=5, dtype=None, schedule="quintic"):
    """G (..., rows, cols) approximately orthogonalised (same singular vectors, singular values near 1), in dtype;
    schedule "quintic" (NS_COEFFS every step) or "polar" (POLAR_EXPRESS_COEFFS, the last one repeated past 5)."""
    assert G.ndim >= 2 and schedule in ("quintic", "polar")
    X = G.to(dtype or newton_schulz_dtype(G.device)).reshape(-1, *G.shape[-2:])  # (batch, rows, cols)
    tall = G.size(-2) > G.size(-1)
    # scale so the spectral norm is <= 1 (Frobenius norm bounds it), where the iteration converges
    margin, eps = (1.02, 1e-6) if schedule == "polar" else (1.0, 1e-7)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + eps)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, 4)] if schedule == "polar" else NS_COEFFS
        # the Gram matrix on the short side (the cheaper one), and a polynomial applied from that side:
        # p(X X^T) X == X p(X^T X), the same singular-value map. No transposed copies: X keeps its layout.
        # baddbmm folds the scaled sums into the matmuls (one pass less each; ~1.4x faster in bf16 on CPU)
        A = X.mT @ X if tall else X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X.reshape(G.shape)

def _param_groups(groups):
    """The groups with their kind's defaults and "initial_lr" (for LR schedules); Muon groups split by shape."""
    out = []
    for group in groups:
        if group.get("kind") not in DEFAULTS:
            raise ValueError(f"every param group needs kind 'adamw' or 'muon', got {group.get('kind')!r}")
        group = {**DEFAULTS[group["kind"]], **group, "params": list(group["params"]), "initial_lr": group["lr"]}
        if group["kind"] == "adamw":
            out.append(group)
            continue
        by_shape = {}  # insertion order: identical on every rank for the same model
        for p in group["params"]:
            if not isinstance(p, torch.Tensor) or p.ndim != 2:
                raise ValueError("Muon takes 2-D parameters (matrices); "
                                 f"got {type(p).__name__} of shape {getattr(p, 'shape', None)}")
            by_shape.setdefault(tuple(p.shape), []).append(p)
        # one group per shape, so each shape is orthogonalised in one batched call
        out += [dict(group, params=ps) for ps in by_shape.values()]
    return out

class MuonAdamW(torch.optim.Optimizer):
    """AdamW and Muon in one process, over param groups of kind "adamw" or "muon" (2-D params only)."""
    def __init__(self, groups, ns_dtype=None):
        super().__init__(_param_groups(groups), {})
        self.ns_dtype = ns_dtype  # Newton-Schulz precision, None = newton_schulz_dtype(device)
    @torch.no_grad()
    def step(self, grads_averaged=False):
        # grads_averaged: accepted for a uniform loop; one process has nothing to average
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["kind"] == "adamw":
                self._adamw(group, params, params, [p.grad for p in params])
            elif params:
                self._muon(group, params, [p.grad for p in params])
    def _adamw(self, group, params, tensors, grads):
        """One AdamW step of `tensors` (the params, or this rank's flat slices of them); state kept per param."""
        # torch.optim.AdamW's own arithmetic (its functional form), so results are its results to the bit;
        # one fused kernel per group on CUDA and CPU (5x faster than the op-by-op loop on CPU)
        fused = tensors[0].device.type in ("cuda", "cpu")
        states = [self.state[p] for p in params]
        for st, t in zip(states, tensors):
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(t), torch.zeros_like(t)
            if not torch.is_tensor(st.get("step")):  # new, or the Python int of an old sharded checkpoint
                # kept as torch.optim.AdamW keeps it: on the device for the fused kernel, else on the CPU
                st["step"] = torch.tensor(float(st.get("step", 0)), dtype=torch.float32,
                                          device=t.device if fused else "cpu")
        beta1, beta2 = group["betas"]
        adamw(tensors, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
              [st["step"] for st in states], fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    def _muon(self, group, params, grads):
        """Momentum, Newton-Schulz and the scaled update, batched over same-shape params."""
        # Muon (MomentUm Orthogonalized by Newton-Schulz), per matrix W with gradient G:
        #   buf <- momentum * buf + (1 - momentum) * G;  U <- lerp(G, buf, momentum) if nesterov else buf
        #   W <- W - lr * sqrt(max(1, rows/cols)) * NewtonSchulz(U)
        # NewtonSchulz replaces U = A S B^T by roughly A B^T: every direction of the update gets about the
        # same step size, which is what makes Muon train faster than Adam on hidden matrices
        momentum = group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        # stacked straight into the Newton-Schulz dtype (one pass), and added back from it with type
        # promotion into the fp32 params: no fp32 copies of the whole stack on the way in or out
        dtype = self.ns_dtype or newton_schulz_dtype(params[0].device)
        stacked = torch.empty((len(params), *params[0].shape), dtype=dtype, device=params[0].device)
        torch._foreach_copy_(list(stacked.unbind(0)), updates)
        # .get: the groups of a checkpoint from before these keys come back without them
        X = newton_schulz(stacked, steps=group["ns_steps"], dtype=dtype, schedule=group.get("ns", "quintic"))
        if group.get("normuon_beta2", 0.0) > 0:
            X = self._normuon(params, X, group["normuon_beta2"])
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5  # keeps the per-element update size comparable for tall matrices
        updates = list(X.unbind(0))
        if wd := group.get("weight_decay", 0.0):
            # cautious weight decay: shrink an entry only where the update itself pulls it toward zero (update and
            # weight of one sign); elsewhere decay would fight the gradient. Scaled by the scheduled LR
            for p, u in zip(params, updates):
                p.sub_(p * (u * p > 0), alpha=group["lr"] * wd)
        torch._foreach_add_(params, updates, alpha=-group["lr"] * scale)
    def _normuon(self, params, X, beta2):
        """NorMuon (arXiv 2510.05491): each neuron's (row's; a wide matrix's column's) part of the orthogonalised X
        (n, rows, cols) over the running RMS of its entries, which evens out how far neurons move; then X rescaled
        to its norm before, so the LR keeps its meaning (fp32)."""
        X = X.float()
        neuron_dim = -1 if X.size(-2) >= X.size(-1) else -2  # the statistic runs along the long side
        for p in params:
            if "second_moment" not in self.state[p]:
                self.state[p]["second_moment"] = torch.zeros_like(X[0].mean(dim=neuron_dim, keepdim=True))
        v = torch.stack([self.state[p]["second_moment"] for p in params])
        v.lerp_(X.square().mean(dim=neuron_dim, keepdim=True), 1 - beta2)
        torch._foreach_copy_([self.state[p]["second_moment"] for p in params], list(v.unbind(0)))
        norm = X.norm(dim=(-2, -1), keepdim=True)
        X = X * v.clamp_min(1e-10).rsqrt()
        return X * (norm / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

def _padded_flat(t, ws):
    """t (detached) viewed flat and zero-padded to a multiple of ws: a copy only when padding is needed."""
    pad = -t.numel() % ws
    return F.pad(t.detach().reshape(-1), (0, pad)) if pad else t.detach().view(-1)

def _launch_reduce(full):
    """Start summing `full` over ranks, this rank wanting only its block of dim 0: (that block, the work)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    if has_tensor_collectives():
        mine = torch.empty_like(full.chunk(ws)[rank])
        return mine, dist.reduce_scatter_tensor(mine, full, op=dist.ReduceOp.SUM, async_op=True)
    # no reduce_scatter on this backend (old Gloo): sum everything, keep the block
    return full.chunk(ws)[rank], dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)

# The model is NOT wrapped in DDP: step() averages the gradients across ranks itself (reduce-scatter),
# updates the share this rank owns, and all-gathers the results, so every rank ends identical.
# AdamW params are viewed flat and cut into world_size equal slices (zero-padded when numel does not
# divide): rank r owns slice r. Muon matrices are owned whole, round-robin within each same-shape group
# (param i by rank i % world_size), which splits the Newton-Schulz work world_size ways.
# Optimizer state exists only for the owned share: checkpoints are per rank, resumed at the same world size.
class DistMuonAdamW(MuonAdamW):
    """MuonAdamW sharded across ranks (ZeRO-2 style): each rank updates, and keeps state for, its share only."""
    @torch.no_grad()
    def step(self, grads_averaged=False):
        # grads_averaged=True: all_reduce_gradients already averaged every gradient (to clip the global one)
        # 1. launch the gradient reductions of every group, both kinds, before waiting on any: they overlap
        launched = [(group, *(self._launch_adamw if group["kind"] == "adamw" else self._launch_muon)(group, grads_averaged))
                    for group in self.param_groups]
        # 2. group by group, as its reductions land: update this rank's share, launch its all-gathers
        gathers = []
        for group, owned, works in launched:
            for work in works:
                work.wait()
            if owned and not grads_averaged:  # (a shape with fewer matrices than ranks leaves some owning none)
                torch._foreach_mul_([g for _, g in owned], 1.0 / dist.get_world_size())  # SUM -> mean
            gathers += (self._update_adamw if group["kind"] == "adamw" else self._update_muon)(group, owned)
        # 3. only now wait for the gathers, all in flight; a padded AdamW param copies its result back
        for work, p, padded in gathers:
            work.wait()
            if padded is not None:
                p.detach().view(-1).copy_(padded[:p.numel()])
    def _launch_adamw(self, group, grads_averaged):
        """([(param, this rank's slice of its gradient)], the reductions in flight)."""
        rank, ws = dist.get_rank(), dist.get_world_size()
        flats = [(p, _padded_flat(p.grad, ws)) for p in group["params"] if p.grad is not None]
        if grads_averaged:  # nothing to reduce: this rank's slices as they are
            return [(p, flat.chunk(ws)[rank]) for p, flat in flats], []
        reduced = [(p, *_launch_reduce(flat)) for p, flat in flats]
        return [(p, g) for p, g, _ in reduced], [work for _, _, work in reduced]
    def _update_adamw(self, group, owned):
        """AdamW on this rank's slices; returns the all-gathers of the slices back into the full params."""
        rank, ws = dist.get_rank(), dist.get_world_size()
        flats = [_padded_flat(p, ws) for p, _ in owned]
        slices = [flat.chunk(ws)[rank] for flat in flats]
        if owned:
            self._adamw(group, [p for p, _ in owned], slices, [g for _, g in owned])
        gathers = []
        for (p, _), flat, mine in zip(owned, flats, slices):
            # in place: this rank's slice already sits at its offset of the output
            work = (dist.all_gather_into_tensor(flat, mine, async_op=True) if has_tensor_collectives()
                    else dist.all_gather(list(flat.chunk(ws)), mine, async_op=True))
            gathers.append((work, p, flat if flat.numel() != p.numel() else None))
        return gathers
    def _launch_muon(self, group, grads_averaged):
        """([(owned matrix, its gradient)], the reductions in flight), one reduction per world_size matrices."""
        rank, ws = dist.get_rank(), dist.get_world_size()
        params = group["params"]
        owned, works = [], []
        for base in range(0, len(params), ws):
            chunk = params[base:base + ws]
            if any(p.grad is None for p in chunk):
                raise RuntimeError(f"DistMuonAdamW: a matrix of shape {tuple(chunk[0].shape)} has no grad on rank "
                                   f"{rank}; every rank must produce gradients for every matrix")
            grads = [p.grad for p in chunk] + [torch.zeros_like(chunk[0])] * (ws - len(chunk))  # pad the last chunk
            # reduced as one (ws * rows, cols) stack: rank r receives the rows block r, matrix base + r's gradient
            g, work = (grads[rank], None) if grads_averaged else _launch_reduce(torch.cat(grads))
            works += [work] if work is not None else []
            if rank < len(chunk):
                owned.append((chunk[rank], g))
        return owned, works
    def _update_muon(self, group, owned):
        """Muon on the matrices this rank owns; returns the all-gathers that hand every rank every matrix."""
        rank, ws = dist.get_rank(), dist.get_world_size()
        if owned:
            self._muon(group, [p for p, _ in owned], [g for _, g in owned])
        params, gathers = group["params"], []
        for base in range(0, len(params), ws):
            chunk = params[base:base + ws]
            outputs = list(chunk) + [torch.empty_like(chunk[0]) for _ in range(ws - len(chunk))]
            gathers.append((dist.all_gather(outputs, outputs[rank], async_op=True), None, None))
        return gathers

def build_optimizer(groups, ns_dtype=None):
    """DistMuonAdamW when torch.distributed runs with world_size > 1, else MuonAdamW."""
    return (DistMuonAdamW if dist_world_size() > 1 else MuonAdamW)(groups, ns_dtype=ns_dtype)
