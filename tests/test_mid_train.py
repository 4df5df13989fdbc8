"""Midtraining: packed rows of whole conversations starting at <|bos|>, assistant-only masking,
exact loader resume, loss and val bpb fall, --resume continues exactly, torchrun, bad files fail
fast, and the offline route with local copies of the datasets."""
import json
import random

import pytest
import torch

from nanochat.chat_data import PackedConversations
from posttrain_helpers import (SHARED_DATA, offline_base_dir, reverse_conversation, reverse_words,
                               run_main, run_script, tree_snapshot, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = ["--device", "cpu", "--device-batch-size", "4", "--max-seq-len", "48", "--total-batch-size", "384",
        "--log-every", "1", "--eval-tokens", "400"]

def varied_conversations(n, seed=0):
    """Reverse-a-word conversations and longer multi-turn ones, so rows mix lengths."""
    rng = random.Random(seed)
    out = []
    for word in reverse_words(n, seed):
        conversation = reverse_conversation(word)
        if rng.random() < 0.3:
            conversation["messages"] += [{"role": "user", "content": "and again, very fast"},
                                         {"role": "assistant", "content": " ".join(reversed(word)) + " , the cat runs"}]
        out.append(conversation)
    return out

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with offline_base_dir(tmp_path_factory) as (root, tok):
        write_jsonl(root / "chat.jsonl", varied_conversations(400, seed=1))
        yield root, tok

def test_rows_pack_whole_conversations_from_bos(base):
    _, tok = base
    task = varied_conversations(60, seed=2)
    renderings = {tuple(tok.render_conversation(c)[0]) for c in task}
    bos = tok.get_bos_token_id()
    loader = PackedConversations(task, tok, B=4, T=47, buffer_size=16, seed=0)
    whole = cropped = 0
    for _ in range(6):
        batch, state = next(loader)
        assert batch["inputs"].shape == (4, 47) and batch["count"] == 4 * 47  # loss on all tokens, no padding
        rows = torch.cat([batch["inputs"], batch["targets"][:, -1:]], dim=1).tolist()
        for row in rows:
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for k, (a, b) in enumerate(zip(starts, starts[1:])):
                segment = tuple(row[a:b])
                if segment in renderings:
                    whole += 1
                else:  # only the row's last conversation may be cropped, and only at its end
                    assert k == len(starts) - 2 and any(r[:len(segment)] == segment for r in renderings)
                    cropped += 1
    assert whole > cropped  # short rows (48 tokens) end with a cropped conversation most of the time
    assert state["stats"]["rows"] == 24

def test_assistant_only_loss_masks_the_rest(base):
    _, tok = base
    task = varied_conversations(30, seed=3)
    everything = next(PackedConversations(task, tok, B=2, T=47, seed=0))[0]
    assistant = next(PackedConversations(task, tok, B=2, T=47, seed=0, loss_on="assistant"))[0]
    assert torch.equal(everything["inputs"], assistant["inputs"])
    kept = assistant["targets"] != -1
    assert torch.equal(assistant["targets"][kept], everything["targets"][kept])
    assert 0 < assistant["count"] < everything["count"] and assistant["count"] == int(kept.sum())
    ids = everything["targets"][~kept]  # masked: user text and the specials around it, never <|assistant_end|>
    assert tok.encode_special("<|assistant_end|>") not in ids.tolist()
    assert tok.encode_special("<|user_start|>") in ids.tolist()

def test_loader_resumes_exactly_and_ranks_are_disjoint(base):
    _, tok = base
    task = varied_conversations(20, seed=4)  # a few epochs in 10 batches
    reference = [next(l) for l in [PackedConversations(task, tok, B=3, T=47, buffer_size=8, seed=1)] for _ in range(10)]
    state = json.loads(json.dumps(reference[3][1]))  # what a checkpoint stores
    resumed = PackedConversations(task, tok, B=3, T=47, buffer_size=8, seed=1, resume_state=state)
    for batch, _ in reference[4:]:
        assert torch.equal(next(resumed)[0]["inputs"], batch["inputs"])
    assert reference[-1][1]["cursor"][0] >= 2  # crossed epochs
    with pytest.raises(ValueError, match="T=47"):
        PackedConversations(task, tok, B=3, T=31, buffer_size=8, seed=1, resume_state=state)
    ranks = [PackedConversations(task, tok, B=1, T=47, buffer_size=5, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        next(loader)
    firsts = [{tuple(ref) for ref in loader.buffer.refs()} for loader in ranks]
    assert {p % 2 for _, p in firsts[0]} == {0} and {p % 2 for _, p in firsts[1]} == {1}

def test_midtraining_learns_saves_and_feeds_sft(base):
    root, tok = base
    trainer = run_main("mid_train", TINY + ["--data", root / "chat.jsonl", "--data-only", "--num-iterations", "30",
                                            "--eval-every", "15", "--output-tag", "mid1"])
    losses = [loss for _, loss in trainer.history]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    bpbs = [m["val_bpb"] for _, m in trainer.eval_history]
    assert [s for s, _ in trainer.eval_history] == [0, 15, 30] and bpbs[-1] < 0.7 * bpbs[0]
    from nanochat.checkpoint_manager import load_model
    _, _, meta = load_model("mid", "cpu", "eval", model_tag="mid1")
    assert meta["step"] == 30 and meta["source"] == {"stage": "base", "model_tag": "d2", "step": 0}
    assert meta["loader_state"]["kind"] == "mid conversations" and meta["val_bpb"] == bpbs[-1]
    assert "val_bpb" in (root / "report" / "midtraining.md").read_text()  # the report card's section
    # SFT starts from the mid model by default
    sft = run_main("chat_sft", ["--device", "cpu", "--model-tag", "mid1", "--data", root / "chat.jsonl", "--data-only",
                                "--eval-tasks", "--device-batch-size", "4", "--examples-per-step", "4",
                                "--num-iterations", "2", "--eval-every", "-1"])
    assert sft.meta["source"] == {"stage": "mid", "model_tag": "mid1", "step": 30,  # and what mid1 started from
                                  "source": {"stage": "base", "model_tag": "d2", "step": 0}}

def test_loss_on_assistant_flag(base):
    root, _ = base
    trainer = run_main("mid_train", TINY + ["--data", root / "chat.jsonl", "--data-only", "--num-iterations", "3",
                                            "--eval-every", "-1", "--loss-on", "assistant", "--output-tag", "mid_asst"])
    assert trainer.meta["user_config"]["loss_on"] == "assistant" and len(trainer.history) == 3

def test_resume_continues_exactly(base):
    root, _ = base
    args = TINY + ["--data", root / "chat.jsonl", "--data-only", "--num-iterations", "8", "--save-every", "4",
                   "--eval-every", "-1", "--warmup-ratio", "0.25", "--output-tag", "mid_resume"]
    full = [loss for _, loss in run_main("mid_train", args).history]
    for path in (root / "mid_checkpoints" / "mid_resume").glob("*_000008*"):  # as if killed after step 4
        path.unlink()
    resumed = run_main("mid_train", args + ["--resume"])
    assert [s for s, _ in resumed.history] == [5, 6, 7, 8]
    assert [loss for _, loss in resumed.history] == pytest.approx(full[4:], abs=1e-6)

@pytest.mark.slow
def test_torchrun_two_ranks(base):
    root, _ = base
    proc = run_script("mid_train", root, TINY + ["--data", root / "chat.jsonl", "--data-only", "--num-iterations", "3",
                                                 "--eval-every", "-1", "--output-tag", "mid_ddp"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grad accumulation: 1" in proc.stdout and "mid step 00003/00003" in proc.stdout
    meta = json.loads((root / "mid_checkpoints" / "mid_ddp" / "meta_000003.json").read_text())
    assert [s["cursor"][1] % 2 for s in meta["loader_state"]] == [0, 1]  # one loader state per rank

def test_bad_user_file_fails_fast_and_harms_nothing(base, tmp_path):
    root, _ = base
    existing = root / "mid_checkpoints" / "keep"
    existing.mkdir(parents=True, exist_ok=True)
    (existing / "meta_000001.json").write_text('{"step": 1}')
    before = tree_snapshot(root / "mid_checkpoints")
    bad = write_jsonl(tmp_path / "mine.jsonl", [reverse_conversation("abc"),
                                                 {"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(SystemExit) as error:  # no --data-only: checked before the defaults are fetched
        run_main("mid_train", TINY + ["--data", bad, "--output-tag", "keep", "--num-iterations", "1"])
    assert f"{bad}:2: messages[0].role" in str(error.value)
    assert tree_snapshot(root / "mid_checkpoints") == before

def test_local_copies_of_the_default_datasets(base, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    root, _ = base
    persona = tmp_path / "persona.json"
    persona.write_text('{"name": "tinychat", "maker": "the tests"}')
    chat = SHARED_DATA / "chat"
    trainer = run_main("mid_train", TINY + [
        "--mixture", f"gsm8k:train:{chat / 'gsm8k_train_chat.jsonl'}[:100]", f"custom:{chat / 'selfinstruct_seed_tasks_chat.jsonl'}",
        "simplespelling:train:50", "spelling:train:50", "--persona", persona, "--persona-examples", "50",
        "--val-mixture", f"gsm8k:test:{SHARED_DATA / 'eval' / 'gsm8k_test.jsonl'}[:20]",
        "--num-iterations", "2", "--eval-every", "-1", "--output-tag", "mid_shared"])
    assert len(trainer.history) == 2 and trainer.eval_history[-1][1]["val_bpb"] > 0

def test_steps_follow_from_epochs(base):
    """Without --num-iterations: one epoch = the rendered tokens of the training split (exact for a
    small mixture) / --total-batch-size."""
    root, tok = base
    from tasks.specs import train_val_mixtures
    from tasks.customjson import CustomJSON
    train, _ = train_val_mixtures([CustomJSON(str(root / "chat.jsonl"))], holdout=500)  # --data-only's split
    tokens = sum(len(tok.render_conversation(c, max_tokens=49)[0]) for c in train)
    trainer = run_main("mid_train", TINY + ["--data", root / "chat.jsonl", "--data-only", "--num-epochs", "0.25",
                                            "--eval-every", "-1", "--output-tag", "mid_epochs"])
    assert trainer.num_steps == round(0.25 * tokens / 384) > 1

