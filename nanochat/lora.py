"""
LoRA: fine-tune a GPT by training small low-rank adapters instead of every weight.

Each targeted nn.Linear y = x W^T becomes y = x W^T + (alpha / r) * dropout(x) A^T B^T, with
A (r, in) random and B (out, r) zero, so the model starts out exactly unchanged. The base
weights are frozen (requires_grad False); only A and B train. For d12 (186M parameters) at rank
16 that is 2.65M parameters (1.4%): an 11 MB adapter file instead of a 740 MB checkpoint.

    apply_lora(model, rank=16, alpha=32, dropout=0.0, targets=DEFAULT_TARGETS)
    optimizer = lora_optimizer(model, lr=1e-3)            # AdamW over the adapters only
    ... train ...
    save_lora(checkpoint_dir, step, model, meta={"base": {"source": "sft", "model_tag": "d12", "step": 700}})
    with disable_lora(model): ref_logits = model(x)      # DPO's reference: same weights, adapters off
    merge_lora(model)                                     # fold B @ A into W: a plain GPT again

Targets name Linear modules by the last part of their name: c_q, c_k, c_v, c_proj, c_fc,
lm_head. "c_proj" matches both the attention output and the MLP output projection; write
"attn.c_proj" or "mlp.c_proj" for one of them. The default is every attention and MLP
projection (the embedding is a lookup table, never adapted).

mid_train, chat_sft and chat_dpo take --lora-rank R (add_lora_args) and then save only the
adapter, in <stage>_checkpoints/<tag>_lora/ (lora_tag), never mixed with full checkpoints;
checkpoint_manager.load_model recognises such a folder and returns the base with the adapter merged.

On disk, next to (not inside) a normal checkpoint directory:
    lora_<step:06d>.pt     the adapter tensors only ({"<module>.lora_A": ..., "<module>.lora_B": ...})
    lora_<step:06d>.json   {"step", "lora": {rank, alpha, dropout, targets}, "base": {source, model_tag, step},
                            "model_config": {...}, ...}; written last, so a step exists only once complete
    lora_optim_<step:06d>_rank<r>.pt   optimizer state per rank, when saved for resuming
scripts/lora_merge.py turns an adapter + its base into a normal checkpoint.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat.checkpoint_manager import _atomic_write

ALL_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc", "lm_head")
DEFAULT_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")


class LoRALinear(nn.Linear):
    """
    An nn.Linear plus a low-rank adapter. It takes over the base layer's weight Parameter itself
    (no copy), so the model's state_dict keeps its keys (".weight") and gains ".lora_A"/".lora_B".
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a fresh weight
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        # A like a fresh nn.Linear (Kaiming-uniform), B zero: the product starts at exactly 0 and
        # the first gradient step moves B (A's gradient is zero while B is)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y

    @torch.no_grad()
    def merged_linear(self):
        """A plain nn.Linear whose weight is W + scaling * B @ A (computed in at least fp32)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        linear.weight = nn.Parameter((self.weight.to(dtype) + delta).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout_p}")


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def _parse_targets(targets):
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    for t in targets:
        if t.split(".")[-1] not in ALL_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; expected names like {', '.join(ALL_TARGETS)} "
                             "(or attn.c_proj / mlp.c_proj)")
    return targets


def lora_modules(model):
    """(qualified name, LoRALinear) of every adapted layer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model):
    return bool(lora_modules(model))


def apply_lora(model, rank, alpha=None, dropout=0.0, targets=DEFAULT_TARGETS):
    """
    Wrap every targeted nn.Linear of `model` in a LoRALinear, in place, and freeze everything
    else. alpha defaults to 2 * rank (scaling 2). Returns the list of adapted module names.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = _parse_targets(targets)
    alpha = 2.0 * rank if alpha is None else alpha
    adapted = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _matches(name, targets)]
    if not adapted:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {targets}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    model.lora_config = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets)}
    return adapted


def lora_parameters(model):
    """The trainable adapter parameters (A and B of every adapted layer), in a stable order."""
    params = []
    for _, m in lora_modules(model):
        params += [m.lora_A, m.lora_B]
    return params


def lora_state_dict(model):
    """Only the adapter tensors, keyed like the model's state_dict ('<module>.lora_A')."""
    state = {}
    for name, m in lora_modules(model):
        state[f"{name}.lora_A"] = m.lora_A.detach()
        state[f"{name}.lora_B"] = m.lora_B.detach()
    return state


def load_lora(model, state, config=None):
    """
    Load adapter tensors into the model, first applying LoRA with `config` (the "lora" dict of an
    adapter's json: rank, alpha, dropout, targets) if the model has no adapters yet.
    Every adapted layer must get its tensors and every tensor must find its layer.
    """
    if not has_lora(model):
        if config is None:
            raise ValueError("the model has no LoRA adapters: pass the adapter config to apply them")
        apply_lora(model, config["rank"], config["alpha"], config.get("dropout", 0.0), config["targets"])
    expected = lora_state_dict(model)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                         "(different targets or model?)")
    with torch.no_grad():
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"LoRA tensor {key}: shape {tuple(state[key].shape)} in the file, "
                                 f"{tuple(target.shape)} in the model (different rank or model size?)")
            target.copy_(state[key])
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place.
    The result is an ordinary GPT whose state_dict loads anywhere."""
    for name, m in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.merged_linear())
    for p in model.parameters():  # apply_lora froze the base; a merged model trains like any other
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_lora(model):
    """Run the base model: adapters off inside the block, restored after. The very same weights
    serve both passes, so e.g. DPO's reference model costs no second copy of the network."""
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
    """
    AdamW over the adapters (sharded DistAdamW under torchrun), with "initial_lr" set for the
    LR schedule. Why not Muon, although A and B are 2-D matrices: Muon replaces each update by
    an orthogonalised matrix of fixed spectral size, rescaled by sqrt(rows/cols) — for a
    (d_out, r) matrix B that factor is large and applies to a product B @ A whose scale LoRA
    already sets through alpha / r. LoRA's usual hyperparameters (lr ~ 1e-4..1e-3, alpha ~ 2r)
    are known for Adam, and Adam's per-coordinate steps are what the zero-initialised B needs
    to grow smoothly; AdamW is the safe default.
    """
    from nanochat.adamw import AdamW, DistAdamW
    from nanochat.distributed import is_distributed
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    groups = [dict(params=params, lr=lr)]
    kwargs = dict(betas=betas, eps=eps, weight_decay=weight_decay)
    if is_distributed():
        optimizer = DistAdamW(groups, **kwargs)
    else:
        optimizer = AdamW(groups, **kwargs)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def add_lora_args(parser):
    """--lora-rank (0 = full fine-tuning), --lora-alpha, --lora-dropout, --lora-targets."""
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train LoRA adapters of this rank instead of all weights (0 = full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 * rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    parser.add_argument("--lora-targets", type=str, default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated Linear names to adapt, from {','.join(ALL_TARGETS)} "
                             "(also attn.c_proj / mlp.c_proj)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="AdamW learning rate for the adapters")
    return parser


def apply_lora_from_args(model, args):
    """apply_lora with the --lora-* flags of add_lora_args (on the plain model, before torch.compile);
    a bad flag stops the script with a clear message. Returns a one-line summary to print."""
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
    """The folder a LoRA run writes its adapters to: <tag>_lora, beside the full checkpoints of <tag>."""
    return tag if tag.endswith("_lora") else f"{tag}_lora"


# -----------------------------------------------------------------------------
# Adapter files

def _lora_paths(lora_dir, step):
    return os.path.join(lora_dir, f"lora_{step:06d}.pt"), os.path.join(lora_dir, f"lora_{step:06d}.json")


def _optimizer_path(lora_dir, step, rank):
    return os.path.join(lora_dir, f"lora_optim_{step:06d}_rank{rank}.pt")


def save_lora(lora_dir, step, model, meta=None, optimizer_state=None, rank=0):
    """
    Write the adapter alone, atomically: each rank's optimizer state (if given, for resuming),
    then (rank 0) the tensors, then the json that makes the step visible. In a distributed run
    with optimizer state call it on every rank. meta should name the base model:
    {"base": {"source", "model_tag", "step"}} (see load_model_with_lora).
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    os.makedirs(lora_dir, exist_ok=True)
    pt_path, json_path = _lora_paths(lora_dir, step)
    if optimizer_state is not None:
        _atomic_write(_optimizer_path(lora_dir, step, rank), lambda f: torch.save(optimizer_state, f))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's optimizer file exists before the step becomes visible
    if rank != 0:
        return pt_path
    state = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    _atomic_write(pt_path, lambda f: torch.save(state, f))
    record = dict(meta or {})
    record.update(step=step, lora=model.lora_config)
    if "model_config" not in record and hasattr(model, "config"):
        record["model_config"] = dict(vars(model.config))
    payload = json.dumps(record, indent=2).encode("utf-8")
    _atomic_write(json_path, lambda f: f.write(payload))
    return pt_path


def load_lora_optimizer(lora_dir, step, device="cpu", rank=0):
    """This rank's optimizer state saved with an adapter step (for resuming a LoRA run)."""
    path = _optimizer_path(lora_dir, step, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: step {step} was saved without optimizer state for rank {rank} "
                                "(or with a different number of ranks)")
    return torch.load(path, map_location=device, weights_only=True)


def list_lora_steps(lora_dir):
    if not os.path.isdir(lora_dir):
        return []
    steps = []
    for name in os.listdir(lora_dir):
        match = re.fullmatch(r"lora_(\d+)\.json", name)
        if match and os.path.exists(os.path.join(lora_dir, f"lora_{match.group(1)}.pt")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def load_lora_checkpoint(lora_dir, step=None, device="cpu"):
    """(adapter state, meta) of `step` (default: the latest) in lora_dir."""
    steps = list_lora_steps(lora_dir)
    if not steps:
        raise FileNotFoundError(f"no LoRA adapter (lora_<step>.pt + .json) in {lora_dir}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no LoRA adapter for step {step} in {lora_dir} (available: {steps})")
    pt_path, json_path = _lora_paths(lora_dir, step)
    with open(json_path, encoding="utf-8") as f:
        meta = json.load(f)
    for key in ("lora",):
        if key not in meta:
            raise ValueError(f"{json_path}: field {key!r} missing")
    state = torch.load(pt_path, map_location=device, weights_only=True)
    return state, meta


def load_model_with_lora(lora_dir, device, phase="eval", step=None, merge=True):
    """
    (model, tokenizer, meta): the adapter's base model (meta["base"] = {source, model_tag, step},
    loaded with checkpoint_manager.load_model) with the adapter applied, and by default merged
    (a plain GPT, as fast as the base at inference).
    """
    from nanochat.checkpoint_manager import load_model
    state, meta = load_lora_checkpoint(lora_dir, step, device=device)
    base = meta.get("base")
    if not isinstance(base, dict) or "source" not in base:
        raise ValueError(f"{lora_dir}: adapter step {meta.get('step')} does not say which base model it "
                         "adapts (json field 'base': {source, model_tag, step})")
    model, tokenizer, base_meta = load_model(base["source"], device, phase, model_tag=base.get("model_tag"),
                                             step=base.get("step"))
    if "model_config" in meta and meta["model_config"] != base_meta.get("model_config"):
        raise ValueError(f"{lora_dir}: the adapter was trained on a model with config {meta['model_config']}, "
                         f"but the base found is {base_meta.get('model_config')}")
    load_lora(model, state, meta["lora"])
    if merge:
        merge_lora(model)
    model.train(phase == "train")
    return model, tokenizer, meta
