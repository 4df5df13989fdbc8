"""
Our GPT's forward pass written the plain way: stock PyTorch ops end to end, autograd does every
backward, the full (tokens x vocab) logits are materialised. This is how the well-known modern
small-GPT trainers write the same architecture (rotary, QK-norm, RMSNorm, ReLU^2, soft-capped
logits). Two uses:
  - the correctness reference: tests/test_gpt.py checks the model's loss and every gradient
    (hand-written backwards, chunked loss) against it;
  - the speed baseline of the same architecture in dev/bench_train.py.
It reads the parameters of a nanochat GPT, so both compute with the very same weights.
"""
import torch
import torch.nn.functional as F

from nanochat.gpt import LOGIT_SOFTCAP


def reference_loss(model, idx, targets):
    """Mean cross-entropy (targets -1 ignored) of nanochat GPT `model` on idx (B, T)."""
    cfg = model.config
    B, T = idx.shape
    n_head, n_kv_head, head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    cos, sin = model.cos[:, :T], model.sin[:, :T]

    def rms_norm(x):
        return F.rms_norm(x, (x.size(-1),))

    def rotary(x):
        x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

    x = rms_norm(model.transformer.wte(idx))
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        h = rms_norm(x)
        q = rms_norm(rotary(F.linear(h, attn.c_q.weight).view(B, T, n_head, head_dim)))
        k = rms_norm(rotary(F.linear(h, attn.c_k.weight).view(B, T, n_kv_head, head_dim)))
        v = F.linear(h, attn.c_v.weight).view(B, T, n_kv_head, head_dim)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=n_kv_head != n_head)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), attn.c_proj.weight)
        x = x + F.linear(F.relu(F.linear(rms_norm(x), mlp.c_fc.weight)).square(), mlp.c_proj.weight)
    logits = F.linear(rms_norm(x), model.lm_head.weight).float()
    logits = LOGIT_SOFTCAP * (logits / LOGIT_SOFTCAP).tanh()
    return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-1)

