"""
dev/preflight.sh (speedrun.sh's preset decision and GPU checks) and dev/setup.sh without cargo, run by
the real bash with fake nvidia-smi, df, python and uv first on a PATH that holds only what they need.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
H100 = "NVIDIA H100 80GB HBM3"

def write_tool(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path

@pytest.fixture
def box(tmp_path):
    """A fake machine: fake/ (tools a test adds), sys/ (links to the real coreutils the scripts use)."""
    fake, system = tmp_path / "fake", tmp_path / "sys"
    fake.mkdir()
    system.mkdir()
    # only these: a real nvidia-smi or cargo elsewhere in /usr/bin must not leak into a test
    for tool in ["awk", "sed", "grep", "head", "wc", "mkdir", "dirname", "cat"]:
        (system / tool).symlink_to(shutil.which(tool))
    base = tmp_path / "base"
    env = {"PATH": f"{fake}:{system}", "HOME": str(tmp_path), "NANOCHAT_BASE_DIR": str(base)}
    return fake, base, env

def fake_gpus(fake, lines, rc=0):
    """nvidia-smi answering the preflight's query (and only it) with `lines` and exit status rc."""
    text = "\n".join(lines)
    write_tool(fake, "nvidia-smi", f"""\
[ "$*" = "--query-gpu=index,name,memory.used,driver_version --format=csv,noheader,nounits" ] || exit 2
printf '%s\\n' "{text}"
exit {rc}
""")

def eight_gpus(driver="580.65.06", used=(1,) * 8):
    return [f"{i}, {H100}, {u}, {driver}" for i, u in enumerate(used)]

def fake_df(fake, free_gb):
    write_tool(fake, "df", f"""\
[ "$1" = -Pk ] || exit 2
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "/dev/fake 999999999 1 {int(free_gb * 1e9 / 1024)} 1% /"
""")

def fake_python(fake, torch_version, cuda, available):
    """What `python -c` would print for the preflight's torch question, for a torch of that build."""
    return write_tool(fake, "python", f"""\
case "$2" in *torch.cuda.is_available*) echo "{torch_version} {cuda} {available}" ;; *) exit 2 ;; esac
""")

def preflight(env, **knobs):
    return subprocess.run([BASH, "dev/preflight.sh"], cwd=REPO, env={**env, **knobs},
                          capture_output=True, text=True, timeout=60)

def a_good_gpu_node(box, free_gb=200, driver="580.65.06", used=(1,) * 8):
    fake, base, env = box
    fake_gpus(fake, eight_gpus(driver, used))
    fake_df(fake, free_gb)
    env["PY"] = str(fake_python(fake, "2.9.0+cu130", "13.0", 1))
    return env

# -----------------------------------------------------------------------------
# the preset

def test_no_nvidia_smi_is_the_cpu_preset(box):
    _, _, env = box
    out = preflight(env)
    assert (out.returncode, out.stdout) == (0, "cpu\n"), out.stderr
    out = preflight(env, PRESET="gpu")
    assert out.returncode == 1 and "PRESET=gpu but nvidia-smi lists no GPU" in out.stderr

def test_a_failing_nvidia_smi_is_no_gpu_but_says_so(box):
    fake, _, env = box
    fake_gpus(fake, ["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."], rc=9)
    out = preflight(env)
    assert (out.returncode, out.stdout) == (0, "cpu\n")
    assert "nvidia-smi failed: NVIDIA-SMI has failed" in out.stderr
    assert preflight(env, PRESET="gpu").returncode == 1

def test_explicit_cpu_asks_nothing(box):
    fake, _, env = box
    fake_gpus(fake, eight_gpus())  # GPUs there, but PRESET=cpu means cpu
    out = preflight(env, PRESET="cpu")
    assert (out.returncode, out.stdout) == (0, "cpu\n")

def test_a_typo_in_preset_is_an_error(box):
    out = preflight(box[2], PRESET="gpus")
    assert out.returncode == 1 and "PRESET=gpus: use auto, gpu or cpu" in out.stderr

def test_a_good_gpu_node_is_the_gpu_preset_with_a_summary(box):
    env = a_good_gpu_node(box)
    for preset in ["auto", "gpu"]:
        out = preflight(env, PRESET=preset)
        # stdout is the preset alone, so that PRESET=$(bash dev/preflight.sh) works
        assert (out.returncode, out.stdout) == (0, "gpu\n"), out.stderr
        assert f"preflight: 8 x {H100}, driver 580.65.06, torch 2.9.0+cu130, 200.0 GB free of" in out.stderr

# -----------------------------------------------------------------------------
# torch must see the GPUs nvidia-smi lists

def test_an_old_driver_for_torchs_cuda_stops_with_the_fix(box):
    fake, _, env = box
    fake_gpus(fake, eight_gpus(driver="550.54.15"))
    fake_df(fake, 200)
    env["PY"] = str(fake_python(fake, "2.9.0+cu130", "13.0", 0))
    out = preflight(env)
    assert out.returncode == 1 and out.stdout == ""
    for needed in ["driver 550.54.15", "CUDA 13.0", ">= 580", "update the NVIDIA driver",
                   "uv pip install torch --index-url https://download.pytorch.org/whl/cu126", "PRESET=cpu"]:
        assert needed in out.stderr, (needed, out.stderr)

def test_a_cpu_only_torch_on_a_gpu_node_stops(box):
    fake, _, env = box
    fake_gpus(fake, eight_gpus())
    env["PY"] = str(fake_python(fake, "2.9.0+cpu", "None", 0))
    out = preflight(env)
    assert out.returncode == 1 and "torch 2.9.0+cpu is a CPU-only build" in out.stderr

def test_the_real_torch_question(box):
    """The real venv python answers: its CUDA build is named with its minimum driver, unless it sees a GPU."""
    fake, _, env = box
    fake_gpus(fake, eight_gpus(driver="470.42.01"))
    fake_df(fake, 200)
    env["PY"] = str(REPO / ".venv" / "bin" / "python")
    out = preflight(env)
    if torch.cuda.is_available():
        assert (out.returncode, out.stdout) == (0, "gpu\n"), out.stderr
    else:
        assert out.returncode == 1
        assert f"torch {torch.__version__}" in out.stderr
        if torch.version.cuda:
            minimum = {"13": "580", "12": "525", "11": "450"}[torch.version.cuda.split(".")[0]]
            assert f"CUDA {torch.version.cuda} needs a driver >= {minimum}" in out.stderr
            assert "driver 470.42.01" in out.stderr

# -----------------------------------------------------------------------------
# the GPUs of the run, and the disk

def test_nproc_beyond_the_gpus_stops(box):
    env = a_good_gpu_node(box)
    out = preflight(env, NPROC="9")
    assert out.returncode == 1 and "NPROC=9 but nvidia-smi lists 8 GPU(s)" in out.stderr
    assert preflight(env, NPROC="two").returncode == 1
    assert preflight(env, NPROC="8").stdout == "gpu\n"

def test_cuda_visible_devices_limits_the_gpus_counted_and_checked(box):
    env = a_good_gpu_node(box, used=(30000, 1, 1, 1, 1, 1, 1, 1))
    out = preflight(env, CUDA_VISIBLE_DEVICES="4,5")  # the busy GPU 0 is not this run's
    assert (out.returncode, out.stdout) == (0, "gpu\n"), out.stderr
    assert f"preflight: 2 x {H100}" in out.stderr
    out = preflight(env, CUDA_VISIBLE_DEVICES="4,5", NPROC="3")
    assert out.returncode == 1 and "NPROC=3 but nvidia-smi lists 2 GPU(s)" in out.stderr

def test_a_busy_gpu_stops_unless_the_run_leaves_it_out(box):
    env = a_good_gpu_node(box, used=(1, 1, 1, 30000, 1, 1, 1, 1))
    out = preflight(env)
    assert out.returncode == 1
    assert "GPU 3: 30000 MiB in use by another process (see nvidia-smi)" in out.stderr
    # torchrun --nproc_per_node=2 uses GPUs 0 and 1
    out = preflight(env, NPROC="2")
    assert (out.returncode, out.stdout) == (0, "gpu\n"), out.stderr
    assert f"preflight: 2 x {H100}" in out.stderr

def test_too_little_disk_stops_naming_needed_and_free(box):
    env = a_good_gpu_node(box, free_gb=40)
    out = preflight(env)
    # d20: 241 shards x 0.1 GB + (2 + 3) checkpoints x 5.16 GB + 5 GB slack = 54.9 GB
    assert out.returncode == 1 and out.stdout == ""
    for needed in ["has 40.0 GB free but the run needs ~54.9 GB", "241 shards", "5 d20 checkpoints of 5.2 GB",
                   "NANOCHAT_BASE_DIR on a bigger disk", "lower KEEP_LAST"]:
        assert needed in out.stderr, (needed, out.stderr)
    # KEEP_LAST=1 saves one checkpoint: 49.7 GB, still too much; DEPTH=12 is far smaller
    assert "needs ~49.7 GB" in preflight(env, KEEP_LAST="1").stderr
    assert preflight(env, DEPTH="12").stdout == "gpu\n"

def test_shards_already_downloaded_need_no_more_disk(box):
    env = a_good_gpu_node(box, free_gb=40)
    shards = Path(env["NANOCHAT_BASE_DIR"]) / "base_data"
    shards.mkdir(parents=True)
    for i in range(241):
        (shards / f"shard_{i:05d}.parquet").touch()
    out = preflight(env)
    assert (out.returncode, out.stdout) == (0, "gpu\n"), out.stderr
    assert "40.0 GB free of 30.8 GB needed" in out.stderr
    # another corpus has a folder of its own: those FineWeb-Edu shards are none of its 241
    out = preflight(dict(env, NANOCHAT_CORPUS="climbmix"))
    assert out.returncode == 1 and "241 shards" in out.stderr, out.stderr

# -----------------------------------------------------------------------------
# dev/setup.sh on a machine without Rust

@pytest.mark.parametrize("has_cargo", [False, True])
def test_setup_without_cargo_lets_maturin_fetch_rust(box, has_cargo):
    fake, _, env = box
    calls = fake / "uv_calls"
    write_tool(fake, "uv", f'echo "$@" >> "{calls}"\n')
    if has_cargo:
        write_tool(fake, "cargo", "exit 0\n")
    out = subprocess.run([BASH, "dev/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert calls.read_text() == "sync --frozen --compile-bytecode\n"
    bootstrap = "no cargo: maturin will download a Rust toolchain" in out.stdout
    assert bootstrap != has_cargo

def test_setup_without_cargo_and_the_opt_out_stops_with_the_fix(box):
    fake, _, env = box
    calls = fake / "uv_calls"
    write_tool(fake, "uv", f'echo "$@" >> "{calls}"\n')
    out = subprocess.run([BASH, "dev/setup.sh"], cwd=REPO, env={**env, "MATURIN_NO_INSTALL_RUST": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and not calls.exists()
    assert "curl https://sh.rustup.rs -sSf | sh -s -- -y" in out.stderr
    assert '. "$HOME/.cargo/env"' in out.stderr and "unset MATURIN_NO_INSTALL_RUST" in out.stderr
