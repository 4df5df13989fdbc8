"""A run over several nodes needs one base dir that every rank sees (each rank writes its optimizer shard there):
compute_init checks it on every rank and stops them all, with a message, instead of hanging at the first resume.
Two gloo ranks stand in for two nodes: LOCAL_WORLD_SIZE=1 (one rank per "node"), each with its own or a shared dir."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# each rank sees the base dir given for it, as each node of a real cluster would see its own disk or the shared one
WORKER = """
import os, sys
os.environ["LOCAL_WORLD_SIZE"] = "1"
os.environ["NANOCHAT_BASE_DIR"] = sys.argv[1 + int(os.environ["RANK"])]
from nanochat.common import compute_init, compute_cleanup
compute_init("cpu")
print("RANK", os.environ["RANK"], "STARTED", flush=True)
compute_cleanup()
"""

def run_two_nodes(dir0, dir1):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "--no-python", sys.executable, "-c", WORKER, str(dir0), str(dir1)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)

def test_node_local_base_dirs_stop_every_rank_with_the_fix(tmp_path):
    proc = run_two_nodes(tmp_path / "node0", tmp_path / "node1")
    assert proc.returncode != 0
    assert "STARTED" not in proc.stdout  # neither rank went on to work the other would wait for
    assert "ranks [1] cannot see the files rank 0 writes" in proc.stderr and "shares" in proc.stderr
    assert not [p for p in (tmp_path / "node0").iterdir()]  # the probe file is gone

def test_a_shared_base_dir_passes(tmp_path):
    proc = run_two_nodes(tmp_path / "shared", tmp_path / "shared")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("STARTED") == 2
    assert not list((tmp_path / "shared").iterdir())
