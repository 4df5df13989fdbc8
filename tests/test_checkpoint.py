"""
nanochat.checkpoint_manager: a real round trip (model + optimizers continue identically), the
default model tag and step, atomicity under a failing write and under SIGKILL, a full disk (a
real 3 MB tmpfs: one clear line, no orphan files) and stale temp files of a killed save, the
torch.compile key prefix (removeprefix, never lstrip), clear errors, rotation, and the
distributed save (every optimizer file exists before the meta appears).
"""
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)

def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG)

def train_step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=g)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)

def save(checkpoint_dir, step, model, optimizer=None, **meta):
    cm.save_checkpoint(checkpoint_dir, step, model.state_dict(),
                       optimizer.state_dict() if optimizer else None,
                       dict(model_config=asdict(CONFIG), **meta))

@pytest.fixture
def with_tokenizer(base_dir, tiny_tokenizer):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    return base_dir

def test_round_trip_continues_training_identically(with_tokenizer):
    model = make_model()
    optimizer = model.setup_optimizer()
    train_step(model, optimizer, seed=1)
    checkpoint_dir = with_tokenizer / "base_checkpoints" / "d2"
    save(checkpoint_dir, 10, model, optimizer, val_bpb=1.25, loader_state={"cursor": [1, 2]})
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000010.json", "model_000010.pt", "optim_000010_rank0.pt"]

    model_state, optim_state, meta = cm.load_checkpoint(checkpoint_dir, 10, "cpu", load_optimizer=True)
    assert meta == {"model_config": asdict(CONFIG), "val_bpb": 1.25, "loader_state": {"cursor": [1, 2]}, "step": 10}
    restored = make_model(seed=99)
    restored.load_state_dict(model_state)
    restored_optimizer = restored.setup_optimizer()
    restored_optimizer.load_state_dict(optim_state)
    for seed in (2, 3):  # momentum buffers etc. came back: the next steps match exactly
        train_step(model, optimizer, seed)
        train_step(restored, restored_optimizer, seed)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name

    loaded, tokenizer, meta = cm.load_model("base", "cpu", "eval")
    assert not loaded.training and meta["step"] == 10 and tokenizer.get_vocab_size() == 512
    assert loaded(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)
    trained, _, _ = cm.load_model("base", "cpu", "train")
    assert trained.training and all(p.requires_grad for p in trained.parameters())

def test_defaults_pick_the_deepest_model_and_the_last_complete_step(with_tokenizer):
    root = with_tokenizer / "base_checkpoints"
    models = {tag: make_model(seed) for seed, tag in enumerate(["d2", "d10", "d4"])}
    for tag, model in models.items():
        save(root / tag, 5, model)
    save(root / "d10", 20, models["d4"])  # a later step of d10 with different weights
    torch.save({}, root / "d10" / "model_000030.pt")  # step 30: crashed before its meta -> not there

    model, _, meta = cm.load_model("base", "cpu", "eval")  # d10 (10 > 4 > 2, not "d4" > "d2" > "d10")
    assert meta["step"] == 20
    assert torch.equal(model.lm_head.weight, models["d4"].lm_head.weight)
    model, _, meta = cm.load_model("base", "cpu", "eval", model_tag="d2", step=5)
    assert torch.equal(model.lm_head.weight, models["d2"].lm_head.weight)
    assert cm.find_largest_model(str(root)) == "d10"

    # tags that are not d<N>: the most recently modified one
    other = with_tokenizer / "mid_checkpoints"
    save(other / "zebra", 1, models["d2"])
    save(other / "alpha", 1, models["d4"])
    os.utime(other / "zebra", (time.time() + 100, time.time() + 100))
    assert cm.find_largest_model(str(other)) == "zebra"

@pytest.mark.parametrize("error, raised", [(OSError(28, "No space left on device"), SystemExit),
                                           (KeyboardInterrupt(), KeyboardInterrupt), (ValueError("boom"), ValueError)])
def test_a_failed_write_leaves_no_visible_or_partial_checkpoint(base_dir, monkeypatch, error, raised):
    checkpoint_dir = base_dir / "ckpt"
    model = make_model()
    optimizer = model.setup_optimizer()
    save(checkpoint_dir, 10, model, optimizer)
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 2:  # the optimizer file: half written when the "disk fills up" (or Ctrl-C, or a bug)
            f.write(b"partial bytes")
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(raised) as failure:
        save(checkpoint_dir, 20, model, optimizer)
    monkeypatch.setattr(torch, "save", real_save)
    if raised is SystemExit:  # a full disk: one clear line; anything else goes through unchanged
        assert str(failure.value).startswith(f"cannot save checkpoint step 20 to {checkpoint_dir}: no space left on device")
    else:
        assert failure.value is error
    assert cm.list_steps(str(checkpoint_dir)) == [10]
    # the model file of step 20 was already renamed into place: removed too, no orphan
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000010.json", "model_000010.pt", "optim_000010_rank0.pt"]
    cm.load_checkpoint(str(checkpoint_dir), 10, "cpu", load_optimizer=True)
    save(checkpoint_dir, 20, model, optimizer)  # and the next attempt works
    assert cm.find_last_step(str(checkpoint_dir)) == 20

def test_a_failed_overwrite_of_a_step_before_anything_is_replaced_keeps_the_old_one(base_dir, monkeypatch):
    checkpoint_dir = base_dir / "ckpt"
    model = make_model()
    save(checkpoint_dir, 10, model, model.setup_optimizer())

    def fail(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)  # the first file (weights) fails: nothing of step 10 was touched
    with pytest.raises(SystemExit):
        save(checkpoint_dir, 10, make_model(seed=1), model.setup_optimizer())
    monkeypatch.undo()
    model_state, _, _ = cm.load_checkpoint(str(checkpoint_dir), 10, "cpu", load_optimizer=True)
    assert torch.equal(model_state["lm_head.weight"], model.lm_head.weight)

@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB tmpfs, so a save really runs out of space (mounting needs root)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a 3 MB tmpfs (needs root and mount(8)): {getattr(e, 'stderr', None) or e}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)

def assert_one_line_disk_full(failure, checkpoint_dir, step):
    message = str(failure.value)
    assert "\n" not in message and failure.value.__cause__ is None and failure.value.__suppress_context__
    assert f"cannot save checkpoint step {step} to {checkpoint_dir}: no space left on device (" in message, message
    assert " MiB free)" in message

@pytest.mark.parametrize("model_numel, optim_numel", [(1_000_000, 10),  # the weights alone do not fit
                                                      (450_000, 450_000)])  # they do, the optimizer state not
def test_a_full_disk_fails_in_one_line_and_leaves_the_earlier_step_intact(small_disk, model_numel, optim_numel):
    checkpoint_dir = small_disk / "d2"
    model = make_model()
    optimizer = model.setup_optimizer()
    save(checkpoint_dir, 1, model, optimizer)
    before = {name: (checkpoint_dir / name).read_bytes() for name in os.listdir(checkpoint_dir)}
    with pytest.raises(SystemExit) as failure:  # torch.save says "inline_container.cc ... unexpected pos"
        cm.save_checkpoint(checkpoint_dir, 2, {"w": torch.zeros(model_numel)}, {"m": torch.zeros(optim_numel)},
                           {"model_config": asdict(CONFIG)})
    assert_one_line_disk_full(failure, checkpoint_dir, 2)
    # nothing of step 2 (no weights, no temp files), step 1 byte for byte as it was, and it loads
    assert {name: (checkpoint_dir / name).read_bytes() for name in os.listdir(checkpoint_dir)} == before
    model_state, optim_state, meta = cm.load_checkpoint(str(checkpoint_dir), 1, "cpu", load_optimizer=True)
    assert meta["step"] == 1 and all(torch.equal(a, b) for a, b in zip(model_state.values(), model.state_dict().values()))
    assert cm.list_steps(str(checkpoint_dir)) == [1]

def test_temp_files_of_a_killed_save_are_cleaned_at_the_next_save(small_disk):
    checkpoint_dir = small_disk / "d2"
    checkpoint_dir.mkdir()
    # what kill -9 in mid-save leaves: atomic_write's hidden temp files, here filling most of the disk
    stale = [".model_000007.pt.k2j4h1.tmp", ".optim_000007_rank0.pt.a8x9q0.tmp", ".meta_000007.json.zz01.tmp"]
    (checkpoint_dir / stale[0]).write_bytes(bytes(2_500_000))
    for name in stale[1:]:
        (checkpoint_dir / name).write_bytes(b"partial")
    # not ours to delete: another rank's shard in flight, and files that only look alike
    others = [".optim_000007_rank1.pt.b1c2d3.tmp", "notes.tmp", ".model_000007.pt", "model_000007.pt.tmp"]
    for name in others:
        (checkpoint_dir / name).write_bytes(b"keep me")
    model = make_model()
    save(checkpoint_dir, 8, model, model.setup_optimizer())  # fits only once the stale 2.5 MB are gone
    assert sorted(os.listdir(checkpoint_dir)) == sorted(others + ["meta_000008.json", "model_000008.pt",
                                                                  "optim_000008_rank0.pt"])
    assert cm.list_steps(str(checkpoint_dir)) == [8]

def test_base_train_on_a_full_disk_exits_with_one_line(small_disk, base_dir, tiny_tokenizer):
    from conftest import sample_texts
    from scripts import base_train
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(torch.tensor(tiny_tokenizer.token_bytes()), base_dir / "tokenizer" / "token_bytes.pt")
    (base_dir / "corpus.txt").write_text(sample_texts()[0][:40_000], encoding="utf-8")
    (base_dir / "base_checkpoints").symlink_to(small_disk)  # the checkpoints go to the small disk
    (small_disk / "filler").write_bytes(bytes(2_000_000))  # leaving ~1 MB: less than the step needs
    argv = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device", "cpu",
            "--device-batch-size", "4", "--total-batch-size", "256", "--eval-tokens", "256", "--eval-every", "-1",
            "--num-iterations", "1", "--data", str(base_dir / "corpus.txt"), "--model-tag", "full"]
    with pytest.raises(SystemExit) as failure:  # what python -m scripts.base_train prints, whole, on stderr
        base_train.main(argv)
    assert_one_line_disk_full(failure, base_dir / "base_checkpoints" / "full", 1)
    assert os.listdir(small_disk / "full") == []
KILL_WRITER = """
import sys, torch
from nanochat.checkpoint_manager import save_checkpoint
step = 0
while True:
    step += 1
    state = {"w": torch.full((2_000_000,), float(step)), "b": torch.full((10,), float(step))}
    save_checkpoint(sys.argv[1], step, state, {"momentum": torch.full((500_000,), float(step))}, {"model_config": {}})
    print(step, flush=True)
"""

@pytest.mark.slow
def test_sigkill_at_any_moment_never_leaves_a_half_written_checkpoint(tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(checkpoint_dir)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few checkpoints complete, then kill in the middle of the next ones
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = cm.list_steps(str(checkpoint_dir))
    assert len(steps) >= 3
    for step in steps:
        model_state, optim_state, meta = cm.load_checkpoint(str(checkpoint_dir), step, "cpu", load_optimizer=True)
        assert meta["step"] == step
        assert (model_state["w"] == step).all() and (model_state["b"] == step).all()
        assert (optim_state["momentum"] == step).all()

def test_compile_prefix_is_removed_with_removeprefix_not_lstrip():
    state = {"_orig_mod.transformer.wte.weight": 1, "_orig_mod.dog.weight": 2, "model.weight": 3, "mod._orig_mod.x": 4}
    # lstrip("_orig_mod.") strips characters, not a prefix: "dog.weight" -> "weight", "model.weight" -> "el.weight"
    assert cm.strip_compile_prefix(state) == {"transformer.wte.weight": 1, "dog.weight": 2, "model.weight": 3,
                                              "mod._orig_mod.x": 4}

def test_compiled_model_checkpoint_loads(with_tokenizer):
    model = make_model()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # what a torch.compile'd model saves
    cm.save_checkpoint(with_tokenizer / "chatsft_checkpoints" / "d2", 3, state, None, {"model_config": asdict(CONFIG)})
    loaded, _, _ = cm.load_model("sft", "cpu", "eval")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

def test_clear_errors(with_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*base_checkpoints; run `python -m scripts.base_train` first"):
        cm.load_model("base", "cpu", "eval")
    with pytest.raises(FileNotFoundError, match="scripts.chat_dpo"):
        cm.load_model("dpo", "cpu", "eval")
    with pytest.raises(ValueError, match="unknown checkpoint source 'rl'"):
        cm.load_model("rl", "cpu", "eval")
    checkpoint_dir = with_tokenizer / "base_checkpoints" / "d2"
    save(checkpoint_dir, 7, make_model())
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 8 .*available steps: 7"):
        cm.load_model("base", "cpu", "eval", step=8)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*d3; run"):
        cm.load_model("base", "cpu", "eval", model_tag="d3")
    with pytest.raises(FileNotFoundError, match="optim_000007_rank0.pt is missing"):
        cm.load_checkpoint(str(checkpoint_dir), 7, "cpu", load_optimizer=True)
    with pytest.raises(ValueError, match="phase must be"):
        cm.build_model(str(checkpoint_dir), 7, "cpu", "inference")
    big = GPTConfig(**dict(asdict(CONFIG), vocab_size=256))
    cm.save_checkpoint(checkpoint_dir, 9, GPT(big).state_dict(), None, {"model_config": asdict(big)})
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the model .* only 256"):
        cm.build_model(str(checkpoint_dir), 9, "cpu", "eval")

def test_keep_last_rotates_old_steps(base_dir):
    checkpoint_dir = base_dir / "ckpt"
    model = make_model()
    optimizer = model.setup_optimizer()
    for step in (1, 2, 3, 4, 5):
        cm.save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer.state_dict(),
                           {"model_config": asdict(CONFIG)}, keep_last=2)
    assert cm.list_steps(str(checkpoint_dir)) == [4, 5]
    assert sorted(os.listdir(checkpoint_dir)) == sorted(
        f"{kind}_{s:06d}{suffix}" for s in (4, 5) for kind, suffix in
        [("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")])

DDP_SAVER = """
import sys, time, torch, torch.distributed as dist
from nanochat.checkpoint_manager import save_checkpoint
rank, checkpoint_dir, init_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
if rank == 1:
    time.sleep(0.5)  # a slow rank: rank 0 must wait for it before declaring the step complete
save_checkpoint(checkpoint_dir, 4, {"w": torch.zeros(3)}, {"rank": torch.tensor(rank)}, {"model_config": {}}, rank=rank)
dist.destroy_process_group()
"""

@pytest.mark.slow
def test_distributed_save_writes_meta_after_every_rank(tmp_path):
    checkpoint_dir = str(tmp_path / "ckpt")
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SAVER, str(rank), checkpoint_dir, str(tmp_path / "init")],
                              cwd=REPO_ROOT) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    meta_time = os.path.getmtime(os.path.join(checkpoint_dir, "meta_000004.json"))
    assert os.path.getmtime(os.path.join(checkpoint_dir, "optim_000004_rank1.pt")) <= meta_time
    for rank in (0, 1):
        _, optim_state, meta = cm.load_checkpoint(checkpoint_dir, 4, "cpu", load_optimizer=True, rank=rank)
        assert optim_state["rank"].item() == rank and meta["step"] == 4
