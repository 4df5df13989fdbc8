"""A stock-ops reference of nanochat/gpt.py's forward, written from the maths and not from the model's code:
explicit softmax attention with its causal and sliding-window mask, RMSNorm, rotary and ReLU^2 by formula,
value embeddings with their gates, the residual/x0 lambdas, the soft-capped cross-entropy. It reads the
model's own parameters, so the loss and every gradient of the two can be compared (tests/test_recipe.py)."""
import math

import torch
import torch.nn.functional as F

def rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

def rotate(x, base=10000):
    """x (B, T, H, D): the pair (x[i], x[i + D/2]) of position t turned by the angle t * base^(-2i/D)."""
    T, D = x.size(1), x.size(-1)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

def window_of(config, layer):
    """Keys a query of this layer sees, itself included: the pattern's letter, the last layer always full."""
    letter = config.window_pattern.upper()[layer % len(config.window_pattern)]
    return config.sequence_len // 4 if letter == "S" and layer < config.n_layer - 1 else math.inf

def reference_loss(model, idx, targets):
    cfg, p = model.config, dict(model.named_parameters())
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    x = x0 = rms_norm(p["transformer.wte.weight"][idx])
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for layer in range(cfg.n_layer):
        pre = f"transformer.h.{layer}."
        if cfg.layer_lambdas:
            x = p["resid_lambdas"][layer] * x + p["x0_lambdas"][layer] * x0
        h = rms_norm(x)
        q = rms_norm(rotate((h @ p[pre + "attn.c_q.weight"].T).view(B, T, H, D)))
        k = rms_norm(rotate((h @ p[pre + "attn.c_k.weight"].T).view(B, T, Hkv, D)))
        v = (h @ p[pre + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if f"value_embeds.{layer}.weight" in p:  # every other layer, counted back from the last
            assert layer % 2 == (cfg.n_layer - 1) % 2
            gate_w = p[pre + "attn.ve_gate.weight"]
            gate = 2 * torch.sigmoid(h[..., :gate_w.size(1)] @ gate_w.T)
            v = v + gate[..., None] * p[f"value_embeds.{layer}.weight"][idx].view(B, T, Hkv, D)
        # query head h reads kv head h // (H / Hkv)
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        allowed = (j <= i) & (i - j < window_of(cfg, layer))
        att = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * D)
        x = x + y @ p[pre + "attn.c_proj.weight"].T
        x = x + F.relu(rms_norm(x) @ p[pre + "mlp.c_fc.weight"].T).pow(2) @ p[pre + "mlp.c_proj.weight"].T
    logits = 15 * torch.tanh(rms_norm(x) @ p["lm_head.weight"].T / 15)
    return F.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-1)
