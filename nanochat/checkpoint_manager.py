"""Checkpoints: saving a training step, finding and loading one (LoRA adapters with their base), the -i/--step flags."""
import errno
import glob
import json
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, get_base_dir, logger, print0
from nanochat.lora import load_lora, merge_lora

# source name -> (folder under the base dir, the script that writes it)
SOURCES = {"base": ("base_checkpoints", "scripts.base_train"), "mid": ("mid_checkpoints", "scripts.mid_train"),
           "sft": ("chatsft_checkpoints", "scripts.chat_sft"), "dpo": ("chatdpo_checkpoints", "scripts.chat_dpo")}
DEFAULT_TAG_HELP = "the deepest d<N>, else the newest; <tag>_lora only if nothing else"  # find_largest_model's pick

# $NANOCHAT_BASE_DIR/<stage>_checkpoints/<model_tag>/ holds, per saved step,
#     model_<step:06d>.pt            weights (rank 0): all of them, or only the LoRA adapters
#     optim_<step:06d>_rank<r>.pt    optimizer state of rank r (the optimizer is sharded)
#     meta_<step:06d>.json           {"step", "model_config", ...}, written LAST: a step exists once its meta does
# A LoRA step's meta also has "lora" (rank, alpha, dropout, targets) and "base" (the source, tag
# and step of the checkpoint the adapters adapt); loading it rebuilds the base and merges them.
def _paths(checkpoint_dir, step, rank=0):
    """(model, optimizer, meta) file names of a step, in the layout the folder uses."""
    new = [os.path.join(checkpoint_dir, name) for name in
           (f"model_{step:06d}.pt", f"optim_{step:06d}_rank{rank}.pt", f"meta_{step:06d}.json")]
    # LoRA folders written before the redesign named their files lora_<step>.*: still readable
    old = [os.path.join(checkpoint_dir, name) for name in
           (f"lora_{step:06d}.pt", f"lora_optim_{step:06d}_rank{rank}.pt", f"lora_{step:06d}.json")]
    return old if os.path.exists(old[2]) and not os.path.exists(new[2]) else new

def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0, keep_last=None):
    """Save one step (optimizer_state None: none); keep_last=N then deletes all but the newest N steps."""
    # called on EVERY rank: each writes its own optimizer shard. Each file goes to a temp name, renamed into place
    # (atomic), the meta last, after a barrier: a process killed at any moment leaves a step complete or invisible
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    # this rank's temp files (atomic_write's .<name>.<random>.tmp) of any step, left by a save killed earlier
    for path in [model_path, meta_path, optim_path] if rank == 0 else [optim_path]:
        stale = f".{os.path.basename(path).replace(f'{step:06d}', '*')}.*.tmp"
        for tmp in glob.glob(os.path.join(glob.escape(checkpoint_dir), stale)):
            os.remove(tmp)
    replaced = []  # files this save renamed into place, undone if a later write fails
    try:
        if rank == 0:
            atomic_write(model_path, lambda f: torch.save(model_state, f))
            replaced.append(model_path)
        if optimizer_state is not None:
            atomic_write(optim_path, lambda f: torch.save(optimizer_state, f))
            replaced.append(optim_path)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
        if rank == 0:
            atomic_write(meta_path, json.dumps(dict(meta, step=step), indent=2))
    except BaseException as e:
        if replaced:  # a step is complete or absent: no orphan files, nor an older meta of this step that would lie
            delete_checkpoint(checkpoint_dir, step) if rank == 0 else os.remove(optim_path)
        # torch.save reports a full disk as a RuntimeError of its zip writer, with the OSError in the chain
        while e is not None and getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
            e = e.__cause__ or e.__context__
        if e is None:
            raise
        raise SystemExit(f"cannot save checkpoint step {step} to {checkpoint_dir}: {os.strerror(e.errno).lower()} "
                         f"({shutil.disk_usage(checkpoint_dir).free / 2**20:.1f} MiB free)") from None  # 1 line, not 30
    if rank == 0:
        logger.info("saved checkpoint step %d to %s", step, checkpoint_dir)
        for old in list_steps(checkpoint_dir)[:-keep_last] if keep_last else []:
            delete_checkpoint(checkpoint_dir, old)

def delete_checkpoint(checkpoint_dir, step):
    """Remove a step, meta first, so it is never seen half-deleted."""
    model_path, _, meta_path = _paths(checkpoint_dir, step)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for path in [model_path] + glob.glob(os.path.join(checkpoint_dir, f"*optim_{step:06d}_rank*.pt")):
        os.remove(path)

def list_steps(checkpoint_dir):
    """Sorted steps that are complete (meta and model both present)."""
    # a meta without its weights file (deleted by hand) is no step that can load
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    steps = {int(m.group(1)) for name in names if (m := re.fullmatch(r"(?:meta|lora)_(\d+)\.json", name))}
    return sorted(s for s in steps if os.path.exists(_paths(checkpoint_dir, s)[0]))

def find_last_step(checkpoint_dir):
    if not (steps := list_steps(checkpoint_dir)):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]

def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optimizer_state or None, meta) of a complete step."""
    if step not in list_steps(checkpoint_dir):
        available = ", ".join(map(str, list_steps(checkpoint_dir))) or "none"
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir} (available steps: {available})")
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    # weights_only: a checkpoint holds tensors and plain containers, never code to unpickle
    model_state = torch.load(model_path, map_location=device, weights_only=True)
    if load_optimizer and not os.path.exists(optim_path):
        raise FileNotFoundError(f"{optim_path} is missing: step {step} was saved without optimizer "
                                f"state for rank {rank} (or with a different number of ranks)")
    optimizer_state = torch.load(optim_path, map_location=device, weights_only=True) if load_optimizer else None
    return model_state, optimizer_state, meta

def trained_state(model):
    """What a training stage saves: the whole state_dict, or only the tensors that train (LoRA: the adapters)."""
    state = model.state_dict()
    # a generic rule, so no training code needs to know about LoRA: save what trains
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    return state if len(trained) == len(list(model.parameters())) else {name: state[name] for name in trained}

def strip_compile_prefix(state_dict):
    """Undo the "_orig_mod." that torch.compile's wrapper puts before every key."""
    # removeprefix, never lstrip: lstrip strips any leading run of those *characters* ("mod.weight" -> "weight")
    return {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}

def build_model(checkpoint_dir, step, device, phase, merge=True):
    """(model, tokenizer, meta) of a checkpoint (step None: the last); phase "train" or "eval"."""
    # a LoRA checkpoint gives its base model with the adapters applied (and merged: a plain GPT)
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    step = find_last_step(checkpoint_dir) if step is None else step
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    model_state = strip_compile_prefix(model_state)
    if "lora" in meta:  # adapters only: rebuild the base they adapt (itself maybe an adapter), then apply them
        base = meta.get("base")
        if not isinstance(base, dict) or "source" not in base:
            raise ValueError(f"{checkpoint_dir}: adapter step {step} does not say which base model it adapts "
                             "(meta field 'base': {source, model_tag, step})")
        model, tokenizer, base_meta = load_model(base["source"], device, phase, base.get("model_tag"), base.get("step"))
        if meta.get("model_config", base_meta["model_config"]) != base_meta["model_config"]:
            raise ValueError(f"{checkpoint_dir}: the adapter was trained on a model with config {meta['model_config']}, "
                             f"but the base found is {base_meta['model_config']}")
        load_lora(model, model_state, meta["lora"])
        if merge:
            merge_lora(model)
    else:
        if device.type in ("cpu", "mps"):
            # bf16 weights (saved from a GPU run) compute in fp32 here, as everything else does
            model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
        config = GPTConfig(**meta["model_config"])
        with torch.device("meta"):  # no init twice: allocate, then fill from the state_dict
            model = GPT(config)
        model.to_empty(device=device).init_weights()  # also what the state_dict does not hold (the rotary tables)
        model.load_state_dict(model_state, strict=True, assign=True)
        tokenizer = get_tokenizer()
        if tokenizer.get_vocab_size() > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model in {checkpoint_dir} "
                             f"only {config.vocab_size}: it was trained with a different tokenizer")
    model.train(phase == "train")
    return model, tokenizer, meta

def trained_tags(checkpoints_root):
    """The model tags (sub-folders) of checkpoints_root that hold at least one complete step."""
    names = sorted(os.listdir(checkpoints_root)) if os.path.isdir(checkpoints_root) else []
    return [t for t in names if list_steps(os.path.join(checkpoints_root, t))]

def find_largest_model(checkpoints_root):
    """The model tag to load by default: the deepest `d<N>`, else the most recently modified."""
    tags = trained_tags(checkpoints_root)
    # LoRA folders (<tag>_lora) count only when there is no full checkpoint to load instead
    tags = [t for t in tags if not t.endswith("_lora")] or tags
    if not tags:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_root}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    return max(depths)[1] if depths else max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_root, t)))

def add_checkpoint_args(parser, default_source):
    """The flags that pick a checkpoint to load: -i/--source, --model-tag, --step, --device."""
    parser.add_argument("-i", "--source", default=default_source, choices=list(SOURCES),
                        help="which training stage's checkpoints to load")
    parser.add_argument("--model-tag", default=None, help="checkpoint folder, e.g. d20, or d20_lora for LoRA "
                                                          f"adapters (merged into their base on load) (default: {DEFAULT_TAG_HELP})")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")

def load_model(source, device, phase, model_tag=None, step=None):
    """(model, tokenizer, meta) of stage `source`: by default its largest model's last step (meta["model_tag"])."""
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCES)}")
    folder, script = SOURCES[source]
    root = os.path.join(get_base_dir(), folder)
    try:
        model_tag = model_tag or find_largest_model(root)
        step = find_last_step(os.path.join(root, model_tag)) if step is None else step
    except FileNotFoundError as e:  # nothing trained yet: say which script makes it, and what else is there to load
        trained = [f"{name} ({', '.join(tags)})" for name, (other, _) in SOURCES.items()
                   if (tags := trained_tags(os.path.join(get_base_dir(), other)))]
        hint = f", or pick one that exists with --source/--model-tag: {'; '.join(trained)}" if trained else ""
        raise FileNotFoundError(f"{e}; run `python -m {script}` first{hint}") from None
    checkpoint_dir = os.path.join(root, model_tag)
    model, tokenizer, meta = build_model(checkpoint_dir, step, device, phase)
    # on stderr, so that a script's answer on stdout (chat_cli -p) stays clean
    print0(f"loaded {source}/{model_tag} step {step} from {checkpoint_dir}", file=sys.stderr)
    return model, tokenizer, dict(meta, model_tag=model_tag)
