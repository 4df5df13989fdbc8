"""
Save and load checkpoints: model weights, optimizer state (one file per rank, because the
distributed optimizers shard their state) and a JSON meta record.

Layout of a checkpoint directory ($NANOCHAT_BASE_DIR/<phase>_checkpoints/<model_tag>/):
    model_<step:06d>.pt            model state_dict (rank 0)
    optim_<step:06d>_rank<r>.pt    optimizer state of rank r
    meta_<step:06d>.json           {"step", "model_config", ...} (rank 0), written LAST

Every file is written to a temporary name in the same directory and renamed into place (a
rename within a filesystem is atomic), and the meta file goes last: a step exists only once
its meta does. A process killed at any moment leaves either a complete checkpoint or one
that is invisible, never one that loads half-written.
"""
import glob
import json
import os
import re
import tempfile

import torch
import torch.distributed as dist

from nanochat.common import get_base_dir, logger

# source name -> (folder under the base dir, the script that writes it)
SOURCES = {
    "base": ("base_checkpoints", "scripts.base_train"),
    "mid": ("mid_checkpoints", "scripts.mid_train"),
    "sft": ("chatsft_checkpoints", "scripts.chat_sft"),
    "dpo": ("chatdpo_checkpoints", "scripts.chat_dpo"),
}
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the model and prefixes every key with this


def _paths(checkpoint_dir, step, rank=0):
    return (os.path.join(checkpoint_dir, f"model_{step:06d}.pt"),
            os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
            os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))


def _atomic_write(path, write):
    """write(f) into a hidden temp file next to `path`, flush it to disk, rename it into place."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0, keep_last=None):
    """
    Save one step. Rank 0 writes the model and meta; every rank writes its optimizer state
    (pass None to skip it). In a distributed run with optimizer state, call this on EVERY rank:
    the ranks meet at a barrier before rank 0 writes the meta, so a visible step always has
    all its optimizer files. keep_last=N (rank 0) then deletes all but the newest N steps.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if rank == 0:
        _atomic_write(model_path, lambda f: torch.save(model_state, f))
    if optimizer_state is not None:
        _atomic_write(optim_path, lambda f: torch.save(optimizer_state, f))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    if rank == 0:
        meta = dict(meta, step=step)
        payload = json.dumps(meta, indent=2).encode("utf-8")
        _atomic_write(meta_path, lambda f: f.write(payload))
        logger.info("saved checkpoint step %d to %s", step, checkpoint_dir)
        if keep_last:
            for old in list_steps(checkpoint_dir)[:-keep_last]:
                delete_checkpoint(checkpoint_dir, old)


def delete_checkpoint(checkpoint_dir, step):
    """Remove a step: its meta first, so it is never seen half-deleted."""
    _, _, meta_path = _paths(checkpoint_dir, step)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for path in glob.glob(os.path.join(checkpoint_dir, f"model_{step:06d}.pt")) + \
            glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")):
        os.remove(path)


def list_steps(checkpoint_dir):
    """Sorted steps that are complete (meta and model both present)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        match = re.fullmatch(r"meta_(\d+)\.json", name)
        if match and os.path.exists(os.path.join(checkpoint_dir, f"model_{match.group(1)}.pt")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optimizer_state or None, meta) of a complete step."""
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if step not in list_steps(checkpoint_dir):
        available = list_steps(checkpoint_dir)
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                                f"(available steps: {', '.join(map(str, available)) or 'none'})")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model_state = torch.load(model_path, map_location=device, weights_only=True)
    optimizer_state = None
    if load_optimizer:
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"{optim_path} is missing: step {step} was saved without optimizer "
                                    f"state for rank {rank} (or with a different number of ranks)")
        optimizer_state = torch.load(optim_path, map_location=device, weights_only=True)
    return model_state, optimizer_state, meta


def strip_compile_prefix(state_dict):
    """Undo torch.compile's key prefix. removeprefix, never lstrip: lstrip("_orig_mod.") strips
    any leading run of those *characters* and would turn e.g. "mod.weight" into "weight"."""
    return {key.removeprefix(COMPILE_PREFIX): value for key, value in state_dict.items()}


def build_model(checkpoint_dir, step, device, phase):
    """(model, tokenizer, meta) from a checkpoint; phase "train" or "eval" sets the model's mode."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    model_state = strip_compile_prefix(model_state)
    if device.type in ("cpu", "mps"):
        # bf16 weights (saved from a GPU run) compute in fp32 here, as everything else does
        model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills what the state_dict does not hold (e.g. rotary tables)
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model in {checkpoint_dir} "
                         f"only {config.vocab_size}: it was trained with a different tokenizer")
    return model, tokenizer, meta


def _lora_steps(checkpoint_dir):
    from nanochat.lora import list_lora_steps  # lora.py imports this module: import at call time
    return list_lora_steps(checkpoint_dir)


def find_largest_model(checkpoints_root):
    """The model tag to load by default: the deepest `d<N>`, else the most recently modified.
    Folders holding only LoRA adapters (<tag>_lora) count only when there is no full checkpoint."""
    tags = [t for t in os.listdir(checkpoints_root) if list_steps(os.path.join(checkpoints_root, t))] \
        if os.path.isdir(checkpoints_root) else []
    if not tags and os.path.isdir(checkpoints_root):
        tags = [t for t in os.listdir(checkpoints_root) if _lora_steps(os.path.join(checkpoints_root, t))]
    if not tags:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_root}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_root, t)))


def add_checkpoint_args(parser, default_source):
    """The flags that pick a checkpoint to evaluate: -i/--source, --model-tag, --step, --device."""
    parser.add_argument("-i", "--source", default=default_source, choices=list(SOURCES),
                        help="which checkpoint family to evaluate")
    parser.add_argument("--model-tag", default=None, help="checkpoint folder (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")


def load_model(source, device, phase, model_tag=None, step=None):
    """
    (model, tokenizer, meta) for source "base", "mid", "sft" or "dpo", read from
    $NANOCHAT_BASE_DIR/<source dir>/<model_tag>/; by default the largest model and its
    latest complete step. A folder that holds only a LoRA adapter (e.g. chatsft_checkpoints/d12_lora,
    written by --lora-rank) gives its base model with the adapter merged in: a plain GPT.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCES)}")
    folder, script = SOURCES[source]
    root = os.path.join(get_base_dir(), folder)
    try:
        model_tag = model_tag or find_largest_model(root)
        checkpoint_dir = os.path.join(root, model_tag)
        is_lora = not list_steps(checkpoint_dir) and bool(_lora_steps(checkpoint_dir))
        if not is_lora:
            step = find_last_step(checkpoint_dir) if step is None else step
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; run `python -m {script}` first") from None
    if is_lora:
        from nanochat.lora import load_model_with_lora
        logger.info("loading %s LoRA adapter %s (merged into its base model)", source, model_tag)
        return load_model_with_lora(checkpoint_dir, device, phase, step=step, merge=True)
    logger.info("loading %s model %s step %d", source, model_tag, step)
    return build_model(checkpoint_dir, step, device, phase)
