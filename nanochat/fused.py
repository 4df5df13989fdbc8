"""The model's fast paths: the ops of gpt.py with hand-written backwards, and the lm_head + soft-capped
cross-entropy computed in row chunks. Same maths as the plain path; GPT.fused picks which runs."""
import torch

def fused_by_default(device_type):
    """The default of GPT.fused: the hand-written paths on CPU, the plain ops elsewhere."""
    # Eager CPU fuses nothing, so every elementwise op of the plain graph is a pass over memory and every
    # autograd temporary an allocation: measured, these paths make a CPU training step ~1.4x faster and smaller.
    # On CUDA the plain path runs under torch.compile, whose inductor fuses the elementwise ops itself; there it
    # is the default candidate, but nothing here has been timed on a GPU yet (dev/gpu_check.py, row 3, times both).
    return device_type == "cpu"

class RMSNorm(torch.autograd.Function):
    """Parameter-free RMSNorm over the last dim (F.rms_norm's maths and eps), hand-written backward."""
    # The eager composite graph of F.rms_norm makes ~10 passes over x forward and back; this makes 5,
    # and saves y (which the next matmul saves anyway) instead of x and temporaries.
    @staticmethod
    def forward(ctx, x):
        # the norm is accumulated in (at least) fp32 whatever the input dtype
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc_dtype)
        r = r.square_().div_(x.size(-1)).add_(torch.finfo(x.dtype).eps).rsqrt_()
        y = x * r if x.dtype == acc_dtype else (x * r).to(x.dtype)
        ctx.save_for_backward(y, r)
        return y
    @staticmethod
    def backward(ctx, grad_y):
        y, r = ctx.saved_tensors
        # y = x r  =>  dx = r (g - y mean(g y))
        mean_gy = torch.linalg.vecdot(grad_y, y, dim=-1).unsqueeze(-1).div_(y.size(-1))
        return torch.addcmul(grad_y, y, mean_gy.to(y.dtype), value=-1.0).mul_(r.to(y.dtype))

class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 with backward 2 relu(x) g."""
    # one saved tensor and one pass, where autograd's relu-then-square graph saves two and makes
    # four (3x faster on CPU for the MLP's widest activation); the gradient is zero exactly where relu is
    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r
    @staticmethod
    def backward(ctx, grad_out):
        r, = ctx.saved_tensors
        return (r + r).mul_(grad_out)

def _rotate(x, cos, sin):
    """(x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin) on the two halves of the last dim."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    # written into halves of one output (3x faster in eager than building halves and concatenating);
    # in-place ops rather than out= arguments, which torch.compile cannot trace
    out = torch.empty_like(x)
    out[..., :d].copy_(x1).mul_(cos).addcmul_(x2, sin)
    out[..., d:].copy_(x2).mul_(cos).addcmul_(x1, sin, value=-1.0)
    return out

class RotaryEmbedding(torch.autograd.Function):
    """Rotary rotation of x (B, T, H, D) by the angles in the cos, sin tables."""
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)
    @staticmethod
    def backward(ctx, grad_out):
        # a rotation's transpose is the rotation by the negated angle: nothing but the tables is saved
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, -sin), None, None

def ce_chunk_rows(device_type, vocab_size):
    """Rows of logits the chunked loss materialises at once."""
    # GPU: ~64M elements (few kernel launches, still far below the full logits)
    if device_type == "cuda":
        return max(1, 2 ** 26 // vocab_size)
    # CPU, measured: the elementwise passes want small cache-friendly chunks (~1M elements), while every
    # chunk also adds its share into the lm_head gradient, a (V x D) read and write, which wants rows to
    # grow with V: V/64 rows balances the two (128 rows at V=8192, 512 at V=32768)
    return max(1, vocab_size // 64, 2 ** 20 // vocab_size)

def softcap_ce_chunks(x, weight, targets, cap, with_grads, row_weights=None):
    """Per-token CE(cap * tanh(x W^T / cap), t) of x (N, D), weight (V, D), a chunk of rows at a time;
    with_grads: also the gradients of sum_i row_weights[i] * loss[i] wrt x and weight."""
    # Targets < 0: loss 0, no gradient. The gradients are formed chunk by chunk while the logits are
    # at hand (softmax - onehot, times the tanh derivative), so the (N, V) logits never exist at once.
    # Every fused loss path runs this one arithmetic, so e.g. DPO's reference and policy log-probs
    # agree exactly. Logit maths in fp32 (fp64 in gradchecks); the matmuls follow autocast.
    N, V = x.size(0), weight.size(0)
    rows = ce_chunk_rows(x.device.type, V)
    fp = torch.promote_types(weight.dtype, torch.float32)
    losses = torch.empty(N, dtype=fp, device=x.device)
    grad_x, grad_w = (torch.empty_like(x), torch.zeros_like(weight)) if with_grads else (None, None)
    autocast = torch.is_autocast_enabled(x.device.type)
    for i in range(0, N, rows):
        xc, tc = x[i:i + rows], targets[i:i + rows]
        valid = tc >= 0
        tc = torch.where(valid, tc, 0)[:, None]
        th = (xc @ weight.mT).to(fp).div_(cap).tanh_()  # capped logits / cap
        # |capped| <= cap, so cap is a safe shift for the log-sum-exp: no max pass needed
        probs = torch.sub(th, 1.0).mul_(cap).exp_()
        sumexp = probs.sum(dim=-1)
        picked = th.gather(1, tc).squeeze(1)
        losses[i:i + rows] = torch.where(valid, sumexp.log() + cap * (1.0 - picked), 0.0)
        if with_grads:
            probs.div_(sumexp[:, None]).scatter_add_(1, tc, torch.full_like(picked[:, None], -1.0))
            probs.addcmul_(probs, th.square_(), value=-1.0)  # d capped / d logit = 1 - tanh^2
            probs.mul_((valid if row_weights is None else valid * row_weights[i:i + rows])[:, None])
            grad_x[i:i + rows] = probs @ weight
            if autocast:
                grad_w += probs.mT @ xc  # low-precision matmul, fp32 accumulation across chunks
            else:
                grad_w.addmm_(probs.mT, xc)
    return losses, grad_x, grad_w

class LinearSoftcapCrossEntropy(torch.autograd.Function):
    """sum_i CE(cap * tanh(x_i W^T / cap), t_i): lm_head, soft-cap and cross-entropy in one chunked pass."""
    # The gradients are computed in the forward pass and only scaled by the incoming scalar in backward, so
    # training never holds the (tokens x vocab) logits: a small model's largest tensors, on CPU the slowest to allocate.
    @staticmethod
    def forward(ctx, x, weight, targets, cap):
        losses, grad_x, grad_w = softcap_ce_chunks(x, weight, targets, cap, with_grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        return losses.sum()
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_w * grad_total, None, None

class LinearSoftcapCrossEntropyPerToken(torch.autograd.Function):
    """The per-token losses (N,) of the same computation, for losses that weigh tokens unevenly (DPO)."""
    # The backward recomputes the logits chunk by chunk (one more lm_head matmul) instead of keeping them.
    @staticmethod
    def forward(ctx, x, weight, targets, cap):
        ctx.save_for_backward(x, weight, targets)
        ctx.cap = cap
        # backward runs outside the caller's autocast: remember it, so the recomputation matches (by hand:
        # torch.amp.custom_fwd/custom_bwd do this for one device type fixed when the class is written)
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        return softcap_ce_chunks(x, weight, targets, cap, with_grads=False)[0]
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        x, weight, targets = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            _, grad_x, grad_w = softcap_ce_chunks(x, weight, targets, ctx.cap, with_grads=True, row_weights=grad_losses)
        return grad_x, grad_w, None, None

def linear_softcap_cross_entropy(x, weight, targets, cap, reduction="mean"):
    """CE(cap * tanh(x W^T / cap), targets) of x (N, D), targets (N,) (-1 = ignore), reduced like F.cross_entropy."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if reduction == "none":
            return LinearSoftcapCrossEntropyPerToken.apply(x, weight, targets, cap)
        total = LinearSoftcapCrossEntropy.apply(x, weight, targets, cap)
    else:  # no graph to build (evaluation): the chunks alone, without gradients
        losses = softcap_ce_chunks(x, weight, targets, cap, with_grads=False)[0]
        if reduction == "none":
            return losses
        total = losses.sum()
    # mean over counted tokens (nan if none), as F.cross_entropy
    return total if reduction == "sum" else total / (targets >= 0).sum()
