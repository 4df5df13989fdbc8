"""Tests for nanochat/muon.py and nanochat/adamw.py: Newton-Schulz orthogonalisation, the Muon
step, and the sharded DistMuon + DistAdamW under torchrun (gloo, 2 CPU processes) against a
single-process replay with averaged gradients, with and without the gradient-clipping path."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.adamw import AdamW
from nanochat.muon import Muon, zeropower_via_newtonschulz5

import dist_optim_worker as worker

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(128, 32), (32, 256)])
def test_newton_schulz_orthogonalises_rectangular(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 3.0
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G).float())
    # the quintic coefficients trade exactness for speed: values land near 1, not on it
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 2  # the input was far from orthogonal


def test_newton_schulz_keeps_singular_vectors():
    """Output = U f(S) V^T: same singular vectors as the input, only the values change,
    even for an ill-conditioned input (condition number 1000)."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    S = torch.logspace(0, -3, 48)
    G = U[:, :48] @ torch.diag(S) @ V.T
    X = zeropower_via_newtonschulz5(G, dtype=torch.float32)  # the maths, free of bf16 rounding
    D = U[:, :48].T @ X @ V
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.norm() / D.norm() < 1e-4
    assert torch.diagonal(D)[:40].min() > 0.6  # all but the tiniest singular values reach ~1


def test_newton_schulz_bf16_close_to_fp32():
    """bf16 (CUDA, and CPUs with bf16 matmul hardware) gives the fp32 direction to bf16 precision."""
    torch.manual_seed(0)
    G = torch.randn(4, 64, 160)
    ref = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    low = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    # five rounds of bf16 rounding: ~5% elementwise noise, the direction itself intact
    assert ((low.float() - ref).norm() / ref.norm()) < 0.1
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.995
    s = torch.linalg.svdvals(low.float())
    assert s.min() > 0.6 and s.max() < 1.25


def test_newton_schulz_batched_equals_one_by_one():
    torch.manual_seed(0)
    G = torch.randn(3, 16, 40)
    batched = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], zeropower_via_newtonschulz5(G[i], dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_muon_step_is_scaled_orthogonalised_gradient(monkeypatch):
    """From zero momentum the first update is -lr * sqrt(max(1, rows/cols)) * NS(grad)
    (NS is scale invariant, so the momentum's scale factor drops out). Checked in fp32, where
    batched and one-by-one Newton-Schulz agree to rounding."""
    import nanochat.muon
    monkeypatch.setattr(nanochat.muon, "newton_schulz_dtype", lambda device: torch.float32)
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 12))
    wide = torch.nn.Parameter(torch.randn(12, 48))
    tall2 = torch.nn.Parameter(torch.randn(48, 12))
    params = [tall, wide, tall2]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params, lr=0.05)
    assert len(opt.param_groups) == 2  # grouped by shape
    opt.step(grads_already_averaged=False)
    for p, p0 in zip(params, start):
        rows, cols = p.shape
        expected = p0 - 0.05 * max(1.0, rows / cols) ** 0.5 * zeropower_via_newtonschulz5(p.grad)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_adamw_accepts_grads_already_averaged():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    AdamW([p], lr=0.1).step(grads_already_averaged=True)
    assert (p.detach() < 1).all()


# -----------------------------------------------------------------------------
# Sharded optimizers under torchrun

@functools.lru_cache(maxsize=None)
def replay_single_process(clip, ranks=(0, 1)):
    """What the distributed run must equal: one process, gradient = mean over the ranks' batches.
    (Cached: several tests compare against the same replay; callers only read the result.)"""
    model = worker.make_model()
    # fp32 Newton-Schulz on both sides: bf16 would round float-order noise (fused vs sharded AdamW
    # sum their terms differently) up to bf16-sized steps and blur what is compared here
    optimizers = model.setup_optimizers(muon_dtype=torch.float32)
    assert type(optimizers[0]).__name__ == "AdamW" and type(optimizers[1]).__name__ == "Muon"
    params = list(model.parameters())
    for step in range(worker.STEPS):
        grads = []
        for rank in ranks:
            x, y = worker.batch(step, rank)
            model.zero_grad(set_to_none=True)
            model(x, y).backward()
            grads.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in grads) * (1.0 / len(ranks))
        if clip:
            torch.nn.utils.clip_grad_norm_(params, worker.GRAD_CLIP)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model.state_dict()


def replay_odd_params():
    params = worker.make_odd_params()
    opt = torch.optim.AdamW(params, **worker.ODD_ADAMW_KWARGS)
    for step in range(worker.STEPS):
        for p, g0, g1 in zip(params, worker.odd_grads(step, 0), worker.odd_grads(step, 1)):
            p.grad = (g0 + g1) * 0.5
        opt.step()
    return [p.detach() for p in params]


def assert_states_close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_optim")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "dist_optim_worker.py"), str(out_dir)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out_dir


def load(out_dir, name, rank):
    return torch.load(out_dir / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["tensor", "portable"])
@pytest.mark.parametrize("clip", [False, True])
def test_dist_optimizers_match_single_process(dist_results, collectives, clip):
    name = f"{collectives}_{'clip' if clip else 'noclip'}"
    rank0, rank1 = load(dist_results, name, 0), load(dist_results, name, 1)
    assert_states_close(rank1, rank0, atol=0)  # the all-gathers leave every rank identical
    want = replay_single_process(clip)
    assert_states_close(rank0, want)
    # the comparison can tell: training on rank 0's data alone (no averaging) ends elsewhere,
    # and so does skipping/adding the clip
    assert max_difference(replay_single_process(clip, ranks=(0,)), want) > 1e-3
    assert max_difference(replay_single_process(not clip), want) > 1e-4



@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["tensor", "portable"])
def test_dist_adamw_pads_odd_sizes(dist_results, collectives):
    got0 = load(dist_results, f"{collectives}_odd", 0)
    got1 = load(dist_results, f"{collectives}_odd", 1)
    want = replay_odd_params()
    for a, b, w in zip(got0, got1, want):
        assert a.shape == w.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-5)
