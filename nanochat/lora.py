"""LoRA: fine-tune by training small low-rank adapters instead of every weight.
    apply_lora(model, rank=16); optimizer = lora_optimizer(model, lr=1e-3)   # only the adapters train
    merge_lora(model)                                                         # fold B @ A into W: a plain GPT"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import exit_on
from nanochat.optim import build_optimizer

# Linear modules are named by the last part of their name; "c_proj" is both the attention and the
# MLP output projection ("attn.c_proj" / "mlp.c_proj" pick one). The embedding is a lookup table.
ALL_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc", "lm_head")
DEFAULT_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")

# A targeted nn.Linear y = x W^T becomes y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen, A and B trained.
# On disk: an ordinary checkpoint holding only the adapter tensors; its meta names the base model they adapt.
class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank adapter, on the base layer's own weight Parameter."""
    # no copy of W: the state_dict keeps its ".weight" keys (and gains ".lora_A"/".lora_B"), so
    # a base checkpoint loads into an adapted model and the frozen weight costs no extra memory
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a fresh weight
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.dropout_p, self.scaling = rank, float(alpha), float(dropout), alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        # A like a fresh nn.Linear (Kaiming-uniform), B zero: the model starts exactly unchanged,
        # and the first step moves B (A's gradient is zero while B is)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout, self.lora_enabled = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()), True
    def forward(self, x):
        # two thin matmuls through rank r, never the (out, in) product B @ A: cheaper for r << d
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y
    @torch.no_grad()
    def merged_linear(self):
        """A plain nn.Linear with weight W + scaling * B @ A, summed in at least fp32."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        linear.weight, linear.bias = nn.Parameter((self.weight.to(dtype) + delta).to(self.weight.dtype)), self.bias
        return linear
    def extra_repr(self):  # nn.Linear's, plus the adapter's
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"

def lora_modules(model):
    """(qualified name, LoRALinear) of every adapted layer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]

def has_lora(model):
    return bool(lora_modules(model))

def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

def apply_lora(model, rank, alpha=None, dropout=0.0, targets=DEFAULT_TARGETS):
    """Wrap every targeted nn.Linear in a LoRALinear, in place, freezing all else; returns the adapted names."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    if unknown := [t for t in targets if t.split(".")[-1] not in ALL_TARGETS]:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; expected names like {', '.join(ALL_TARGETS)} "
                         "(or attn.c_proj / mlp.c_proj)")
    alpha = 2.0 * rank if alpha is None else alpha  # scaling alpha / r = 2, LoRA's usual choice
    adapted = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and any(name == t or name.endswith("." + t) for t in targets)]
    if not adapted:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {targets}")
    # frozen weights get no gradients and no optimizer state: that is where LoRA saves its memory
    model.requires_grad_(False)
    for name in adapted:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    # what a checkpoint's meta records, so that load_lora can rebuild the same adapters
    model.lora_config = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets)}
    return adapted

def lora_parameters(model):
    """The trainable adapter parameters (A and B of every adapted layer), in a stable order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]

def lora_state_dict(model):
    """Only the adapter tensors, keyed like the model's state_dict ('<module>.lora_A')."""
    return {f"{name}.{part}": getattr(m, part).detach() for name, m in lora_modules(model) for part in ("lora_A", "lora_B")}

def load_lora(model, state, config=None):
    """Load adapter tensors into the model, first applying LoRA with `config` (a meta's "lora") if it has none."""
    if not has_lora(model):
        if config is None:
            raise ValueError("the model has no LoRA adapters: pass the adapter config to apply them")
        apply_lora(model, config["rank"], config["alpha"], config.get("dropout", 0.0), config["targets"])
    # every adapter must get a tensor of its shape and vice versa: a partial load leaves adapters at zero
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
    """Fold every adapter into its base weight, plain nn.Linear layers back (in place): a GPT that loads anywhere."""
    for name, m in lora_modules(model):
        _replace(model, name, m.merged_linear())
    model.requires_grad_(True)  # trainable again, like any GPT: a merged model may start another stage of training
    vars(model).pop("lora_config", None)  # a plain GPT again: nothing for a checkpoint to record
    return model

@contextlib.contextmanager
def disable_lora(model):
    """Adapters off inside the block, restored after: DPO's reference model without a second copy."""
    # `with disable_lora(model): ref = model(x)`: the very same weights, minus what the adapters add
    previous = {m: m.lora_enabled for _, m in lora_modules(model)}
    for m in previous:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, was in previous.items():
            m.lora_enabled = was

def lora_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """AdamW over the adapters (sharded under torchrun), with "initial_lr" for the schedule."""
    # Not Muon, although A and B are matrices: Muon's orthogonalised update has a fixed spectral size (times
    # sqrt(rows/cols), large for a (d_out, r) B) on a product whose scale LoRA already sets through alpha / r;
    # LoRA's known-good hyperparameters are Adam's, whose per-coordinate steps let the zero B grow smoothly
    if not (params := lora_parameters(model)):
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    return build_optimizer([dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)])

def apply_lora_from_args(model, args):
    """apply_lora with the --lora-* flags (a bad flag stops the script); returns a summary line."""
    if args.lora_rank < 0 or not 0.0 <= args.lora_dropout < 1.0 or args.lora_lr <= 0:
        raise SystemExit("error: need --lora-rank >= 0, --lora-dropout in [0, 1) and --lora-lr > 0")
    with exit_on(ValueError, prefix="--lora-targets: "):
        adapted = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    total, trainable = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in lora_parameters(model))
    cfg = model.lora_config
    return (f"LoRA rank {cfg['rank']} alpha {cfg['alpha']:g} on {len(adapted)} layers ({','.join(cfg['targets'])}): "
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), the rest frozen")
