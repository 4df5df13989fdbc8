"""
LoRA: fine-tune by training small low-rank adapters instead of every weight. A targeted
nn.Linear y = x W^T becomes y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen, A and B trained.

    apply_lora(model, rank=16)                      # in place; everything but the adapters frozen
    optimizer = lora_optimizer(model, lr=1e-3)      # AdamW over the adapters only
    with disable_lora(model): ref = model(x)        # DPO's reference: the same weights, adapters off
    merge_lora(model)                               # fold B @ A into W: a plain GPT again

On disk an adapter is an ordinary checkpoint whose weights are only the adapter tensors (see
checkpoint_manager.trained_state); its meta names the base model they adapt.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import build_optimizer

# Linear modules are named by the last part of their name; "c_proj" is both the attention and the
# MLP output projection ("attn.c_proj" / "mlp.c_proj" pick one). The embedding is a lookup table.
ALL_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc", "lm_head")
DEFAULT_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")

class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank adapter. It takes over the base layer's weight Parameter (no
    copy), so the state_dict keeps its ".weight" keys and gains ".lora_A"/".lora_B"."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a fresh weight
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        # A like a fresh nn.Linear (Kaiming-uniform), B zero: the model starts exactly unchanged,
        # and the first step moves B (A's gradient is zero while B is)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y

    def effective_weight(self):
        """W + scaling * B @ A, differentiable in A and B: for code that needs the weight itself
        (the fused lm_head + cross-entropy reads lm_head.weight, not lm_head(x))."""
        if not self.lora_enabled:
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged_linear(self):
        """A plain nn.Linear with weight W + scaling * B @ A, summed in at least fp32."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        linear.weight = nn.Parameter((self.weight.to(dtype) + delta).to(self.weight.dtype))
        linear.bias = self.bias
        return linear

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout_p}")

def lora_modules(model):
    """(qualified name, LoRALinear) of every adapted layer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]

def has_lora(model):
    return bool(lora_modules(model))

def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

def apply_lora(model, rank, alpha=None, dropout=0.0, targets=DEFAULT_TARGETS):
    """Wrap every targeted nn.Linear in a LoRALinear, in place, and freeze everything else.
    alpha defaults to 2 * rank (scaling 2). Returns the adapted module names."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    for t in targets:
        if t.split(".")[-1] not in ALL_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; expected names like {', '.join(ALL_TARGETS)} "
                             "(or attn.c_proj / mlp.c_proj)")
    alpha = 2.0 * rank if alpha is None else alpha  # scaling alpha / r = 2, LoRA's usual choice
    adapted = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and any(name == t or name.endswith("." + t) for t in targets)]
    if not adapted:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {targets}")
    # frozen weights get no gradients and no optimizer state: that is where LoRA saves its memory
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapted:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    model.lora_config = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets)}
    return adapted

def lora_parameters(model):
    """The trainable adapter parameters (A and B of every adapted layer), in a stable order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]

def lora_state_dict(model):
    """Only the adapter tensors, keyed like the model's state_dict ('<module>.lora_A')."""
    return {f"{name}.{part}": getattr(m, part).detach() for name, m in lora_modules(model) for part in ("lora_A", "lora_B")}

def load_lora(model, state, config=None):
    """Load adapter tensors, first applying LoRA with `config` (a meta's "lora": rank, alpha,
    dropout, targets) when the model has none. Every adapter must get a tensor and vice versa."""
    if not has_lora(model):
        if config is None:
            raise ValueError("the model has no LoRA adapters: pass the adapter config to apply them")
        apply_lora(model, config["rank"], config["alpha"], config.get("dropout", 0.0), config["targets"])
    expected = lora_state_dict(model)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing {missing[:5]}{'...' * (len(missing) > 5)}, "
                         f"unexpected {unexpected[:5]}{'...' * (len(unexpected) > 5)} (different targets or model?)")
    with torch.no_grad():
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"LoRA tensor {key}: shape {tuple(state[key].shape)} in the file, "
                                 f"{tuple(target.shape)} in the model (different rank or model size?)")
            target.copy_(state[key])
    return model

def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place:
    an ordinary GPT whose state_dict loads anywhere, trainable again."""
    for name, m in lora_modules(model):
        _replace(model, name, m.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model

@contextlib.contextmanager
def disable_lora(model):
    """Adapters off inside the block, restored after: DPO's reference model without a second copy."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.lora_enabled = was

def lora_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """AdamW over the adapters (sharded under torchrun), with "initial_lr" for the schedule."""
    # Not Muon, although A and B are matrices: Muon's orthogonalised update has a fixed spectral
    # size (times sqrt(rows/cols), large for a (d_out, r) B) on a product whose scale LoRA already
    # sets through alpha / r; LoRA's known-good hyperparameters are Adam's, and Adam's
    # per-coordinate steps are what the zero-initialised B needs to grow smoothly.
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    return build_optimizer([dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)])

def apply_lora_from_args(model, args):
    """apply_lora with the --lora-* flags (a bad flag stops the script); returns a summary line."""
    if args.lora_rank < 0 or not 0.0 <= args.lora_dropout < 1.0 or args.lora_lr <= 0:
        raise SystemExit("error: need --lora-rank >= 0, --lora-dropout in [0, 1) and --lora-lr > 0")
    try:
        adapted = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    except ValueError as e:
        raise SystemExit(f"error: --lora-targets: {e}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in lora_parameters(model))
    cfg = model.lora_config
    return (f"LoRA rank {cfg['rank']} alpha {cfg['alpha']:g} on {len(adapted)} layers ({','.join(cfg['targets'])}): "
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), the rest frozen")

def lora_tag(tag):
    """Where a LoRA run writes: <tag>_lora, beside (never mixed with) the full checkpoints of <tag>."""
    return tag if tag.endswith("_lora") else f"{tag}_lora"
