"""dev/gpu_check.py, the GPU proof: its --dry-run (CPU, tiny shapes, the very same checks) passes every row, so the
script cannot rot between the rare runs on a GPU; without CUDA and without --dry-run it says so and stops."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# every row of the table, and what the dry run must report there (the SDPA kernels are CUDA's only)
EXPECTED = {"1-2 compile, plain path": "PASS", "1-2 compile, fused path": "PASS",
            "3 train d1, compiled plain": "PASS", "3 train d1, eager fused": "PASS", "3 train d2, compiled plain": "PASS",
            "3 train d2, compiled fp8": "PASS", "4 largest batch d2": "PASS", "5 SFT, dynamic shapes": "PASS",
            "5 DPO, dynamic shapes": "PASS", "6 decode, batch 1": "PASS", "6 decode, batch 8": "PASS",
            "7 attention kernel vs masked math": "n/a", "7 fp8 matmul vs fp32": "PASS"}

def run_check(*args):
    return subprocess.run([sys.executable, "-m", "dev.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)

@pytest.mark.slow
def test_dry_run_passes_every_row():
    out = run_check("--dry-run")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # the table: after its header, "check | result | detail" rows up to the verdict
    lines = out.stdout.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("check ") and "| result | detail" in line)
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("verdict: "):
            break
        name, result, detail = (part.strip() for part in line.split(" | ", 2))
        rows[name] = result
        assert detail, f"row {name!r} has no detail"
    assert rows == EXPECTED
    assert "verdict: PASS" in out.stdout

@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs the real thing")
def test_without_cuda_it_asks_for_the_dry_run():
    out = run_check()
    assert out.returncode != 0 and "--dry-run" in out.stderr and "no CUDA device" in out.stderr

def test_the_fa3_check_passes_on_fa3s_semantics_and_fails_on_a_wrong_window(monkeypatch):
    """FA3 runs on Hopper only: here its documented semantics in maths (tests/test_hopper.py) stand in for the
    kernel, so that the check's own code runs, and a kernel off by one key in the window must FAIL it."""
    from dev import gpu_check
    from tests.test_hopper import fa3_math
    torch.set_num_threads(1)
    monkeypatch.setattr(gpu_check, "flash_attn3", lambda: SimpleNamespace(flash_attn_func=fa3_math))
    ok, detail = gpu_check.check_attention(gpu_check.SHAPES["cpu"], torch.device("cpu"))
    assert ok is True and "grads w16" in detail, detail
    wider = lambda q, k, v, causal, window_size: fa3_math(q, k, v, causal, (window_size[0] + 1, 0))  # noqa: E731
    monkeypatch.setattr(gpu_check, "flash_attn3", lambda: SimpleNamespace(flash_attn_func=wider))
    assert gpu_check.check_attention(gpu_check.SHAPES["cpu"], torch.device("cpu"))[0] is False
