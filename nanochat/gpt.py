"""
The GPT model: a modern decoder-only Transformer.

- rotary position embeddings (no learned positions), precomputed for 10x sequence_len so
  KV-cache decoding can run past the training length
- QK-norm: queries and keys are RMS-normalised per head, which keeps attention logits tame
- parameter-free RMSNorm everywhere (F.rms_norm), including right after the token embedding
- ReLU^2 MLP with 4x expansion; no biases anywhere; untied embedding and lm_head
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads
- logits soft-capped at 15 * tanh(x / 15)
- Muon for the block matrices, AdamW for embedding and lm_head (setup_optimizers)

Params are fp32; on CUDA the training scripts run forward under bf16 autocast
(common.autocast_ctx). CPU runs everything in fp32 through the very same code.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adamw import AdamW, DistAdamW
from nanochat.distributed import is_distributed
from nanochat.muon import Muon, DistMuon

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover this many times sequence_len


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6     # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768


class RMSNorm(torch.autograd.Function):
    """
    Parameter-free RMSNorm over the last dim, y = x / sqrt(mean(x^2) + eps), the maths of
    F.rms_norm (same eps) with a hand-written backward: dx = r * (g - y * mean(g * y)).
    The eager composite graph of F.rms_norm makes ~10 passes over x forward and back; this
    makes 5, and saves y (which the next matmul saves anyway) instead of x and temporaries.
    The norm is accumulated in (at least) fp32 whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, x):
        eps = torch.finfo(x.dtype).eps
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc_dtype)
        r = r.square_().div_(x.size(-1)).add_(eps).rsqrt_()
        y = x * r if x.dtype == acc_dtype else (x * r).to(x.dtype)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, r = ctx.saved_tensors
        mean_gy = torch.linalg.vecdot(grad_y, y, dim=-1).unsqueeze(-1).div_(y.size(-1))
        return torch.addcmul(grad_y, y, mean_gy.to(y.dtype), value=-1.0).mul_(r.to(y.dtype))


def norm(x):
    """Parameter-free RMSNorm over the last dim."""
    return RMSNorm.apply(x)


class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 with backward 2 * relu(x) * g (zero exactly where relu is): one saved tensor
    and one pass, where autograd's relu-then-square graph saves two and makes four (3x faster
    on CPU for the MLP's widest activation)."""

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
    """Rotary rotation by position-dependent angles; its backward is the inverse rotation (angle
    negated), so nothing but the tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, -sin), None, None


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x (B, T, H, D) by position-dependent angles."""
    return RotaryEmbedding.apply(x, cos, sin)


def ce_chunk_rows(device_type, vocab_size):
    """
    Rows of logits the chunked loss materialises at once. GPU: ~64M elements (few kernel
    launches, still far below the full logits). CPU, measured: the elementwise passes want small
    cache-friendly chunks (~1M elements), while every chunk also adds its share into the lm_head
    gradient, a (V x D) read and write, which wants rows to grow with V: V/64 rows balances the two
    (128 rows at V=8192, 512 at V=32768).
    """
    if device_type == "cuda":
        return max(1, 2 ** 26 // vocab_size)
    return max(1, vocab_size // 64, 2 ** 20 // vocab_size)


def _softcap_ce_chunks(x, weight, targets, cap, with_grads, row_weights=None):
    """
    Per-token loss CE(cap * tanh(x W^T / cap), t) for x (N, D), weight (V, D), computed a chunk
    of rows at a time so the (N, V) logits never exist at once. Targets < 0: loss 0, no gradient.
    with_grads: also the gradients of sum_i row_weights[i] * loss[i] (default weights 1) wrt x
    and weight, formed chunk by chunk while the logits are at hand (softmax - onehot, times the
    tanh derivative). Every loss path of the model runs this one arithmetic, so e.g. DPO's
    reference and policy log-probs agree exactly. Logit maths in fp32 (matmuls follow autocast).
    """
    N, V = x.size(0), weight.size(0)
    rows = ce_chunk_rows(x.device.type, V)
    fp = torch.promote_types(weight.dtype, torch.float32)  # fp32 logit maths (fp64 in gradchecks)
    losses = torch.empty(N, dtype=fp, device=x.device)
    grad_x = torch.empty_like(x) if with_grads else None
    grad_w = torch.zeros_like(weight) if with_grads else None
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
    """
    sum_i CE(cap * tanh(x_i W^T / cap), t_i): the lm_head matmul, soft-cap and cross-entropy in
    one pass over row chunks (see _softcap_ce_chunks). The gradients are computed during the
    forward pass and only scaled by the incoming scalar in backward, so training never holds
    the (tokens x vocab) logits: the largest tensors of a small model, and on CPU the slowest
    to allocate. Scalar output only (per-token losses with gradients: the class below).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, cap):
        losses, grad_x, grad_w = _softcap_ce_chunks(x, weight, targets, cap, with_grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        return losses.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_w * grad_total, None, None


class LinearSoftcapCrossEntropyPerToken(torch.autograd.Function):
    """The per-token losses (N,) of the same computation, for losses that weigh tokens unevenly
    (DPO's per-sequence log-probs). The backward recomputes the logits chunk by chunk (one more
    lm_head matmul) instead of keeping them."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap):
        ctx.save_for_backward(x, weight, targets)
        ctx.cap = cap
        return _softcap_ce_chunks(x, weight, targets, cap, with_grads=False)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        x, weight, targets = ctx.saved_tensors
        _, grad_x, grad_w = _softcap_ce_chunks(x, weight, targets, ctx.cap, with_grads=True, row_weights=grad_losses)
        return grad_x, grad_w, None, None


def attention(q, k, v, is_causal=False, attn_mask=None):
    """
    Scaled dot-product attention over q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D), Hkv dividing Hq;
    query head h reads kv head h // (Hq // Hkv). SDPA's enable_gqa only reaches a fused kernel
    (flash) on CUDA in half precision without a mask; anywhere else it silently takes the slow
    math path, so there we expand the kv heads ourselves and keep the fused kernels.
    """
    n_rep = q.size(1) // k.size(1)
    if n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class KVCache:
    """
    Keys and values of every layer for incremental decoding, stored as one tensor
    (num_layers, 2, batch, kv_heads, time, head_dim). Position advances after the last layer
    inserts, so all layers of one forward pass see the same position. Grows (in chunks of
    1024 positions) when more tokens arrive than it has room for.
    device/dtype default to those of the first keys inserted (bf16 under CUDA autocast).
    """

    GROW_CHUNK = 1024

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        self.shape = [num_layers, 2, batch_size, num_heads, seq_len, head_dim]
        self.device, self.dtype = device, dtype
        self.kv = None  # allocated on first insert (or eagerly when device and dtype are given)
        self.pos = 0
        if device is not None and dtype is not None:
            self.kv = torch.empty(self.shape, device=device, dtype=dtype)

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos

    def _ensure_capacity(self, needed, like):
        if self.kv is None:
            self.device = self.device if self.device is not None else like.device
            self.dtype = self.dtype if self.dtype is not None else like.dtype
            self.shape[4] = max(self.shape[4], needed)
            self.kv = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        elif needed > self.kv.size(4):
            new_len = -(-(needed + self.GROW_CHUNK) // self.GROW_CHUNK) * self.GROW_CHUNK
            self.shape[4] = new_len
            bigger = torch.empty(self.shape, device=self.device, dtype=self.dtype)
            bigger[:, :, :, :, :self.pos] = self.kv[:, :, :, :, :self.pos]
            self.kv = bigger

    def insert_kv(self, layer_idx, k, v):
        """Append k, v (B, H, T, D) at the current position; return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        self._ensure_capacity(t1, k)
        layer = self.kv[layer_idx]
        layer[0, :, :, t0:t1] = k
        layer[1, :, :, t0:t1] = v
        if layer_idx == self.kv.size(0) - 1:
            self.pos = t1
        return layer[0, :, :, :t1], layer[1, :, :, :t1]

    def prefill(self, other):
        """Copy another cache's contents (batch 1, or the same batch size) into this one,
        broadcasting over the batch: prefill the prompt once, then sample N continuations."""
        assert self.pos == 0, "prefill into a fresh (or reset) cache"
        assert other.kv is not None, "the source cache is empty"
        L, _, B, H, _, D = self.shape
        oL, _, oB, oH, _, oD = other.kv.shape
        if (L, H, D) != (oL, oH, oD) or oB not in (1, B):
            raise ValueError(f"KVCache.prefill: incompatible caches: layers/heads/head_dim/batch "
                             f"{(oL, oH, oD, oB)} -> {(L, H, D, B)}")
        self._ensure_capacity(other.pos, other.kv)
        self.kv[:, :, :, :, :other.pos] = other.kv[:, :, :, :, :other.pos]
        self.pos = other.pos


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_kv_head must divide n_head (GQA)"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert self.head_dim % 2 == 0, "rotary embeddings need an even head_dim"
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache, positions=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k = q.to(v.dtype), k.to(v.dtype)  # no-op unless an autocast policy ran rms_norm in fp32
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if positions is not None:
            # ragged batch, every row at its own position: row b's query i sees keys 0..positions[b, i]
            # (keys past a short row's end are padding up to the longest row)
            mask = torch.arange(Tk, device=q.device) <= positions[:, None, :, None]  # (B, 1, Tq, Tk)
            y = attention(q, k, v, attn_mask=mask)
        elif Tq == Tk:
            # training, or prefill into an empty cache: plain causal attention
            y = attention(q, k, v, is_causal=True)
        elif Tq == 1:
            # one decode token attends to the whole prefix (and itself)
            y = attention(q, k, v)
        else:
            # a chunk of Tq tokens after a cached prefix: all of the prefix, causal within the chunk
            prefix = Tk - Tq
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(ReLUSquared.apply(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, positions=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, positions)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    """
    GPT(config) comes out initialised. For big models build it without paying for an init
    twice: `with torch.device("meta"): m = GPT(cfg)`, then `m.to_empty(device=d); m.init_weights()`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables are not persistent: derived from the config, never stored in checkpoints
        self.rotary_seq_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    def _precompute_rotary_embeddings(self, seq_len, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        device = device if device is not None else self.transformer.wte.weight.device
        inv_freq = ROTARY_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        # shaped (1, T, 1, D/2) to broadcast over (B, T, H, D/2)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter and recompute the rotary tables on the model's device."""
        # embeddings ~ N(0, 1): the RMSNorm right after makes their scale irrelevant to the block
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        # tiny lm_head: initial logits ~ 0, so the initial loss is ~ ln(vocab_size)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            # input projections see unit-RMS inputs: std 1/sqrt(fan_in) keeps outputs at unit scale
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(lin.weight, mean=0.0, std=lin.in_features ** -0.5)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len)
        self.cos, self.sin = cos, sin

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """
        FLOPs per token for forward + backward: 6 per matmul weight (2 forward, 4 backward;
        the embedding is a lookup, not a matmul) plus the attention score/value matmuls,
        12 * n_layer * n_head * head_dim * sequence_len (no causal discount, by convention).
        """
        cfg = self.config
        n_matmul = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         muon_dtype=None):
        """
        [AdamW for embedding + lm_head, Muon for every block matrix]. The sharded variants are
        picked when torch.distributed runs with world_size > 1 (then do NOT wrap the model in
        DDP; see muon.py for the contract). Every param group carries "initial_lr" for schedules.
        muon_dtype: Newton-Schulz precision (None: bf16 where the hardware has fast bf16 matmuls).
        """
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(self.parameters()))
        # AdamW LRs were tuned at width 768; wider models take proportionally smaller steps
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
        ]
        adamw_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        distributed = is_distributed()
        if distributed:
            adamw = DistAdamW(adam_groups, **adamw_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95, nesterov=True, ns_dtype=muon_dtype)
        else:
            # one fused kernel per step on CUDA and CPU (5x faster than the op-by-op loop on CPU)
            fused = self.get_device().type in ("cuda", "cpu")
            adamw = AdamW(adam_groups, fused=fused, **adamw_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, nesterov=True, ns_dtype=muon_dtype)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx (B, T) token ids. With targets (B, T) (-1 = ignore): the cross-entropy loss in fp32,
        a scalar, or per token (B, T) when loss_reduction="none". Otherwise fp32 logits (B, T, V).
        With kv_cache: positions continue from kv_cache.get_pos() and keys/values are appended.
        get_pos() may also be a (B,) tensor (a ragged batch, row b at its own position): then
        insert_kv must return keys up to the longest row, and each row masks the keys past its own.
        """
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        positions = None
        if isinstance(t0, torch.Tensor):
            # a ragged cache (engine.RaggedKVCache) reports one position per row: row b's tokens sit at
            # t0[b], t0[b]+1, ... (the caller keeps them inside the rotary table; checking would sync)
            positions = t0.view(B, 1) + torch.arange(T, device=idx.device)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        else:
            if t0 + T > self.cos.size(1):
                raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.cos.size(1)} = "
                                 f"{ROTARY_LENGTH_FACTOR} x sequence_len)")
            cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        device_type = idx.device.type
        if torch.is_autocast_enabled(device_type):
            # tables stay fp32 (precise angles at long positions); the activations they rotate are not
            dtype = torch.get_autocast_dtype(device_type)
            cos, sin = cos.to(dtype), sin.to(dtype)
        cos_sin = cos, sin

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, positions)
        x = norm(x)

        if targets is None:
            logits = self.lm_head(x).float()
            return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        targets = targets.reshape(-1)
        x = x.view(B * T, -1)
        weight = self.lm_head.weight
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if loss_reduction == "none":
            if needs_grad:
                return LinearSoftcapCrossEntropyPerToken.apply(x, weight, targets, LOGIT_SOFTCAP).view(B, T)
            return _softcap_ce_chunks(x, weight, targets, LOGIT_SOFTCAP, with_grads=False)[0].view(B, T)
        if needs_grad:
            total = LinearSoftcapCrossEntropy.apply(x, weight, targets, LOGIT_SOFTCAP)
        else:
            total = _softcap_ce_chunks(x, weight, targets, LOGIT_SOFTCAP, with_grads=False)[0].sum()
        if loss_reduction == "sum":
            return total
        return total / (targets >= 0).sum()  # mean over counted tokens (nan if none), as F.cross_entropy

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """
        Naive streaming sampler (full recompute each step, no KV cache): the reference the
        Engine is checked against. tokens: list of ids. Yields one new id at a time.
        temperature 0 = greedy.
        """
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
