"""
nanochat/report.py: sections are appended as markdown blocks (atomically, rank 0 only), reset
starts a new run with an environment header, generate writes a complete report.md (every section
in pipeline order, tokenizer, summary table BASE | MID | SFT | DPO with the latest values, wall
time and cost); and the real eval scripts' sections feed the summary.
"""
import datetime
import os

import pytest
import torch

from nanochat import report as report_module
from nanochat.report import DummyReport, Report, get_report, parse_blocks, slugify

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture
def clock(monkeypatch):
    """report._now() returns 10:00:00, then one more minute at every call (or what is set)."""
    state = {"t": datetime.datetime(2026, 1, 2, 10, 0, 0)}

    def now():
        value = state["t"].strftime(report_module.TIME_FORMAT)
        state["t"] += datetime.timedelta(minutes=1)
        return value
    monkeypatch.setattr(report_module, "_now", now)
    return state

def test_log_appends_blocks(base_dir, clock):
    report = get_report()
    path = report.log(section="Base model training", data=[{"depth": 4, "lr": 0.02, "tag": "d4", "ok": True},
                                                          {"val_bpb": 1.23456, "tokens": 1234567}])
    assert os.path.basename(path) == "base-model-training.md" == slugify("Base model training") + ".md"
    report.log(section="Base model training", data={"val_bpb": 1.1})
    report.log(section="Chat evaluation (sft)", data=["| a | b |\n|---|---|\n| 1 | 2 |", {"task_ppl:my data": 12.5}])
    text = open(path).read()
    assert text.count("## Base model training") == 2
    blocks = parse_blocks(text)
    assert blocks[0] == ("Base model training", "2026-01-02 10:00:00",
                         {"depth": "4", "lr": "0.0200", "tag": "d4", "ok": "True", "val_bpb": "1.2346", "tokens": "1,234,567"})
    assert blocks[1][1:] == ("2026-01-02 10:01:00", {"val_bpb": "1.1000"})
    chat = open(base_dir / "report" / "chat-evaluation-sft.md").read()
    assert "| a | b |" in chat and parse_blocks(chat)[0][2] == {"task_ppl:my data": "12.5000"}
    assert sorted(os.listdir(base_dir / "report")) == ["base-model-training.md", "chat-evaluation-sft.md"]  # no temp files

def test_only_rank_zero_writes(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log(section="Base model training", data=[{"a": 1}])
    report.reset()
    report.generate()
    assert not (base_dir / "report").exists()

def test_reset_starts_a_new_run(base_dir, clock):
    report = get_report()
    report.log(section="Old run", data={"x": 1})
    header = report.reset()
    assert sorted(os.listdir(base_dir / "report")) == ["header.md"]
    text = open(header).read()
    for key in ("git_commit", "platform", "cpus", "memory", "python", "torch", "gpus"):
        assert f"- {key}: " in text
    assert f"- torch: {torch.__version__}" in text
    assert "Run started: 2026-01-02 10:01:00" in text  # after the old run's section at 10:00

def full_run(report, clock):
    """The sections a whole pipeline logs, out of order, some twice."""
    report.reset()                                                               # 10:00
    report.log(section="Chat evaluation (sft)", data=[{"source": "sft"}, {"ARC-Easy": 0.40, "MMLU": 0.31, "GSM8K": 0.05,
                                                      "HumanEval": 0.06, "SpellingBee": 0.9, "ARC-Challenge": 0.3,
                                                      "ChatCORE": 0.2, "task_ppl:books": 7.5}])
    report.log(section="Tokenizer training", data=[{"vocab_size": 512}])
    report.log(section="Base model training", data=[{"depth": 2}, {"min_val_bpb": 1.5, "training_time_min": 90.0}])
    report.log(section="CORE evaluation (base)", data=[{"copa": 0.1}, {"CORE": 0.12}])
    report.log(section="Loss evaluation (base)", data=[{"train_bpb": 1.01, "val_bpb": 1.02}])
    report.log(section="Midtraining", data=[{"val_bpb": 0.95, "training_time_min": 20.0}])
    report.log(section="Chat evaluation (mid)", data=[{"ARC-Easy": 0.35, "task_ppl:books": 9.25}])
    report.log(section="Chat evaluation (sft)", data=[{"GSM8K": 0.07}])  # a later re-run of one task
    report.log(section="Custom experiment", data=[{"note": "anything else goes at the end"}])
    clock["t"] = datetime.datetime(2026, 1, 2, 12, 30, 0)
    report.log(section="Chat evaluation (dpo)", data=[{"ARC-Easy": 0.41, "task_ppl:books": 7.0}])  # 12:30, the last

def test_generate_writes_a_complete_report(base_dir, clock, tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(base_dir / "tokenizer")
    report = get_report()
    full_run(report, clock)
    out_dir = tmp_path / "copies"
    out_dir.mkdir()
    path = report.generate(out=str(out_dir))  # a folder: the copy goes into it as report.md
    text = open(path).read()
    assert path == str(base_dir / "report" / "report.md") and open(out_dir / "report.md").read() == text
    assert text.startswith("# nanochat training report")
    order = ["## Environment", "## Tokenizer\n", "## Tokenizer training", "## Base model training",
             "## Loss evaluation (base)", "## CORE evaluation (base)", "## Midtraining", "## Chat evaluation (mid)",
             "## Chat evaluation (sft)", "## Chat evaluation (dpo)", "## Custom experiment", "## Summary", "## Time and cost"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions), order
    assert f"- vocab_size: {tiny_tokenizer.get_vocab_size():,}" in text
    summary = text[text.index("## Summary"):text.index("## Time and cost")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["Metric"] == ["BASE", "MID", "SFT", "DPO"]
    assert rows["CORE"] == ["0.1200", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3500", "0.4000", "0.4100"]
    assert rows["GSM8K"] == ["-", "-", "0.0700", "-"]  # the latest value logged wins
    assert rows["ChatCORE"] == ["-", "-", "0.2000", "-"]
    assert rows["val bpb"] == ["1.0200", "0.9500", "-", "-"]  # base: the loss eval; mid: its training run
    assert rows["task ppl books"] == ["-", "9.2500", "7.5000", "7.0000"]
    for name in ("MMLU", "HumanEval", "ARC-Challenge", "SpellingBee"):
        assert rows[name][2] != "-"
    timing = text[text.index("## Time and cost"):]
    assert "training time (sum over stages): 1h50m00s" in timing
    assert "total wall clock time: 2h30m00s" in timing
    assert "n/a (no GPU" in timing

def test_cost_estimate_with_gpus(base_dir, clock, tmp_path, monkeypatch):
    report = get_report()
    full_run(report, clock)
    real_environment = report_module.environment
    monkeypatch.setattr(report_module, "environment",
                        lambda: dict(real_environment(), gpu_count=8, gpus="8 x NVIDIA H100 80GB HBM3 (80 GiB)"))
    text = open(report.generate(gpu_hourly_cost=2.5)).read()
    assert "- GPU hours: 20.00 (8 x NVIDIA H100" in text  # 2.5 h x 8
    assert "- estimated cost: $50.00 at $2.50 per GPU-hour" in text

def test_generate_without_reset_or_sections(base_dir, tmp_path):
    text = open(Report(str(base_dir / "report")).generate()).read()
    assert "start time unknown" in text and "(no metrics logged yet)" in text and "## Environment" in text

def test_cli(base_dir, clock, tmp_path, monkeypatch, capsys):
    """generate writes under the base dir only, never into the folder it runs from; --out PATH adds a copy."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    report_module.main(["reset"])
    get_report().log(section="CORE evaluation (base)", data={"CORE": 0.25})
    capsys.readouterr()
    report_module.main(["generate"])
    written = base_dir / "report" / "report.md"
    assert "| CORE | 0.2500 | - | - | - |" in written.read_text()
    assert capsys.readouterr().out.strip() == f"wrote {written}"
    assert os.listdir(cwd) == []
    copy = tmp_path / "elsewhere" / "card.md"
    report_module.main(["generate", "--gpu-hourly-cost", "4", "--out", str(copy)])
    assert copy.read_text() == written.read_text() and os.listdir(cwd) == []
    assert capsys.readouterr().out.strip() == f"wrote {written} and a copy at {copy}"
    with pytest.raises(SystemExit):
        report_module.main(["publish"])

@pytest.mark.slow
def test_real_eval_sections_feed_the_summary(base_dir, tiny_tokenizer, tmp_path):
    """base_loss, base_eval and chat_eval on tiny checkpoints, then the report card."""
    from test_core_eval import FIXTURES, make_checkpoint
    make_checkpoint(base_dir, tiny_tokenizer)
    make_checkpoint(base_dir, tiny_tokenizer, source_dir="chatsft_checkpoints", seed=1)
    get_report().reset()
    from scripts import base_eval, base_loss, chat_eval
    from conftest import sample_texts
    book = tmp_path / "book.txt"
    book.write_text(sample_texts()[0][:50_000])
    loss = base_loss.main(["--device", "cpu", "--data", str(book), "--split-tokens", "1024", "--device-batch-size", "2",
                           "--sample-tokens", "4", "--prompt", "Once upon a time"])
    assert loss["train_bpb"] > 0 and loss["val_bpb"] > 0 and loss["samples"][0][0] == "Once upon a time"
    core = base_eval.main(["--device", "cpu", "--data-dir", str(FIXTURES), "--tasks", "copa,winograd"])
    chat = chat_eval.main(["-i", "sft", "--device", "cpu", "-a", "ARC-Easy|MMLU", "--data-dir", str(FIXTURES),
                           "--task-ppl", str(FIXTURES / "conversations.jsonl")])
    text = open(get_report().generate()).read()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in text[text.index("## Summary"):].splitlines() if line.startswith("| ")}
    assert rows["CORE"][0] == f"{core['core']:.4f}"
    assert rows["val bpb"][0] == f"{loss['val_bpb']:.4f}"
    assert rows["ARC-Easy"][2] == f"{chat['results']['ARC-Easy']:.4f}"
    assert rows["task ppl conversations"][2] == f"{chat['task_ppl']['conversations']['ppl']:.4f}"
    assert rows["task bpb conversations"][2] == f"{chat['task_ppl']['conversations']['bpb']:.4f}"
    assert "'Once upon a time' -> " in text

