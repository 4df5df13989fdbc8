"""The GPT model, a modern decoder-only Transformer in plain PyTorch: rotary position embeddings (no
learned positions), QK-norm, parameter-free RMSNorm everywhere (also right after the embedding), a
ReLU^2 MLP, no biases, untied embedding and lm_head, grouped-query attention, logits soft-capped at
15 * tanh(x / 15); Muon for the block matrices, AdamW for embedding and lm_head (setup_optimizer).
Three GPTConfig switches (off in checkpoints from before them): value embeddings, residual/x0 lambdas, windows.
Params are fp32 (on CUDA the forward runs under bf16 autocast). model.fused swaps in fused.py's paths."""
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.fused import RMSNorm, ReLUSquared, RotaryEmbedding, fused_by_default, linear_softcap_cross_entropy
from nanochat.hopper import FA3, Linear, fa3_attention
from nanochat.optim import build_optimizer

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
    # value embeddings: per-token tables added into the attention values of every other layer (the last included),
    # through a per-head gate 2 sigmoid(W x[:32]) that starts at 1; the largest architecture gain of the public record
    value_embeds: bool = False
    # x = resid_lambdas[i] x + x0_lambdas[i] x0 before block i (x0: the normed embedding), learned scalars
    layer_lambdas: bool = False
    # per-layer attention: L = full causal, S = a sliding window of sequence_len // 4 keys; tiled over the layers,
    # the last layer always L ("SSSL": 3 of 4 layers short, fewer attention FLOPs where the kernel skips masked keys)
    window_pattern: str = "L"

VE_GATE_CHANNELS = 32  # the gate of the value embeddings reads this many channels of the layer input

def has_value_embed(config, layer_idx):  # every other layer, counted back from the last
    return config.value_embeds and layer_idx % 2 == (config.n_layer - 1) % 2

def attention_window(config, layer_idx):
    """How many keys back (itself included) layer layer_idx's queries see."""
    pattern = config.window_pattern.upper()
    if set(pattern) - {"S", "L"} or not pattern:
        raise ValueError(f"window_pattern must be letters S and L, got {config.window_pattern!r}")
    short = layer_idx != config.n_layer - 1 and pattern[layer_idx % len(pattern)] == "S"
    return max(1, config.sequence_len // 4) if short else config.sequence_len * ROTARY_LENGTH_FACTOR

def norm(x):
    return F.rms_norm(x, (x.size(-1),))

def relu_squared(x):
    return F.relu(x).square()

def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x (B, T, H, D) by position-dependent angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

# the model's elementwise ops, stock (autograd differentiates them) or with hand-written backwards
PLAIN_OPS = SimpleNamespace(norm=norm, rotary=apply_rotary_emb, relu_squared=relu_squared)
FUSED_OPS = SimpleNamespace(norm=RMSNorm.apply, rotary=RotaryEmbedding.apply, relu_squared=ReLUSquared.apply)

def attention(q, k, v, is_causal=False, attn_mask=None):
    """SDPA over q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); query head h reads kv head h // (Hq // Hkv)."""
    if (n_rep := q.size(1) // k.size(1)) == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    # SDPA's enable_gqa only reaches a fused kernel (flash) on CUDA in half precision without a mask;
    # anywhere else it silently takes the slow math path, so there we expand the kv heads ourselves
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_kv_head must divide n_head (GQA)"
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert self.head_dim % 2 == 0, "rotary embeddings need an even head_dim"
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=False)
        self.window = attention_window(config, layer_idx)
        # built only where used: an unused Linear would still draw from the RNG and change every later init
        self.ve_gate = (nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False)
                        if has_value_embed(config, layer_idx) else None)
    def forward(self, x, ops, cos_sin, kv_cache, positions=None, ve=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # the token's value embedding, mixed into every kv head through that head's gate
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, Hkv)
            v = v + (gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)).to(v.dtype)
        q, k = ops.norm(ops.rotary(q, *cos_sin)), ops.norm(ops.rotary(k, *cos_sin))
        q, k = q.to(v.dtype), k.to(v.dtype)  # no-op unless an autocast policy ran rms_norm in fp32
        if kv_cache is None and positions is None and q.is_cuda and q.dtype == torch.bfloat16 and (fa3 := FA3):
            return self.c_proj(fa3_attention(fa3, q, k, v, self.window).reshape(B, T, C))  # training on Hopper
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            # stores this chunk's keys/values, returns those of every cached position (the chunk's included)
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        # ragged batch, every row at its own position: a (B, 1, Tq, Tk) mask, row b's query i sees keys
        # 0..positions[b, i] (keys past a short row's end are padding up to the longest row); a sliding window
        # masks the keys more than self.window back too (the queries are the last Tq of the Tk positions)
        mask = None
        if positions is not None or self.window < Tk:
            q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None] if positions is None else positions[:, None, :, None]
            k_pos = torch.arange(Tk, device=q.device)
            mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
        # unmasked: training or a prefill into an empty cache (Tq == Tk) is causal, one decode token sees all.
        # Several tokens after a cached prefix need a mask: only a cache with per-row positions gets one
        assert mask is not None or Tq in (1, Tk), "a chunk after a cached prefix needs per-row positions"
        # if/else, not a bare Tq == Tk: under torch.compile(dynamic=True) that is a symbolic bool, which SDPA refuses
        y = attention(q, k, v, is_causal=True if mask is None and Tq == Tk else False, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)
    def forward(self, x, ops):
        return self.c_proj(ops.relu_squared(self.c_fc(x)))

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
    def forward(self, x, ops, cos_sin, kv_cache, positions=None, ve=None):
        x = x + self.attn(ops.norm(x), ops, cos_sin, kv_cache, positions, ve)
        return x + self.mlp(ops.norm(x), ops)

class GPT(nn.Module):
    """GPT(config) comes out initialised; or build it on the meta device, then to_empty(device) and init_weights()."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self._fused = None  # see the fused property
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        # keyed by layer index (a ModuleDict needs str keys); empty without value embeddings
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embed(config, i)})
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # rotary tables are not persistent: derived from the config, never stored in checkpoints
        self.rotary_seq_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        self.register_buffer("cos", None, persistent=False)  # computed by init_weights
        self.register_buffer("sin", None, persistent=False)
        self.init_weights()
    @property
    def fused(self):
        """Whether forward runs fused.py's hand-written paths; until set, fused_by_default of the model's device."""
        # decided when read, not when built: models are built on CPU or meta, then moved
        return fused_by_default(self.get_device().type) if self._fused is None else self._fused
    @fused.setter
    def fused(self, value):
        self._fused = None if value is None else bool(value)  # None: back to the device's default
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
            if block.attn.ve_gate is not None:  # gate 2 sigmoid(0) = 1: v + ve at the start
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():  # unit scale, like the values c_v makes from a unit-RMS input
            nn.init.normal_(ve.weight, mean=0.0, std=1.0)
        if self.config.layer_lambdas:  # the plain residual stream, plus a small direct path from the embedding
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        head_dim, device = self.config.n_embd // self.config.n_head, self.get_device()
        inv_freq = ROTARY_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        # shaped (1, T, 1, D/2) to broadcast over (B, T, H, D/2)
        self.cos, self.sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    def get_device(self):
        return self.transformer.wte.weight.device
    def num_params(self):
        return sum(p.numel() for p in self.parameters())
    def estimate_flops(self):
        """FLOPs per token for forward + backward."""
        # 6 per matmul weight (2 forward, 4 backward; the embedding is a lookup, not a matmul) plus the
        # attention score/value matmuls, 12 * n_layer * n_head * head_dim (= n_embd) * sequence_len (no causal
        # discount, by convention)
        # (value embeddings are lookups too, and a windowed layer's queries see at most its window of keys)
        cfg = self.config
        n_lookup = self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        keys_seen = sum(min(block.attn.window, cfg.sequence_len) for block in self.transformer.h)
        return 6 * (self.num_params() - n_lookup) + 12 * cfg.n_embd * keys_seen
    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, muon_dtype=None,
                        scalar_lr=0.5, muon=None):
        """One optimizer (optim.build_optimizer): AdamW for lm_head, the embeddings and the lambdas, Muon for every
        block matrix; muon: extra Muon group settings (ns, normuon_beta2, weight_decay: optim.DEFAULTS)."""
        # sharded when torch.distributed runs (then do NOT wrap the model in DDP, see optim.py); muon_dtype:
        # Newton-Schulz precision (None: bf16 where matmuls are fast in it)
        # AdamW LRs were tuned at width 768; wider models take proportionally smaller steps
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        groups = [dict(adamw, params=list(self.lm_head.parameters()), lr=unembedding_lr * scale),
                  dict(adamw, params=list(self.transformer.wte.parameters()) + list(self.value_embeds.parameters()),
                       lr=embedding_lr * scale),
                  dict(kind="muon", params=list(self.transformer.h.parameters()), lr=matrix_lr,
                       momentum=0.95, nesterov=True, **(muon or {}))]
        if self.config.layer_lambdas:
            # the residual multiplier compounds over the layers: it moves at 1 % of the x0 lambdas' pace
            groups += [dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01, weight_decay=0.0),
                       dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, weight_decay=0.0)]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        return build_optimizer(groups, ns_dtype=muon_dtype)
    def _rotary_tables(self, idx, kv_cache):
        """(cos, sin) for the positions of idx (B, T), which continue from the cache, and per-row positions or None."""
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        positions = None
        if isinstance(t0, torch.Tensor):
            # a ragged cache (engine.RaggedKVCache) reports one position per row: row b's tokens sit at
            # t0[b], t0[b]+1, ... (the caller keeps them inside the rotary table; checking would sync);
            # insert_kv returns keys up to the longest row, and each row masks the keys past its own
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
        return (cos, sin), positions
    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) -> fp32 logits (B, T, V); with targets (B, T) (-1 = ignore) the fp32 loss, reduced
        "mean", "sum" or "none" (per token, (B, T)). kv_cache (get_pos, insert_kv; engine.py's): continue from it."""
        B, T = idx.size()
        cos_sin, positions = self._rotary_tables(idx, kv_cache)
        ops = FUSED_OPS if self.fused else PLAIN_OPS
        x = x0 = ops.norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            if self.config.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ops, cos_sin, kv_cache, positions, ve)
        x = ops.norm(x)
        # the chunked pass never holds the full (B * T, V) logits; it reads lm_head.weight itself, so
        # a wrapped lm_head (LoRA on it) takes the plain path, which calls the module
        if targets is not None and ops is FUSED_OPS and type(self.lm_head) is nn.Linear:
            loss = linear_softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                                LOGIT_SOFTCAP, loss_reduction)
        else:
            logits = LOGIT_SOFTCAP * torch.tanh(self.lm_head(x).float() / LOGIT_SOFTCAP)
            if targets is None:
                return logits
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampler (full recompute each step, no KV cache), the reference the Engine is checked against:
        yields one new id at a time after the list of ids `tokens`; temperature 0 = greedy."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            next_id = (torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1, generator=rng)
                       if temperature > 0 else torch.argmax(logits, dim=-1, keepdim=True))
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
