"""scripts/generate.py: batch generation with our engine. Batched == one prompt at a time (greedy), a SIGKILL'd run
resumes without duplicates or gaps, prompts from .txt/.jsonl (chat, Alpaca) and from a template filled by .csv/.jsonl
rows, and bad input named by file:line before the model loads."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from posttrain_helpers import REPO, env_for, make_base_dir
from scripts.generate import main

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base dir with a tokenizer and an sft checkpoint whose logits are far from ties (random output layers)."""
    root = tmp_path_factory.mktemp("generate")
    tok = make_base_dir(root)
    from nanochat.checkpoint_manager import load_checkpoint
    state, _, meta = load_checkpoint(str(root / "base_checkpoints" / "d2"), 0, "cpu")
    torch.manual_seed(1)
    for name in state:  # an untrained GPT starts with zero output projections and a near-zero lm_head
        if name.endswith(("c_proj.weight", "lm_head.weight")):
            state[name] = torch.randn_like(state[name]) * 0.3
    save_checkpoint(str(root / "chatsft_checkpoints" / "d2"), 5, state, None, meta)
    return root

def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]

def test_batched_equals_one_at_a_time_and_prompt_formats(base, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    prompts = tmp_path / "p.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": "x"}]}
             for w in ("cat", "dog", "the cat runs", "hello")]
    lines.append({"instruction": "reverse", "input": "c a t"})  # Alpaca, no output: a prompt
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for batch in (1, 4):
        assert main(["--prompts", str(prompts), "--out", str(tmp_path / f"b{batch}.jsonl"), "--batch-size",
                     str(batch), "--max-tokens", "12", "--num-samples", "2", "--temperature", "0.9"]) == 0
    one, four = records(tmp_path / "b1.jsonl"), records(tmp_path / "b4.jsonl")
    assert len(one) == 10 and {r["id"] for r in one} == {r["id"] for r in four}
    # each sample row has its own seeded generator: batching changes neither greedy nor sampled output
    assert sorted((r["id"], r["completion"]) for r in one) == sorted((r["id"], r["completion"]) for r in four)
    assert one[-1]["prompt"] == [{"role": "user", "content": "reverse\n\nc a t"}]
    assert one[0]["prompt"] == [{"role": "user", "content": "say cat"}]  # the final reply is not part of the prompt

def test_template_filled_from_csv_and_jsonl(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    (tmp_path / "c.csv").write_text('animal,verb\ncat,runs\n"dog, big",sleeps\n')
    out = tmp_path / "t.jsonl"
    with pytest.raises(SystemExit, match=r"c.csv:2: no value for \{fast\}"):
        main(["--template", "the {animal} {verb} {fast}", "--fill", str(tmp_path / "c.csv"), "--out", str(out)])
    assert not out.exists()  # refused before the model loaded, nothing written
    assert main(["--template", "the {animal} {verb}", "--fill", str(tmp_path / "c.csv"), "--out", str(out),
                 "--max-tokens", "4"]) == 0
    assert [r["prompt"][0]["content"] for r in records(out)] == ["the cat runs", "the dog, big sleeps"]
    (tmp_path / "f.jsonl").write_text('{"animal": "cat", "verb": "naps"}\n')
    assert main(["--template", "the {animal} {verb}", "--fill", str(tmp_path / "f.jsonl"), "--out", str(out),
                 "--max-tokens", "4"]) == 0
    assert len(records(out)) == 3
    (tmp_path / "bad.csv").write_text("animal,verb\ncat\n")
    with pytest.raises(SystemExit, match=r"bad.csv:2: expected 2 cells"):
        main(["--template", "{animal}", "--fill", str(tmp_path / "bad.csv"), "--out", str(out)])

@pytest.mark.slow
def test_sigkill_then_rerun_completes_without_duplicates(base, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"say the cat {i} runs\n" for i in range(100)))
    args = ["--prompts", str(prompts), "--batch-size", "4", "--max-tokens", "8"]
    reference = tmp_path / "ref.jsonl"
    done = subprocess.run([sys.executable, "-m", "scripts.generate", *args, "--out", str(reference)], cwd=REPO,
                          env=env_for(base), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.generate", *args, "--out", str(out)], cwd=REPO,
                            env=env_for(base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out.exists() and len(out.read_bytes().splitlines()) >= 30):
        assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(out.read_bytes().splitlines()) < 100, "killed too late"
    rerun = subprocess.run([sys.executable, "-m", "scripts.generate", *args, "--out", str(out)], cwd=REPO,
                           env=env_for(base), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got, want = records(out), records(reference)
    assert len(got) == 100 and len({r["id"] for r in got}) == 100  # no duplicate, no gap
    assert sorted((r["id"], r["completion"]) for r in got) == sorted((r["id"], r["completion"]) for r in want)
