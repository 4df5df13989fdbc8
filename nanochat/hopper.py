"""Hopper's fast paths beside the stock ones they must match (tests/test_hopper.py on CPU, dev/gpu_check on the GPU):
FA3 for training's causal and windowed attention (masked SDPA leaves its flash kernel, FA3 skips masked keys), and fp8
matmuls for the blocks' linears (torch._scaled_mm: twice bf16's tensor-core rate on H100)."""
import torch

from nanochat.common import print0

def flash_attn3():
    """FA3's interface on a Hopper GPU with the `kernels` package (the `gpu` extra), else None: SDPA serves."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None  # the build is for sm90 only: an A100 or a Blackwell takes SDPA
    try:
        from kernels import get_kernel  # fetches the prebuilt kernel from the Hugging Face Hub once, then its cache
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception as e:  # not installed, offline with an empty cache, no build for this torch: say so once
        print0(f"Flash Attention 3 unavailable, attention runs on SDPA ({type(e).__name__}: {e})")
        return None

FA3 = flash_attn3()  # resolved once, at import: torch.compile then sees a constant, never the loading code

def fa3_attention(fa3, q, k, v, window):
    """Causal attention over (B, T, H, D) q and (B, T, Hkv, D) k, v, the layout and the GQA FA3 take natively."""
    # our window (query i sees keys i-window+1 .. i) as FA3's (left, right): keys i-left .. i+right, -1 unbounded
    y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window - 1 if window < q.size(1) else -1, 0))
    return y[0] if isinstance(y, tuple) else y  # some builds also return the softmax's log-sum-exp

def to_fp8(t, dtype):
    """t scaled by its amax onto dtype's whole range, and the scale that undoes it (what _scaled_mm multiplies by)."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.detach().abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()

class Fp8Matmul(torch.autograd.Function):
    """x @ w.T with x, w in e4m3 (3 mantissa bits), the output gradient in e5m2 (2 bits, the range gradients need),
    each scaled per tensor by its amax; fp32 accumulation in _scaled_mm; the fp8 x saved: half bf16's memory."""
    @staticmethod
    def forward(ctx, x, w):
        x8, x_inv = to_fp8(x.reshape(-1, x.size(-1)), torch.float8_e4m3fn)
        w8, w_inv = to_fp8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w.dtype
        # _scaled_mm takes its first operand row-major and its second column-major: w8.t() is that as it stands
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], w.size(0))
    @staticmethod
    def backward(ctx, grad_y):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad_y.reshape(-1, grad_y.size(-1)), torch.float8_e5m2)
        col_major = lambda t: t.t().contiguous().t()  # noqa: E731
        grad_x = torch._scaled_mm(g8, col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.x_dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), col_major(x8), scale_a=g_inv, scale_b=x_inv, out_dtype=ctx.w_dtype)
        return grad_x.view(ctx.x_shape), grad_w

class Linear(torch.nn.Linear):
    """nn.Linear (no bias; the same parameter, the same checkpoints) whose matmul runs in fp8 once .fp8 is set."""
    fp8 = False
    def forward(self, x):
        return Fp8Matmul.apply(x, self.weight) if self.fp8 else super().forward(x)

def use_fp8(model, on=True):
    """fp8 matmuls on (or off) in every hopper.Linear of model: the blocks'; lm_head and the gates stay nn.Linear."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.fp8 = on
