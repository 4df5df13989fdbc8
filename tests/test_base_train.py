"""Pretraining end to end: loss falls on real text, DDP == gradient accumulation, SIGKILL + --resume
continues exactly, bad input fails before training, and the LR schedule is the right way round."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanochat.training import lr_multiplier

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "1024", "--device", "cpu"]

def make_corpus(folder, n_docs=300, seed=0):
    """Small generated text with learnable structure (a tiny grammar), a few documents per file."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"]
    verbs = ["sees", "likes", "finds", "follows", "paints", "remembers"]
    objects = ["the river", "a red ball", "the garden", "an apple", "the moon", "a blue house"]
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(3):
        docs = []
        for _ in range(n_docs // 3):
            docs.append(" ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                                 for _ in range(rng.randint(3, 8))))
        (folder / f"part{f}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return folder

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with a trained tokenizer and a corpus."""
    root = tmp_path_factory.mktemp("nanochat")
    corpus = make_corpus(root / "corpus")
    texts = [p.read_text() for p in corpus.glob("*.txt")]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=256 + len(SPECIAL_TOKENS) + 100)
    tok.save(root / "tokenizer")
    torch.save(torch.tensor(tok.token_bytes()), root / "tokenizer" / "token_bytes.pt")
    return root

def run_script(base_dir, args, timeout=300, **kw):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)

def step_losses(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"base step (\d+)/\d+ .*?\| loss ([\d.]+)", stdout)}

def test_lr_schedule_ramps_the_right_way():
    n = 100
    lrm = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.3, final_lr_frac=0.1) for s in range(n)]
    assert lrm[0] < lrm[5] < lrm[9] <= 1.0  # warmup goes up
    assert all(m == 1.0 for m in lrm[10:70])  # flat
    assert lrm[70] > lrm[85] > lrm[99] >= 0.1  # warmdown goes down, towards final_lr_frac
    assert abs(lrm[99] - (0.1 + 0.9 / 30)) < 1e-9

def test_muon_momentum_warms_up_then_down_in_the_warmdown():
    """0.85 -> 0.95 over 300 steps, flat, then linearly to --muon-momentum-final over the LR warmdown (base_train's
    0.9); the other stages' default keeps 0.95. The weight decay goes linearly to 0 alongside."""
    from types import SimpleNamespace
    from nanochat.training import set_schedule
    group = {"kind": "muon", "initial_lr": 0.02}
    optimizer = SimpleNamespace(param_groups=[group])
    def momenta(final, n=1000, steps=(0, 150, 300, 499, 500, 750, 999)):
        args = SimpleNamespace(warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0, muon_weight_decay=0.2,
                               muon_momentum_final=final)
        out = []
        for step in steps:
            set_schedule(optimizer, step, n, args)
            out.append(group["momentum"])
        return out
    assert momenta(0.9) == pytest.approx([0.85, 0.90, 0.95, 0.95, 0.95, 0.925, 0.9001])
    assert momenta(0.95) == pytest.approx([0.85, 0.90, 0.95, 0.95, 0.95, 0.95, 0.95])
    assert group["weight_decay"] == pytest.approx(0.2 * 1 / 1000)

def test_loss_falls_and_checkpoint_loads(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    from scripts import base_train
    trainer = base_train.main(TINY + ["--data", str(base_dir / "corpus"), "--num-iterations", "40",
                                      "--eval-every", "-1", "--model-tag", "falls"])
    losses = [loss for _, loss in trainer.history]
    assert len(losses) == 40  # steps are optimizer steps, whatever the accumulation
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    from nanochat.checkpoint_manager import load_model
    model, tok, meta = load_model("base", "cpu", "eval", model_tag="falls")
    assert meta["step"] == 40 and meta["val_bpb"] > 0
    x = torch.tensor([tok.encode("The cat sees the river.", prepend="<|bos|>")])
    assert model(x[:, :-1], x[:, 1:]).item() < losses[0]

@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
def test_loss_falls_on_real_text(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    book = SHARED / "pretrain" / "train" / "gutenberg" / "pg11_alice_in_wonderland.txt"
    tok = Tokenizer.train_from_iterator(iter([book.read_text()]), vocab_size=512)
    tok.save(tmp_path / "tokenizer")
    torch.save(torch.tensor(tok.token_bytes()), tmp_path / "tokenizer" / "token_bytes.pt")
    from scripts import base_train
    trainer = base_train.main(TINY + ["--data", str(book), "--num-iterations", "30", "--eval-every", "-1"])
    losses = [loss for _, loss in trainer.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0

def test_torchrun_matches_gradient_accumulation(tmp_path):
    """2 ranks × 1 micro-batch (gloo, sharded optimizers) == 1 process × 2 micro-batches,
    with and without gradient clipping."""
    results = {}
    for name, launcher in [("single", [sys.executable]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    "--standalone"])]:  # a free port, picked by torchrun
        out = tmp_path / name
        out.mkdir()
        proc = subprocess.run([*launcher, str(REPO / "tests" / "ddp_train_worker.py"), "--checkpoint-dir", str(out),
                               "--num-iterations", "8", "--warmup-ratio", "0.25", "--save-every", "4",
                               "--muon-weight-decay", "0.1"],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        results[name] = json.loads(line[7:])
        for clip in results[name]:
            results[name, clip] = torch.load(out / f"final_weights_clip{clip}.pt")
    for clip in ["0.0", "0.05"]:
        single_losses, ddp_losses = results["single"][clip], results["ddp"][clip]
        assert len(single_losses) == 8
        # tolerance: float32 sums in a different order (all-reduce vs local accumulation)
        assert max(abs(a - b) for a, b in zip(single_losses, ddp_losses)) < 1e-4, (single_losses, ddp_losses)
        single_w, ddp_w = results["single", clip], results["ddp", clip]
        for key in single_w:
            assert torch.allclose(single_w[key], ddp_w[key], atol=1e-4), key
        assert single_losses[-1] < single_losses[0]
    # clipping at 0.05 really changed the run (else the clip path would be untested)
    assert results["single"]["0.0"] != results["single"]["0.05"]

@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(base_dir):
    args = TINY + ["--data", str(base_dir / "corpus"), "--num-iterations", "16", "--eval-every", "-1",
                   "--save-every", "4", "--keep-last", "2", "--warmup-ratio", "0.1"]
    full = run_script(base_dir, args + ["--model-tag", "full"])
    assert full.returncode == 0, full.stderr[-3000:]
    # --keep-last 2: of the 4 saved steps only the newest 2 remain (and the resume below works from a rotated folder)
    assert sorted(p.name for p in (base_dir / "base_checkpoints" / "full").glob("meta_*.json")) == \
        ["meta_000012.json", "meta_000016.json"]
    reference = step_losses(full.stdout)
    assert sorted(reference) == list(range(1, 17))

    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    ckpt = base_dir / "base_checkpoints" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args, "--model-tag", "killed"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while not (ckpt / "meta_000008.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before step 8 was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = step_losses(proc.stdout.read())
    assert not (ckpt / "meta_000016.json").exists(), "killed too late: nothing left to resume"

    resumed = run_script(base_dir, args + ["--model-tag", "killed", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = step_losses(resumed.stdout)
    last_saved = min(after) - 1
    assert last_saved >= 8
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob(".*.tmp"))
    for step in range(1, 17):
        loss = after.get(step, before.get(step))
        assert loss == pytest.approx(reference[step], abs=1e-6), (step, loss, reference[step])
    # resuming as another model (other attention windows) is refused before any step, the folder left as it was
    saved = sorted(p.name for p in ckpt.iterdir())
    other = run_script(base_dir, args + ["--model-tag", "killed", "--resume", "--window-pattern", "SSSL"])
    assert other.returncode != 0 and "was trained with model_config" in other.stderr, other.stderr[-2000:]
    # and so is another batch (e.g. budget_rules' after a change of the rules): other steps, another schedule
    other = run_script(base_dir, args + ["--model-tag", "killed", "--resume", "--total-batch-size", "1024"])
    assert other.returncode != 0 and "took steps of 512 tokens, this run 1024" in other.stderr, other.stderr[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == saved

def test_bad_input_fails_before_training(base_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    cases = [
        (["--data", str(empty)], "empty"),
        (["--data", str(bad)], "x.jsonl:2"),
        (["--data", str(tmp_path / "nothing_here")], "nothing_here"),
        (["--data", str(base_dir / "corpus"), "--depth", "3", "--head-dim", "64"], "--head-dim"),
        (["--data", str(base_dir / "corpus"), "--window-pattern", "SXL"], "--window-pattern"),
    ]
    for extra, expected in cases:
        proc = run_script(base_dir, TINY + ["--num-iterations", "2"] + extra, timeout=120)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert expected in out, out[-2000:]
        assert "base step" not in out  # failed before the first step
        assert "Traceback" not in out

def test_fp8_trains_like_bf16_and_saves_the_same_checkpoint(base_dir, monkeypatch):
    """--fp8 1 on CPU (torch._scaled_mm runs there too): the same losses within fp8's error, a checkpoint like any."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    from scripts import base_train
    losses = {}
    for fp8 in ("0", "1"):
        trainer = base_train.main(TINY + ["--data", str(base_dir / "corpus"), "--num-iterations", "8",
                                          "--eval-every", "-1", "--model-tag", f"fp8_{fp8}", "--fp8", fp8])
        losses[fp8] = [loss for _, loss in trainer.history]
    assert losses["1"][-1] < 0.9 * losses["1"][0]
    assert all(abs(a - b) < 0.03 * b for a, b in zip(losses["1"], losses["0"])), losses
    from nanochat.checkpoint_manager import load_model
    model = load_model("base", "cpu", "eval", model_tag="fp8_1")[0]
    assert not any(getattr(m, "fp8", False) for m in model.modules())  # a plain model once loaded

def test_default_eval_is_one_pass_over_a_small_validation_split(base_dir, monkeypatch, capsys):
    """With the default --eval-tokens (10.5M), a small corpus's validation split is read once per
    evaluation, not looped over for minutes: the eval's forward calls == the batches of one pass."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state
    from nanochat.dataset import Corpus
    from nanochat.gpt import GPT
    from nanochat.tokenizer import get_tokenizer
    from scripts import base_train
    eval_calls = []
    forward = GPT.forward

    def counting_forward(self, idx, targets=None, loss_reduction="mean", **kw):
        if loss_reduction == "none":  # only evaluate_bpb asks for per-token losses
            eval_calls.append(idx.shape[0])
        return forward(self, idx, targets, loss_reduction=loss_reduction, **kw)
    monkeypatch.setattr(GPT, "forward", counting_forward)
    flags = [f for f in TINY if f not in ("--eval-tokens", "1024")]  # the default eval size
    base_train.main(flags + ["--data", str(base_dir / "corpus"), "--num-iterations", "2", "--eval-every", "-1",
                             "--model-tag", "onepass", "--compile", "0"])
    corpus = Corpus(str(base_dir / "corpus"), txt_doc_chars=128)  # the run's default: 2 × --max-seq-len
    one_pass = list(tokenizing_distributed_data_loader_with_state(get_tokenizer(), 4, 64, "val", data=corpus,
                                                                  num_epochs=1))
    assert 0 < len(one_pass) < 10.5e6 / (4 * 64)
    assert len(eval_calls) == len(one_pass)  # one evaluation at the end, one pass
    assert sum(eval_calls) == sum(x.shape[0] for x, _, _ in one_pass)  # the last, partial batch too
    # a small budget's tokens per parameter keep their digits: "(0.0142 per parameter)", not "(0.0 per parameter)"
    ratio = re.search(r"\(([\d.e-]+) per parameter\)", capsys.readouterr().out).group(1)
    assert float(ratio) > 0 and len(ratio.strip("0.")) >= 2

def test_default_batch_lrs_and_weight_decay_come_from_the_size(base_dir, monkeypatch):
    """--total-batch-size -1 (the default): budget_rules' batch, LRs and Muon weight decay reach the optimizer;
    an explicit batch keeps the LRs and weight decay as given."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    from scripts import base_train
    i = TINY.index("--total-batch-size")
    common = TINY[:i] + TINY[i + 2:] + ["--data", str(base_dir / "corpus"), "--num-iterations", "1", "--eval-every",
                                        "-1", "--compile", "0", "--model-tag", "budget", "--device-batch-size", "64"]
    log = base_train.main(common)
    d12 = 12 * 12 * (12 * 32) ** 2 + 2 * log.model.config.vocab_size * 12 * 32  # TINY's aspect ratio: 32
    batch, lr_scale, wd_scale = base_train.budget_rules(log.meta["num_params"], d12, 64 * 64)
    args = log.meta["user_config"]
    assert args["total_batch_size"] == batch > 64 * 64  # several micro-batches: the size rule, not the floor
    assert args["matrix_lr"] == pytest.approx(0.02 * lr_scale) and wd_scale > 1  # a model far below d12: more decay
    assert args["muon_weight_decay"] == pytest.approx(0.28 * wd_scale)
    given = base_train.main(common + ["--total-batch-size", "4096"]).meta["user_config"]
    assert (given["matrix_lr"], given["muon_weight_decay"]) == (0.02, 0.28)
