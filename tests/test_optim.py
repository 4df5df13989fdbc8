"""Tests for nanochat/optim.py: Newton-Schulz orthogonalisation, the Muon step, AdamW groups equal to
torch.optim.AdamW, refusing to resume the old [AdamW, Muon] checkpoint form, and the sharded DistMuonAdamW
under torchrun (gloo, 2 CPU processes) against a single-process replay with averaged gradients, with
and without the gradient-clipping path, and the order of its collectives."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.optim import MuonAdamW, build_optimizer, newton_schulz

import dist_optim_worker as worker

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]

@pytest.mark.parametrize("shape", [(128, 32), (32, 256)])
def test_newton_schulz_orthogonalises_rectangular(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 3.0
    s = torch.linalg.svdvals(newton_schulz(G).float())
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
    X = newton_schulz(G, dtype=torch.float32)  # the maths, free of bf16 rounding
    D = U[:, :48].T @ X @ V
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.norm() / D.norm() < 1e-4
    assert torch.diagonal(D)[:40].min() > 0.6  # all but the tiniest singular values reach ~1

def test_newton_schulz_bf16_close_to_fp32():
    """bf16 (CUDA, and CPUs with bf16 matmul hardware) gives the fp32 direction to bf16 precision."""
    torch.manual_seed(0)
    G = torch.randn(4, 64, 160)
    ref = newton_schulz(G, dtype=torch.float32)
    low = newton_schulz(G, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    # five rounds of bf16 rounding: ~5% elementwise noise, the direction itself intact
    assert ((low.float() - ref).norm() / ref.norm()) < 0.1
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.995
    s = torch.linalg.svdvals(low.float())
    assert s.min() > 0.6 and s.max() < 1.25

def test_newton_schulz_batched_equals_one_by_one():
    torch.manual_seed(0)
    G = torch.randn(3, 16, 40)
    batched = newton_schulz(G, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], dtype=torch.float32), atol=1e-6, rtol=1e-5)

def test_muon_step_is_scaled_orthogonalised_gradient(monkeypatch):
    """From zero momentum the first update is -lr * sqrt(max(1, rows/cols)) * NS(grad)
    (NS is scale invariant, so the momentum's scale factor drops out). Checked in fp32, where
    batched and one-by-one Newton-Schulz agree to rounding."""
    import nanochat.optim
    monkeypatch.setattr(nanochat.optim, "newton_schulz_dtype", lambda device: torch.float32)
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 12))
    wide = torch.nn.Parameter(torch.randn(12, 48))
    tall2 = torch.nn.Parameter(torch.randn(48, 12))
    params = [tall, wide, tall2]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.05)])
    assert len(opt.param_groups) == 2  # grouped by shape
    assert all(g["initial_lr"] == 0.05 and g["momentum"] == 0.95 for g in opt.param_groups)
    opt.step(grads_averaged=False)
    for p, p0 in zip(params, start):
        rows, cols = p.shape
        expected = p0 - 0.05 * max(1.0, rows / cols) ** 0.5 * newton_schulz(p.grad)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)

def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(5))], lr=0.02)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(5))], lr=0.02)])

def test_adamw_accepts_grads_averaged():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = build_optimizer([dict(kind="adamw", params=[p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)])
    assert type(opt) is MuonAdamW
    opt.step(grads_averaged=True)
    assert (p.detach() < 1).all()

def test_adamw_groups_are_torch_adamw_to_the_bit():
    """The AdamW groups run torch.optim.AdamW's fused kernel: the same numbers, bit for bit, with
    weight decay and an LR changed between steps."""
    torch.manual_seed(0)
    ours, theirs = [[torch.nn.Parameter(torch.randn(s)) for s in ((33, 7), (5,))] for _ in range(2)]
    for a, b in zip(ours, theirs):
        b.data.copy_(a.data)
    kwargs = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours, **kwargs)])
    ref = torch.optim.AdamW(theirs, fused=True, **kwargs)
    for step in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 0.01 * (1 - step / 4)
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

def train_steps(model, optimizers, seeds):
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, model.config.vocab_size, (2, model.config.sequence_len + 1), generator=g)
        model(idx[:, :-1], idx[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

def test_resume_refuses_the_old_two_optimizer_checkpoint(tmp_path):
    """A run saved before the one-optimizer redesign holds [AdamW state, Muon state]: --resume says it cannot go on."""
    from nanochat import training
    from nanochat.checkpoint_manager import save_checkpoint
    model = worker.make_model()
    optimizer = model.setup_optimizer()
    save_checkpoint(str(tmp_path), 5, model.state_dict(), [optimizer.state_dict(), optimizer.state_dict()], {})
    with pytest.raises(SystemExit, match=r"step 5 holds the optimizer state of an older nanochat \(two optimizers\)"):
        training.resume(True, str(tmp_path), model, optimizer, {}, torch.device("cpu"))
    # the one-optimizer form round-trips
    again = MuonAdamW([dict(g, params=list(g["params"])) for g in optimizer.param_groups])
    again.load_state_dict(optimizer.state_dict())
    assert again.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

# -----------------------------------------------------------------------------
# Sharded optimizers under torchrun

@functools.lru_cache(maxsize=None)
def replay_single_process(clip, ranks=(0, 1)):
    """What the distributed run must equal: one process, gradient = mean over the ranks' batches.
    (Cached: several tests compare against the same replay; callers only read the result.)"""
    model = worker.make_model()
    # fp32 Newton-Schulz on both sides, on any CPU: the comparison below is exact
    opt = model.setup_optimizer(muon_dtype=torch.float32)
    assert type(opt) is MuonAdamW
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
        opt.step()
        model.zero_grad(set_to_none=True)
    return model.state_dict()

def replay_odd_params():
    params = worker.make_odd_params()
    opt = torch.optim.AdamW(params, fused=True, **worker.ODD_ADAMW_KWARGS)
    for step in range(worker.STEPS):
        for p, g0, g1 in zip(params, worker.odd_grads(step, 0), worker.odd_grads(step, 1)):
            p.grad = (g0 + g1) * 0.5
        opt.step()
    return [p.detach() for p in params]

def assert_states_close(got, want, atol=1e-5, rtol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")

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
    # one AdamW arithmetic (torch's fused kernel) on slices as on whole params (sizes here are multiples of
    # any vector width), the same sums (a + b on two ranks), Newton-Schulz per matrix: the sharded run is
    # the single-process run to the bit
    assert_states_close(rank0, want, atol=0, rtol=0)
    # the comparison can tell: training on rank 0's data alone (no averaging) ends elsewhere,
    # and so does skipping/adding the clip
    assert max_difference(replay_single_process(clip, ranks=(0,)), want) > 1e-3
    assert max_difference(replay_single_process(not clip), want) > 1e-4

@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["tensor", "portable"])
def test_dist_step_launches_every_collective_before_waiting(dist_results, collectives):
    """One step of DistMuonAdamW, as recorded by the worker: every gradient reduction (AdamW slices
    and Muon chunks alike) is in flight before the first is waited on, and so is every all-gather."""
    events = load(dist_results, f"{collectives}_events", 0)
    reduce, gather = {"tensor": ("reduce_scatter_tensor", "all_gather_into_tensor"),
                      "portable": ("all_reduce", "all_gather")}[collectives]
    opt = worker.make_model().setup_optimizer()
    n_muon_chunks = sum(-(-len(g["params"]) // 2) for g in opt.param_groups if g["kind"] == "muon")
    n = 2 + n_muon_chunks  # lm_head, wte, and one per world_size Muon matrices of a shape
    assert [kind for kind, name in events if name == reduce] == ["launch"] * n + ["wait"] * n
    # (the Muon matrices gather into a list on both paths)
    assert [kind for kind, name in events if name in (gather, "all_gather")] == ["launch"] * n + ["wait"] * n

@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["tensor", "portable"])
def test_dist_adamw_pads_odd_sizes(dist_results, collectives):
    got0 = load(dist_results, f"{collectives}_odd", 0)
    got1 = load(dist_results, f"{collectives}_odd", 1)
    want = replay_odd_params()
    for a, b, w in zip(got0, got1, want):
        assert a.shape == w.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        # (not to the bit: the fused kernel's scalar tail rounds unlike its vector body, and the slices
        # move elements between the two)
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-5)
