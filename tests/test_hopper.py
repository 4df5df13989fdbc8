"""The Hopper fast paths against references, on CPU: FA3's window and layout conversion against our masked SDPA (FA3
itself stands in as the math of its documented semantics, since it runs on sm90 only), and the fp8 matmul against
the same product of its dequantised operands and against bf16 (CPU torch runs _scaled_mm too, slowly).
On a GPU, dev/gpu_check compares the real FA3 kernel and the fp8 matmul the same way."""
import math
from types import SimpleNamespace

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, attention
from nanochat.hopper import Fp8Matmul, fa3_attention, flash_attn3, to_fp8, use_fp8

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

def fa3_math(q, k, v, causal, window_size):
    """flash_attn_func's documented semantics in plain maths: (B, T, H, D) layout, GQA by head groups, query i sees
    key j when i - left <= j <= i + right (-1: unbounded), and j <= i if causal; fp32 inside, as the kernel."""
    (left, right), T, dtype = window_size, q.size(1), q.dtype
    q, k, v = q.float(), k.float(), v.float()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0)) & ((j <= i) | (not causal))
    k, v = (t.repeat_interleave(q.size(2) // t.size(2), dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.size(-1))
    return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v).to(dtype)

@pytest.mark.parametrize("window", [1, 3, 8, 16, 160])
def test_fa3_window_and_layout_match_our_masked_sdpa(window):
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 16, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    # ours, as gpt.CausalSelfAttention masks it: query i sees keys i-window+1 .. i, in (B, H, T, D)
    pos = torch.arange(T)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    ours = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    theirs = fa3_attention(SimpleNamespace(flash_attn_func=fa3_math), q, k, v, window)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

def test_no_fa3_off_hopper():
    assert flash_attn3() is None  # CPU: the model takes SDPA

def test_fp8_matmul_is_the_product_of_its_dequantised_operands():
    torch.manual_seed(0)
    x, w = torch.randn(64, 96, requires_grad=True), torch.randn(48, 96, requires_grad=True)
    g = torch.randn(64, 48).bfloat16()  # the output is bf16, so its gradient is
    y = Fp8Matmul.apply(x, w)
    y.backward(g)
    deq = lambda t, dtype: (lambda t8, inv: t8.float() * inv)(*to_fp8(t, dtype))  # noqa: E731
    x_, w_, g_ = deq(x, torch.float8_e4m3fn), deq(w, torch.float8_e4m3fn), deq(g, torch.float8_e5m2)
    torch.testing.assert_close(y.float(), (x_ @ w_.T).bfloat16().float(), atol=0, rtol=0)  # one bf16 rounding
    torch.testing.assert_close(x.grad, g_ @ w_, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad, g_.T @ x_, atol=1e-4, rtol=1e-4)
    # and those operands are e4m3/e5m2 roundings: within a few % of the exact products, never exact
    for got, exact in ((y.float(), x @ w.T), (x.grad, g.float() @ w), (w.grad, g.float().T @ x)):
        error = ((got - exact).norm() / exact.norm()).item()
        assert 1e-3 < error < 0.08, error

def test_fp8_model_trains_like_the_bf16_one():
    cfg = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, value_embeds=True)
    idx, targets = torch.randint(0, 128, (4, 32)), torch.randint(0, 128, (4, 32))
    losses, grads = [], []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        use_fp8(model, fp8)
        assert sum(getattr(m, "fp8", False) for m in model.modules()) == (2 * 6 if fp8 else 0)  # q k v proj fc proj
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.98
