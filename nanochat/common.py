"""Shared plumbing for every stage: where artifacts live (and writing them safely), which
device/dtype to use, distributed init from torchrun's environment, rank-0 printing, wandb."""
import argparse
import contextlib
import logging
import os
import random
import tempfile
import types

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Logging and printing
def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

logger = logging.getLogger("nanochat")

def get_rank():
    # from torchrun's environment, so it works before (and without) a process group
    return int(os.environ.get("RANK", 0))

def print0(*args, **kwargs):
    """print() only on rank 0, so multi-process runs do not repeat every line N times."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

def format_eta(seconds):
    h, rem = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default (stage defaults included)."""
    def _get_help_string(self, action):
        # a help that already says what its default means ("default: the latest") is not repeated, and an
        # empty default (None, "", off) says nothing; 0 does say something (0.0 == False, hence `is False`)
        if "default" in (action.help or "") or action.default is False or action.default in (None, "", []):
            return action.help
        return super()._get_help_string(action)

class DataError(ValueError):
    """Bad or missing input data; the message names the file, line and field."""

@contextlib.contextmanager
def exit_on(*errors, prefix=""):
    """`with exit_on(ValueError): ...`: those errors (bad files, flags) end the script with their message."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {prefix}{e}")

# -----------------------------------------------------------------------------
# Where artifacts live, and writing them so that a crash never leaves half a file
def get_base_dir():
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat; created on first use."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base

def atomic_write(path, data):
    """Write `data` (bytes, str, or a function f(file) that writes) to `path` all or nothing."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # a hidden temp file in the same folder: the rename below is atomic only within one filesystem
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it gets the real name, so a power cut cannot tear it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

# -----------------------------------------------------------------------------
# Device and dtype policy (the one place that decides)
def autodetect_device_type():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

# Params stay fp32 everywhere; on CUDA the forward runs under bf16 autocast. CPU and MPS compute
# in fp32 through the very same code, which is why what the CPU tests prove holds on GPU.
def autocast_ctx(device_type):
    """Autocast context for forward passes: bf16 on CUDA SM80+ (A100/H100), a no-op elsewhere (CPU, MPS, older GPUs)."""
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()

def get_peak_flops(device_type):
    """Peak dense bf16 FLOP/s of one device, for MFU. None when unknown (CPU/MPS)."""
    # the spec sheets' dense (not 2:4 sparse) bf16 numbers; an unknown GPU just gets no MFU
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(0).lower()
    return next((flops for key, flops in [("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12),
                                          ("4090", 165e12), ("a10", 125e12), ("3090", 71e12)] if key in name), None)

# -----------------------------------------------------------------------------
# Distributed init
def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment."""
    if int(os.environ.get("RANK", -1)) != -1 and "WORLD_SIZE" in os.environ:
        return True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1

def compute_init(device_type=None, seed=42):
    """Device (cuda -> mps -> cpu unless told), process group when launched by torchrun, seeds,
    matmul precision. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type in ("cuda", "mps") and not {"cuda": torch.cuda, "mps": torch.backends.mps}[device_type].is_available():
        raise RuntimeError(f"--device {device_type} was requested but {device_type.upper()} is not available")
    random.seed(seed)  # the same seed on every rank: identical initial weights without broadcasting them
    torch.manual_seed(seed)  # the CUDA generators too
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # tf32 for the fp32 matmuls that remain
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
    else:
        device = torch.device(device_type)
        if ddp and not dist.is_initialized():  # CPU ranks (and the tests' torchrun) talk over gloo
            dist.init_process_group(backend="gloo")
    if ddp:
        dist.barrier()  # every rank is up before anyone starts work that others would wait on
        check_shared_base_dir(rank, world_size)
    if rank == 0:
        logger.info("device=%s world_size=%d", device, world_size)
    return ddp, rank, local_rank, world_size, device

def check_shared_base_dir(rank, world_size):
    """Several nodes must share the base dir: fail now, on every rank alike, when some rank cannot see it."""
    # every rank writes its optimizer shard (and rank 0 the rest) into one checkpoint folder, and --resume reads
    # them all back: on node-local disks a resume dies on the other nodes while node 0 waits 10 min in NCCL
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:
        return  # one node, one disk
    probe = os.path.join(get_base_dir(), f".shared_{os.environ.get('TORCHELASTIC_RUN_ID', '')}{os.environ.get('MASTER_PORT', '')}")
    if rank == 0:
        atomic_write(probe, "")
    dist.barrier()
    seen = [None] * world_size
    dist.all_gather_object(seen, os.path.exists(probe))
    dist.barrier()  # everyone looked before the probe goes
    if rank == 0:
        os.remove(probe)
    if blind := [r for r, ok in enumerate(seen) if not ok]:
        raise SystemExit(f"error: ranks {blind} cannot see the files rank 0 writes in NANOCHAT_BASE_DIR ({get_base_dir()} "
                         f"on rank {rank}): a multi-node run needs it on a filesystem every node shares (NFS, Lustre...)")

def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# Optional remote logging
def init_wandb(run_name, project, config, master_process):
    # only rank 0 reports; wandb finishes the run itself when the process exits
    if run_name == "dummy" or not master_process:  # --run=dummy, the default: a stand-in that logs nothing
        return types.SimpleNamespace(log=lambda *args, **kwargs: None)
    try:
        import wandb
    except ImportError as e:
        raise SystemExit(f"--run={run_name} needs wandb: `uv sync --extra wandb` (or use --run=dummy)") from e
    return wandb.init(project=project, name=run_name, config=config)
