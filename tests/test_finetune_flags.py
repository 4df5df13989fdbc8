"""The flags mid_train, chat_sft and chat_dpo share (issue 14): --source any stage, the lineage in
the checkpoint meta and the report, never saving into the checkpoint being read; a missing source
names what exists, every load says what it loaded; --data-only means only your data (no default
evals, and the meta records nothing else as trained on); an offline download names the flag and
spec behind it; an --eval-tasks task that cannot be scored is refused before the model loads."""
import json
import re

import pytest

import tasks.common
from posttrain_helpers import offline_base_dir, reverse_conversation, reverse_words, run_main, tree_snapshot, write_jsonl

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

COMMON = ["--device", "cpu", "--device-batch-size", "4", "--num-iterations", "2", "--eval-every", "-1"]
MID = COMMON + ["--max-seq-len", "48", "--total-batch-size", "192", "--eval-tokens", "192"]
SFT = COMMON + ["--examples-per-step", "4", "--eval-examples", "4"]
DPO = COMMON + ["--examples-per-step", "4", "--eval-pairs", "4", "--min-prompt-tokens", "4", "--min-response-tokens", "2"]

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with offline_base_dir(tmp_path_factory) as (root, _):
        words = reverse_words(80, seed=1)
        write_jsonl(root / "chat.jsonl", [reverse_conversation(w) for w in words])
        write_jsonl(root / "pairs.jsonl", [{"prompt": "say something " + " ".join(w), "chosen": "the cat good",
                                            "rejected": "the cat bad"} for w in words])
        yield root

@pytest.fixture
def downloads(monkeypatch):
    """The dataset files asked for; each download tried once (offline_base_dir's server is a closed port)."""
    asked, real = [], tasks.common.hf_dataset_file

    def once(repo_id, filename, **kwargs):
        asked.append(f"{repo_id}/{filename}")
        return real(repo_id, filename, attempts=1)  # the real OfflineError, without 15 s of retries
    monkeypatch.setattr(tasks.common, "hf_dataset_file", once)
    return asked

def saved_meta(root, folder, tag):
    return json.loads((root / folder / tag / "meta_000002.json").read_text())

def test_every_stage_starts_from_any_stage_and_records_the_lineage(base):
    root = base
    chat, pairs = ["--data", root / "chat.jsonl", "--data-only"], ["--data", root / "pairs.jsonl", "--data-only"]
    sft = SFT + ["--eval-tasks"]  # no evals, explicitly: so this test needs only item 1 (--data-only implies it now)
    run_main("mid_train", MID + chat + ["--output-tag", "m"])  # each stage's default source: base, mid, sft
    run_main("chat_sft", sft + chat + ["--model-tag", "m", "--output-tag", "s"])
    # SFT on the SFT model (the old --source choices were mid and base), midtraining it, DPO on DPO with LoRA
    again = run_main("chat_sft", sft + chat + ["--source", "sft", "--model-tag", "s", "--output-tag", "s2"])
    run_main("mid_train", MID + chat + ["--source", "sft", "--model-tag", "s", "--output-tag", "m2"])
    run_main("chat_dpo", DPO + pairs + ["--model-tag", "s2", "--output-tag", "p"])
    lora = run_main("chat_dpo", DPO + pairs + ["--source", "dpo", "--model-tag", "p", "--lora-rank", "2"])

    base_d2 = {"stage": "base", "model_tag": "d2", "step": 0}
    mid_m = {"stage": "mid", "model_tag": "m", "step": 2, "source": base_d2}
    sft_s = {"stage": "sft", "model_tag": "s", "step": 2, "source": mid_m}
    assert saved_meta(root, "mid_checkpoints", "m")["source"] == base_d2  # a base checkpoint has no lineage of its own
    assert saved_meta(root, "chatsft_checkpoints", "s")["source"] == mid_m
    assert saved_meta(root, "chatsft_checkpoints", "s2")["source"] == again.meta["source"] == sft_s
    assert saved_meta(root, "mid_checkpoints", "m2")["source"] == sft_s
    sft_s2 = {"stage": "sft", "model_tag": "s2", "step": 2, "source": sft_s}
    assert saved_meta(root, "chatdpo_checkpoints", "p")["source"] == sft_s2
    meta = saved_meta(root, "chatdpo_checkpoints", "p_lora")  # the adapters of the DPO model, beside it
    assert meta["source"] == lora.meta["source"] == {"stage": "dpo", "model_tag": "p", "step": 2,
                                                     "source": sft_s2}
    assert meta["base"] == {"source": "dpo", "model_tag": "p", "step": 2} and meta["stage"] == "dpo"
    # the report sections show the chain
    report = root / "report"
    assert "- source: sft s step 2 <- mid m step 2 <- base d2 step 0" in (report / "chat-sft.md").read_text()
    assert "- source: sft s step 2 <- mid m step 2 <- base d2 step 0" in (report / "midtraining.md").read_text()
    assert ("- source: dpo p step 2 <- sft s2 step 2 <- sft s step 2 <- mid m step 2 <- base d2 step 0"
            in (report / "chat-dpo.md").read_text())

    # continuing a stage into the folder it reads from is refused, with what to do, before anything is written
    before = tree_snapshot(root)
    with pytest.raises(SystemExit, match=r"would save into .*chatsft_checkpoints.s, the checkpoint it starts from "
                                         r"\(--source sft --model-tag s\): pass --output-tag"):
        run_main("chat_sft", sft + chat + ["--source", "sft", "--model-tag", "s"])
    with pytest.raises(SystemExit, match=r"chatdpo_checkpoints.p_lora, the checkpoint it starts from"):
        run_main("chat_dpo", DPO + pairs + ["--source", "dpo", "--model-tag", "p_lora", "--lora-rank", "2"])
    assert tree_snapshot(root) == before

def test_a_missing_source_names_what_exists_and_every_load_says_what_it_loaded(tmp_path_factory, capsys):
    with offline_base_dir(tmp_path_factory) as (root, _):  # a base model only
        write_jsonl(root / "pairs.jsonl", [{"prompt": "say something", "chosen": "the cat good", "rejected": "bad"}] * 20)
        data = ["--data", root / "pairs.jsonl", "--data-only"]
        with pytest.raises(SystemExit) as error:
            run_main("chat_dpo", DPO + data)  # from sft by default: there is none
        assert ("run `python -m scripts.chat_sft` first, or pick one that exists with --source/--model-tag: base (d2)"
                in str(error.value))
        capsys.readouterr()
        run_main("chat_dpo", DPO + data + ["--source", "base"])
        assert f"loaded base/d2 step 0 from {root / 'base_checkpoints' / 'd2'}\n" in capsys.readouterr().err
    # and --model-tag's help says which tag that is when none is given
    with pytest.raises(SystemExit):
        run_main("chat_dpo", ["--help"])
    assert "(default: the deepest d<N>, else the newest; <tag>_lora only if nothing else)" in \
        " ".join(capsys.readouterr().out.split())

def test_data_only_runs_no_default_evals(base, downloads):
    trainer = run_main("chat_sft", SFT + ["--source", "base", "--data", base / "chat.jsonl", "--data-only",
                                          "--output-tag", "mine"])
    assert downloads == [] and set(trainer.eval_history[-1][1]) == {"val_loss"}

@pytest.mark.parametrize("stage, flags, named", [
    ("chat_sft", SFT + ["--data-only", "--eval-tasks", "mmlu:test"], "--eval-tasks mmlu:test"),
    ("chat_sft", SFT + ["--data-only", "--val-mixture", "smoltalk:test"], "--val-mixture smoltalk:test"),
    ("mid_train", MID, "--mixture smoltalk:train"),
    ("chat_dpo", DPO, "--mixture preferences:train"),
])
def test_an_offline_download_names_the_flag_and_spec_that_asked_for_it(base, downloads, stage, flags, named):
    data = base / ("pairs.jsonl" if stage == "chat_dpo" else "chat.jsonl")
    with pytest.raises(SystemExit) as error:
        run_main(stage, flags + ["--data", data])  # the data is read before any model is loaded
    flag = named.split()[0]
    assert "offline?" in str(error.value) and len(downloads) == 1
    assert f"(from {named}: give it a local file, or list {flag} without it; `{flag}` alone means none)" in str(error.value)

def test_an_eval_task_that_cannot_be_scored_is_refused_before_the_model_loads(base, capsys):
    chat = base / "chat.jsonl"
    with pytest.raises(SystemExit) as error:
        run_main("chat_sft", SFT + ["--source", "base", "--data", chat, "--data-only", "--eval-tasks", f"custom:{chat}"])
    assert f"--eval-tasks custom:{chat}: CustomJSON has no answers to score" in str(error.value)
    assert "loaded" not in capsys.readouterr().err
    # the way it names to score your own questions: multiple choice in ARC's format
    questions = write_jsonl(base / "questions.jsonl", [{"question": f"which is {w}?", "choices": [w, w + "x"],
                                                         "answer": 0} for w in reverse_words(8, seed=3)])
    assert "arc:test:FILE ({\"question\", \"choices\": [...], \"answer\": index}" in str(error.value)
    trainer = run_main("chat_sft", SFT + ["--source", "base", "--data", chat, "--data-only",
                                          "--eval-tasks", f"arc:test:{questions}", "--output-tag", "scored"])
    assert 0 <= trainer.eval_history[-1][1][f"acc/arc:test:{questions}"] <= 1

def test_lora_meta_records_only_the_data_it_trained_on(base):
    chat = base / "chat.jsonl"
    run_main("chat_sft", SFT + ["--source", "base", "--data", chat, "--data-only", "--eval-tasks", "--lora-rank", "2",
                                "--output-tag", "only"])
    meta = saved_meta(base, "chatsft_checkpoints", "only_lora")
    assert meta["lora"]["rank"] == 2
    assert meta["user_config"]["mixture"] == [] and meta["user_config"]["data"] == [str(chat)]

@pytest.mark.parametrize("module, flag, default", [
    ("scripts.chat_sft", "--init-lr-frac", "0.2"), ("scripts.chat_dpo", "--init-lr-frac", "0.01"),
    ("scripts.mid_train", "--source", "base"), ("scripts.chat_sft", "--persona-examples", "300"),
    ("scripts.base_train", "--depth", "20"), ("scripts.chat_eval", "--max-new-tokens", "512")])
def test_help_shows_every_default_including_the_stage_ones(module, flag, default, capsys):
    """--help of a stage prints each flag's default, the stage's own where it overrides a shared flag."""
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    # its entry under options: the flag, its metavar, then a space or a comma (in the usage line, a "]")
    described = help_text[re.search(rf"{flag} (?:[A-Z_]+|{{[^}}]*}})[ ,]", help_text).end():]
    assert described[described.index("(default: "):].startswith(f"(default: {default})")
