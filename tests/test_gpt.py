"""Tests for nanochat/gpt.py and nanochat/fused.py: shapes, init, GQA, KV cache vs full recompute, meta
init, overfitting with the real optimizer, FLOPs count, soft-capping, the naive sampler, and the fast
paths (fused.py) against the plain ones."""
import math

import pytest
import torch

import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, attention

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

def tiny_config(**overrides):
    cfg = dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)

def make_model(seed=0, randomize_outputs=True, **overrides):
    """A tiny model. randomize_outputs: give the zero-initialised projections and the tiny
    lm_head real values, so comparisons exercise every path instead of a block-free identity."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    if randomize_outputs:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.1)
                block.mlp.c_proj.weight.normal_(0, 0.05)
            model.lm_head.weight.normal_(0, 0.3)
    model.eval()
    return model

def test_shapes_and_dtypes():
    model = make_model()
    idx = torch.randint(0, 64, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 64) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (3, 20)
    torch.testing.assert_close(per_token.mean(), loss)

def test_ignore_index():
    model = make_model()
    idx = torch.randint(0, 64, (2, 16))
    targets = idx.clone()
    targets[:, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert (per_token[:, :5] == 0).all()
    torch.testing.assert_close(model(idx, targets), per_token[:, 5:].mean())

def test_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=512))
    idx = torch.randint(0, 512, (4, 32))
    loss = model(idx, idx).item()
    assert abs(loss - math.log(512)) < 0.02, loss

def test_causality():
    model = make_model()
    idx = torch.randint(0, 64, (1, 24))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 64
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])

@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_matches_mha_with_repeated_kv(n_kv_head):
    """A GQA model equals the MHA model whose k/v projections repeat each kv head for its
    group of query heads (the reference semantics of grouped-query attention)."""
    gqa = make_model(n_kv_head=n_kv_head)
    mha = GPT(tiny_config(n_kv_head=4))
    state = gqa.state_dict()
    head_dim, group = 64 // 4, 4 // n_kv_head
    for key in list(state):
        if key.endswith("attn.c_k.weight") or key.endswith("attn.c_v.weight"):
            w = state[key].view(n_kv_head, head_dim, 64)
            state[key] = w.repeat_interleave(group, dim=0).reshape(4 * head_dim, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (n_kv_head * head_dim, 64)
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)

def test_attention_kv_expansion_matches_sdpa_gqa():
    """Our kv-head expansion (used off-GPU and with masks) has the same head mapping as SDPA's
    enable_gqa (used by the fused CUDA kernels)."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 10, 16)
    k, v = torch.randn(2, 2, 14, 16), torch.randn(2, 2, 14, 16)
    mask = torch.ones(10, 14, dtype=torch.bool).tril(diagonal=4)
    for kwargs in [dict(), dict(attn_mask=mask)]:
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        torch.testing.assert_close(attention(q, k, v, **kwargs), want, atol=1e-6, rtol=1e-5)
    want = F.scaled_dot_product_attention(q, k[:, :, :10], v[:, :, :10], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention(q, k[:, :, :10], v[:, :, :10], is_causal=True), want, atol=1e-6, rtol=1e-5)

class PerRowCache:
    """The cache protocol GPT.forward accepts (engine.py holds the production caches), written as plainly
    as possible: get_pos() is a (B,) tensor of per-row lengths, or with shared_pos one int for every row;
    insert_kv writes each row at its own position and returns keys/values up to the longest row."""

    def __init__(self, model, rows, capacity, shared_pos=False):
        cfg = model.config
        self.kv = torch.zeros(cfg.n_layer, 2, rows, cfg.n_kv_head, capacity, cfg.n_embd // cfg.n_head)
        self.pos = torch.zeros(rows, dtype=torch.long)
        self.shared_pos = shared_pos

    def get_pos(self):
        return int(self.pos[0]) if self.shared_pos else self.pos

    def insert_kv(self, layer_idx, k, v):
        T = k.size(2)
        for b, p in enumerate(self.pos.tolist()):
            self.kv[layer_idx, 0, b, :, p:p + T] = k[b]
            self.kv[layer_idx, 1, b, :, p:p + T] = v[b]
        n = int(self.pos.max()) + T
        if layer_idx == self.kv.size(0) - 1:
            self.pos = self.pos + T
        return self.kv[layer_idx, 0, :, :, :n], self.kv[layer_idx, 1, :, :, :n]

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shared_pos", [True, False])
def test_kv_cache_matches_full_recompute(fused, shared_pos):
    """A prefill into an empty cache, a multi-token chunk onto the non-empty cache (per-row positions only:
    with one int position it is refused), then single-token decode steps past the training sequence_len."""
    model = make_model(sequence_len=16)  # rotary tables cover 160 positions
    model.fused = fused
    idx = torch.randint(0, 64, (2, 40))
    full = model(idx)
    cache = PerRowCache(model, rows=2, capacity=48, shared_pos=shared_pos)
    chunks = [(0, 17)] if shared_pos else [(0, 10), (10, 17)]
    with torch.no_grad():
        out = [model(idx[:, a:b], kv_cache=cache) for a, b in chunks]
        out += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(17, 40)]  # decode one token at a time
        if shared_pos:
            with pytest.raises(AssertionError, match="per-row positions"):
                model(idx[:, :2], kv_cache=cache)
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("fused", [True, False])
def test_ragged_batch_rows_at_their_own_positions(fused):
    """Three prompts of different lengths, each prefilled alone, then decoded together (single
    tokens and a 2-token chunk): every row's logits equal recomputing that row alone."""
    model = make_model()
    model.fused = fused
    torch.manual_seed(1)
    prompts = [torch.randint(0, 64, (1, n)) for n in (5, 9, 2)]
    ragged = PerRowCache(model, rows=3, capacity=32)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            n = prompt.size(1)
            single = PerRowCache(model, rows=1, capacity=n, shared_pos=True)  # a prefill, as the engine's
            model(prompt, kv_cache=single)
            ragged.kv[:, :, b, :, :n] = single.kv[:, :, 0, :, :n]
            ragged.pos[b] = n
        seqs = [p[0].tolist() for p in prompts]
        for step_len in (1, 1, 2, 1):
            new = torch.randint(0, 64, (3, step_len))
            got = model(new, kv_cache=ragged)
            for b in range(3):
                seqs[b] += new[b].tolist()
                want = model(torch.tensor([seqs[b]]))[0, -step_len:]
                torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)

def test_meta_device_init():
    cfg = tiny_config(vocab_size=256)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = GPT(cfg)
    torch.testing.assert_close(model.cos, reference.cos)
    torch.testing.assert_close(model.sin, reference.sin)
    assert model.cos.size(1) == 10 * cfg.sequence_len
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    assert (model.transformer.h[0].attn.c_proj.weight == 0).all()
    idx = torch.randint(0, 256, (2, 32))
    assert abs(model(idx, idx).item() - math.log(256)) < 0.05

def test_overfits_one_batch_with_its_optimizer():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = model.setup_optimizer()
    assert [g["kind"] for g in opt.param_groups[:2]] == ["adamw", "adamw"]
    assert {g["kind"] for g in opt.param_groups[2:]} == {"muon"}
    assert opt.param_groups[0]["params"] == [model.lm_head.weight]
    assert opt.param_groups[1]["params"] == [model.transformer.wte.weight]
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(80):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
    assert first > 4.0
    assert model(x, y).item() < 0.05

def test_estimate_flops_matches_hand_count():
    cfg = GPTConfig(sequence_len=128, vocab_size=1000, n_layer=3, n_head=4, n_kv_head=2, n_embd=96)
    model = GPT(cfg)
    C, D, L, V = 96, 24, 3, 1000
    per_layer = C * C + 2 * C * (2 * D) + C * C + 2 * (4 * C * C)  # q, k+v (2 kv heads), proj, mlp
    assert model.num_params() == L * per_layer + 2 * V * C
    expected = 6 * (L * per_layer + V * C) + 12 * L * 4 * D * 128
    assert model.estimate_flops() == expected

def test_softcap_bounds_logits():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0  # the cap is actually reached, not just never approached

def test_generate_greedy_and_seeded():
    model = make_model()
    prompt = [1, 2, 3, 4]
    greedy = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert greedy == ids[len(prompt):]
    a = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=7))
    b = list(model.generate(prompt, max_tokens=8, temperature=1.0, top_k=5, seed=7))
    assert a == b and all(0 <= t < 64 for t in a)

@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_linear_softcap_cross_entropy_matches_autograd(monkeypatch, chunk_rows):
    """The chunked lm_head + soft-cap + CE equals the plain autograd graph for the loss and both
    gradients, whatever the chunking: the summed version (gradients formed in the forward pass,
    scaled by the incoming gradient) and the per-token one (recomputed in backward, uneven
    token weights); ignored targets add nothing; the no-grad path gives the same losses."""
    import nanochat.fused as fused
    from nanochat.fused import LinearSoftcapCrossEntropy, LinearSoftcapCrossEntropyPerToken, softcap_ce_chunks
    from nanochat.gpt import LOGIT_SOFTCAP
    monkeypatch.setattr(fused, "ce_chunk_rows", lambda device_type, vocab: chunk_rows)
    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(50, 16, dtype=torch.float64) * 3).requires_grad_()  # logits well into the cap
    t = torch.randint(0, 50, (40,))
    t[::6] = -1
    ref = F.cross_entropy(LOGIT_SOFTCAP * torch.tanh(x @ w.T / LOGIT_SOFTCAP), t, ignore_index=-1, reduction="sum")
    (2.5 * ref).backward()
    ref_gx, ref_gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    out = LinearSoftcapCrossEntropy.apply(x, w, t, LOGIT_SOFTCAP)
    (2.5 * out).backward()
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(x.grad, ref_gx, atol=1e-10) and torch.allclose(w.grad, ref_gw, atol=1e-10)
    assert (x.grad[::6] == 0).all()
    per_token = softcap_ce_chunks(x.detach(), w.detach(), t, LOGIT_SOFTCAP, with_grads=False)[0]
    assert torch.allclose(per_token.sum().double(), ref, atol=1e-4) and (per_token[::6] == 0).all()
    # per-token losses, gradients recomputed in backward, under uneven per-token weights
    x.grad = w.grad = None
    weights = torch.randn(40, dtype=torch.float64)
    ref = F.cross_entropy(LOGIT_SOFTCAP * torch.tanh(x @ w.T / LOGIT_SOFTCAP), t, ignore_index=-1, reduction="none")
    (ref * weights).sum().backward()
    ref_gx, ref_gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    out = LinearSoftcapCrossEntropyPerToken.apply(x, w, t, LOGIT_SOFTCAP)
    (out * weights).sum().backward()
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(x.grad, ref_gx, atol=1e-10) and torch.allclose(w.grad, ref_gw, atol=1e-10)
    xs, ws = x[:6].detach().requires_grad_(), w[:5].detach().requires_grad_()
    ts = torch.tensor([0, 4, -1, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda a, b: LinearSoftcapCrossEntropy.apply(a, b, ts, LOGIT_SOFTCAP), (xs, ws))
    assert torch.autograd.gradcheck(lambda a, b: LinearSoftcapCrossEntropyPerToken.apply(a, b, ts, LOGIT_SOFTCAP),
                                    (xs, ws))

@pytest.mark.parametrize("fused", [True, False])
def test_loss_paths_agree(fused):
    """mean/sum/none, with and without grad, all report the same per-token losses: training
    takes the summed path, DPO the per-token path, evaluation the no-grad one."""
    model = make_model()
    model.fused = fused
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (3, 12))
    targets = torch.randint(0, vocab, (3, 12))
    targets[0, :5] = -1
    mean = model(idx, targets)
    total = model(idx, targets, loss_reduction="sum")
    per_token = model(idx, targets, loss_reduction="none")
    with torch.no_grad():
        mean_ng = model(idx, targets)
        per_token_ng = model(idx, targets, loss_reduction="none")
    assert mean.requires_grad and per_token.requires_grad and not mean_ng.requires_grad
    assert torch.allclose(per_token, per_token_ng, atol=1e-5)
    assert torch.allclose(total, per_token.sum(), atol=1e-4)
    assert torch.allclose(mean, per_token.sum() / 31, atol=1e-5) and torch.allclose(mean, mean_ng, atol=1e-5)
    grads = torch.autograd.grad(total, list(model.parameters()))
    ref = torch.autograd.grad(per_token.sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref))

def test_hand_written_elementwise_ops_match_plain_ops():
    """fused.py's RMSNorm, rotary and ReLU^2 (hand-written backwards) equal gpt.py's plain ops (values
    and gradients, fp32 and fp64) and pass gradcheck; bf16 RMSNorm stays within bf16 rounding."""
    from nanochat.fused import ReLUSquared, RMSNorm, RotaryEmbedding
    from nanochat.gpt import apply_rotary_emb, norm, relu_squared
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64) * 3
    angles = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    cases = [(RMSNorm.apply, norm),
             (lambda t: RotaryEmbedding.apply(t, cos.to(t.dtype), sin.to(t.dtype)),
              lambda t: apply_rotary_emb(t, cos.to(t.dtype), sin.to(t.dtype))),
             (ReLUSquared.apply, relu_squared)]
    for ours, plain in cases:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            a = x.to(dtype).clone().requires_grad_()
            b = x.to(dtype).clone().requires_grad_()
            g = torch.randn_like(a)
            out_a, out_b = ours(a), plain(b)
            out_a.backward(g)
            out_b.backward(g)
            assert torch.allclose(out_a, out_b, atol=tol) and torch.allclose(a.grad, b.grad, atol=tol)
        small = torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ours, (small,))
    low = x.to(torch.bfloat16)
    assert RMSNorm.apply(low).dtype == torch.bfloat16
    assert torch.allclose(RMSNorm.apply(low).double(), F.rms_norm(low.double(), (8,)), rtol=1e-2, atol=1e-2)

def losses_and_grads(model, idx, targets, weights):
    """(mean loss, its gradients, per-token losses, the gradients of their weighted sum, no-grad per-token
    losses, logits) of every parameter: what each forward path of the model gives."""
    params = list(model.parameters())
    loss = model(idx, targets)
    per_token = model(idx, targets, loss_reduction="none")
    with torch.no_grad():
        no_grad = model(idx, targets, loss_reduction="none")
    return (loss, torch.autograd.grad(loss, params), per_token,
            torch.autograd.grad((per_token * weights).sum(), params), no_grad, model(idx))

def test_fused_path_matches_plain_path(monkeypatch):
    """The fast paths (hand-written backwards, chunked loss, several chunks) give the plain path's
    loss and every parameter gradient, with GQA and ignored targets; so do the per-token loss
    (DPO) with its backward, the no-grad losses (evaluation) and the logits."""
    import nanochat.fused as fused
    model = make_model().train()
    assert model.config.n_kv_head < model.config.n_head
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (3, 20))
    targets = torch.randint(0, vocab, (3, 20))
    targets[1, :7] = -1
    weights = torch.randn(3, 20)
    monkeypatch.setattr(fused, "ce_chunk_rows", lambda device_type, vocab_size: 16)  # 60 rows: 4 chunks
    model.fused = True
    got = losses_and_grads(model, idx, targets, weights)
    model.fused = False
    want = losses_and_grads(model, idx, targets, weights)
    names = [name for name, _ in model.named_parameters()]
    for what, a, b in zip(["loss", "grads", "per-token", "per-token grads", "no-grad", "logits"], got, want):
        if isinstance(a, tuple):
            for name, ga, gb in zip(names, a, b):
                assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4), (what, name)
        else:
            assert torch.allclose(a, b, atol=1e-5), what

def counting(fn, key, calls):
    def counted(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return counted

@pytest.mark.parametrize("fused", [True, False])
def test_the_switch_reaches_every_forward(monkeypatch, fused):
    """model.fused picks the ops of training, per-token and no-grad losses, logits and KV-cache decoding."""
    import nanochat.gpt as gpt
    calls = {"fused": 0, "plain": 0}
    for key, ops in (("fused", gpt.FUSED_OPS), ("plain", gpt.PLAIN_OPS)):
        for name in ("norm", "rotary", "relu_squared"):
            monkeypatch.setattr(ops, name, counting(getattr(ops, name), key, calls))
    monkeypatch.setattr(gpt, "linear_softcap_cross_entropy", counting(gpt.linear_softcap_cross_entropy, "fused", calls))
    model = make_model()
    model.fused = fused
    cfg = model.config
    idx = torch.randint(0, 64, (2, 8))
    cache = PerRowCache(model, rows=2, capacity=8, shared_pos=True)
    forwards = [lambda: model(idx, idx).backward(), lambda: model(idx, idx, loss_reduction="none").sum().backward(),
                torch.no_grad()(lambda: model(idx, idx)), lambda: model(idx),
                torch.no_grad()(lambda: model(idx[:, :1], kv_cache=cache))]
    for forward in forwards:
        calls.update(fused=0, plain=0)
        forward()
        on, off = ("fused", "plain") if fused else ("plain", "fused")
        # per layer: 2 norms, 2 rotaries, 2 q/k norms, 1 relu^2, and the 2 norms around the blocks
        assert calls[on] >= 7 * cfg.n_layer + 2 and calls[off] == 0, calls

def test_fused_default_follows_the_device():
    from nanochat.fused import fused_by_default
    assert fused_by_default("cpu") and not fused_by_default("cuda") and not fused_by_default("mps")
    with torch.device("meta"):
        model = GPT(tiny_config())
    assert model.fused is False  # read on the meta device: decided when read, not when built
    model.to_empty(device="cpu")
    assert model.fused is True
    model.fused = False
    assert model.fused is False
    model.fused = None
    assert model.fused is True

@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_torch_compile_matches_eager(fused):
    """torch.compile (on by default on CUDA) traces either path (the hand-written autograd Functions
    and the chunked loss, or the stock ops) and gives the eager loss and gradients."""
    model = make_model().train()
    model.fused = fused
    vocab = model.config.vocab_size
    torch.manual_seed(2)
    idx, targets = torch.randint(0, vocab, (2, 32)), torch.randint(0, vocab, (2, 32))
    targets[0, :5] = -1
    loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    compiled_loss = torch.compile(model)(idx, targets)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch._dynamo.reset()  # drop the compiled graphs (and the fake tensors they hold)
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, compiled_grads))

@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_close_to_fp32(fused):
    """The CUDA dtype policy (bf16 autocast around the forward), emulated on CPU: the same loss
    and gradients up to bf16 rounding, fp32 parameter gradients; also for the per-token loss,
    whose fused backward recomputes the logits under the forward's autocast."""
    model = make_model().train()
    model.fused = fused
    vocab = model.config.vocab_size
    torch.manual_seed(3)
    idx, targets = torch.randint(0, vocab, (2, 32)), torch.randint(0, vocab, (2, 32))
    for reduction in ("mean", "none"):
        loss = model(idx, targets, loss_reduction=reduction).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx, targets, loss_reduction=reduction)
        low_grads = torch.autograd.grad(low.sum(), list(model.parameters()))
        assert low.dtype == torch.float32 and abs(low.sum().item() - loss.item()) < 0.01 * loss.item()
        for (name, p), g, lg in zip(model.named_parameters(), grads, low_grads):
            assert lg.dtype == p.dtype == torch.float32
            assert (lg - g).norm() < 0.05 * g.norm(), (reduction, name)
