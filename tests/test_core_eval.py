"""
CORE (nanochat/core_eval.py, scripts/base_eval.py): scripted models that know the answers score
1.0, that avoid them 0.0, that guess come out near chance; continuation spans and left-cropping;
few-shot sampling; a real-shaped core.yaml; the eval bundle downloaded from a loopback server
(retries, offline message); bad data named by file:line; the real script end to end on a
tiny GPT checkpoint; and two torchrun ranks giving the single-process score.
"""
import csv
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanochat.common import DataError
from nanochat.core_eval import (CoreTask, bundle_tasks, centered, download_eval_bundle, evaluate_core, evaluate_task,
                                fewshot_examples, load_items, local_tasks, render_prompts, subset_indices,
                                tokenize_prompts)
from nanochat.download import DownloadError

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "eval"

# -----------------------------------------------------------------------------
# A scripted "model": logits derived from the batch itself

def right_endings(tasks):
    """The text every right answer row ends with (the item + its gold continuation)."""
    endings = set()
    for task in tasks:
        for item in load_items(task):
            if task.task_type == "multiple_choice":
                endings.add(item["query"] + task.continuation_delimiter + item["choices"][item["gold"]])
            elif task.task_type == "schema":
                endings.add(item["context_options"][item["gold"]] + task.continuation_delimiter + item["continuation"])
            else:
                endings.add(item["context"].rstrip() + task.continuation_delimiter + item["continuation"])
    return endings

class ScriptedLM(nn.Module):
    """
    mode "right": a row that reads as a right answer gets each of its own next tokens predicted
    with high confidence (it 'knows' the answer); other rows get flat logits.
    mode "wrong": the opposite (and for a single-row LM item, confidently the wrong next token).
    mode "random": seeded random logits.
    Padding (<|bos|> after the row) is stripped before reading a row.
    """

    def __init__(self, tokenizer, endings, mode):
        super().__init__()
        self.tokenizer, self.endings, self.mode = tokenizer, endings, mode
        self.vocab = tokenizer.get_vocab_size()
        self.rng = torch.Generator().manual_seed(0)
        self.calls = 0

    def is_right(self, row):
        ids = row.tolist()
        while ids and ids[-1] == self.tokenizer.get_bos_token_id():
            ids.pop()
        text = self.tokenizer.decode(ids)
        # a row cropped from the left (to fit the model) may be just the tail of a right answer
        return any(text.endswith(ending) or ending.endswith(text) for ending in self.endings)

    def forward(self, idx):
        self.calls += 1
        B, T = idx.shape
        if self.mode == "random":
            return torch.randn(B, T, self.vocab, generator=self.rng)
        logits = torch.zeros(B, T, self.vocab)
        next_ids = torch.roll(idx, -1, dims=1)
        for b in range(B):
            right = self.is_right(idx[b])
            if self.mode == "right" and right:
                logits[b].scatter_(1, next_ids[b][:, None], 10.0)
            elif self.mode == "wrong" and not right:
                logits[b].scatter_(1, next_ids[b][:, None], 10.0)
            elif self.mode == "wrong" and B == 1:  # a language-modeling item: predict other tokens
                logits[b].scatter_(1, ((next_ids[b] + 1) % self.vocab)[:, None], 10.0)
        return logits

@pytest.fixture(scope="module")
def fixture_tasks():
    tasks = local_tasks(FIXTURES)
    assert {t.label for t in tasks} == {"arc_easy", "arc_challenge", "hellaswag", "copa", "winograd", "bigbench_operators"}
    return tasks

@pytest.mark.parametrize("max_seq_len", [None, 40])
def test_scripted_models_score_one_and_zero(fixture_tasks, tiny_tokenizer, max_seq_len):
    """Every task type, with full prompts and with prompts cropped from the left to 40 tokens."""
    endings = right_endings(fixture_tasks)
    for mode, expected in [("right", 1.0), ("wrong", 0.0)]:
        model = ScriptedLM(tiny_tokenizer, endings, mode)
        for task in fixture_tasks:
            items = load_items(task)
            accuracy = evaluate_task(model, tiny_tokenizer, task, items, "cpu", max_seq_len=max_seq_len)
            assert accuracy == expected, (mode, task.label, max_seq_len)
        assert model.calls == sum(len(load_items(t)) for t in fixture_tasks)  # one forward per item
    out = evaluate_core(ScriptedLM(tiny_tokenizer, endings, "right"), tiny_tokenizer, fixture_tasks, "cpu", log=None)
    assert out["core"] == 1.0
    out = evaluate_core(ScriptedLM(tiny_tokenizer, endings, "wrong"), tiny_tokenizer, fixture_tasks, "cpu", log=None)
    by_task = out["results"]
    assert by_task["copa"]["accuracy"] == 0.0 and by_task["copa"]["centered"] == -1.0  # 2 choices: 0 is 2x below chance
    assert by_task["arc_easy"]["centered"] == pytest.approx(-1 / 3)
    assert by_task["bigbench_operators"]["centered"] == 0.0
    expected_core = sum(centered(0.0, t.random_baseline) for t in fixture_tasks) / len(fixture_tasks)
    assert out["core"] == pytest.approx(expected_core)

def test_random_model_is_near_chance(shared_data, tiny_tokenizer):
    tasks = [t for t in local_tasks(shared_data / "eval") if t.label in ("winogrande", "openbook_qa", "lambada_openai")]
    model = ScriptedLM(tiny_tokenizer, set(), "random")
    out = evaluate_core(model, tiny_tokenizer, tasks, "cpu", max_per_task=400, log=None)["results"]
    assert out["winogrande"]["num_items"] == 400
    # 400 items: the standard deviation of a chance accuracy is <= 0.025; allow 4 of them
    assert abs(out["winogrande"]["accuracy"] - 0.5) < 0.1
    assert abs(out["openbook_qa"]["accuracy"] - 0.25) < 0.09
    assert out["lambada_openai"]["accuracy"] < 0.02  # an exact greedy match by luck: ~never

def test_continuation_spans_and_left_crop(tiny_tokenizer):
    item = {"query": "The sky is", "choices": ["blue today.", "made of cheese."], "gold": 0}
    shots = [{"query": "Grass is", "choices": ["green.", "loud."], "gold": 0}]
    prompts = render_prompts(item, "multiple_choice", " ", shots)
    assert prompts[0][1] == "Grass is green.\n\nThe sky is blue today."
    assert prompts[1][0] == "Grass is green.\n\nThe sky is "
    full = tokenize_prompts(tiny_tokenizer, prompts)
    for (ids, start, end), choice in zip(full, item["choices"]):
        assert ids[0] == tiny_tokenizer.get_bos_token_id()
        assert end == len(ids)
        assert tiny_tokenizer.decode(ids[start:end]) == " " + choice  # the delimiter space joins the word
    cropped = tokenize_prompts(tiny_tokenizer, prompts, max_len=12)
    for (ids, start, end), (full_ids, full_start, full_end) in zip(cropped, full):
        assert len(ids) == end == 12 and ids == full_ids[-12:]  # the end is kept, the beginning dropped
        assert start == full_start - (len(full_ids) - 12) >= 1
    tiny = tokenize_prompts(tiny_tokenizer, prompts, max_len=2)  # shorter than the continuation
    assert all(start == 1 and end == 2 for _, start, end in tiny)
    # schema: the same continuation after each context; LM: trailing context space is not doubled
    schema = render_prompts({"context_options": ["A cat", "A dog"], "continuation": "barks.", "gold": 1}, "schema", " ")
    assert schema == [("A cat ", "A cat barks."), ("A dog ", "A dog barks.")]
    assert render_prompts({"context": "2 + 2 = ", "continuation": "4"}, "language_modeling", " ") == [("2 + 2 = ", "2 + 2 = 4")]

def test_fewshot_examples_are_other_items_and_stable():
    items = [{"i": i} for i in range(30)]
    for index in range(30):
        shots = fewshot_examples(items, index, 10)
        assert len(shots) == 10 and items[index] not in shots
        assert len({s["i"] for s in shots}) == 10
        assert shots == fewshot_examples(items, index, 10)
    assert fewshot_examples(items, 3, 0) == []
    assert len(fewshot_examples(items[:4], 0, 10)) == 3  # a tiny task gives what it has
    assert fewshot_examples(items, 1, 5) != fewshot_examples(items, 2, 5)
    assert subset_indices(100, 10) == subset_indices(100, 10) and len(subset_indices(100, 10)) == 10
    assert subset_indices(5, 10) == subset_indices(5, -1) == list(range(5))

def test_local_task_mapping(fixture_tasks):
    hellaswag = next(t for t in fixture_tasks if t.label == "hellaswag")
    first = load_items(hellaswag)[0]
    assert first["query"].startswith("A man is standing at a sink") and first["gold"] == 0 and len(first["choices"]) == 4
    with pytest.raises(DataError, match="none of the CORE task files"):
        local_tasks(FIXTURES / "core" / "nothing")

def test_bad_items_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    cases = [
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "multiple_choice", "bad.jsonl:2: field 'gold'"),
        ('{"query": "q", "choices": ["a"], "gold": 0}', "multiple_choice", "bad.jsonl:2: field 'choices'"),
        ('{"context_options": ["a", "b"], "gold": 0}', "schema", "bad.jsonl:2: field 'continuation'"),
        ('{"context": "x", "continuation": ""}', "language_modeling", "bad.jsonl:2: field 'continuation'"),
        ('{"context": "x", "continuation": "y"', "language_modeling", "bad.jsonl:2: Expecting"),
        ('[1, 2]', "language_modeling", "bad.jsonl:2: expected a JSON object"),
    ]
    good = {"multiple_choice": '{"query": "q", "choices": ["a", "b"], "gold": 0}',
            "schema": '{"context_options": ["a", "b"], "continuation": "c", "gold": 1}',
            "language_modeling": '{"context": "x", "continuation": "y"}'}
    for line, task_type, message in cases:
        path.write_text(good[task_type] + "\n" + line + "\n")
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            load_items(CoreTask("t", task_type, str(path)))
    with pytest.raises(DataError, match="not found"):
        load_items(CoreTask("t", "schema", str(tmp_path / "missing.jsonl")))

# -----------------------------------------------------------------------------
# The eval bundle: core.yaml + eval_meta_data.csv + eval_data/

CORE_YAML = """\
# a trimmed core.yaml in the bundle's own style
icl_tasks:
- label: copa
  dataset_uri: commonsense_reasoning/copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: arc_easy
  dataset_uri: world_knowledge/arc_easy.jsonl  # 10-shot
  num_fewshot:
  - 10
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: winograd
  dataset_uri: language_understanding/winograd_wsc.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: ' '
  has_categories: false
- label: bigbench_operators
  dataset_uri: symbolic_problem_solving/bigbench_operators.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
  continuation_delimiter: 'it''s '
  metric_names:
  - InContextLearningLMAccuracy
other_settings:
  - label: not_a_task
"""

def make_bundle(root):
    bundle = root / "eval_bundle"
    for uri, source in [("commonsense_reasoning/copa.jsonl", "core/copa.jsonl"),
                        ("world_knowledge/arc_easy.jsonl", "arc_easy.jsonl"),
                        ("language_understanding/winograd_wsc.jsonl", "core/winograd_wsc.jsonl"),
                        ("symbolic_problem_solving/bigbench_operators.jsonl", "core/bigbench_operators.jsonl")]:
        (bundle / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / source, bundle / "eval_data" / uri)
    (bundle / "core.yaml").write_text(CORE_YAML)
    (bundle / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?\n"
        "copa,commonsense reasoning,multiple choice,0,50,\narc_easy,world knowledge,multiple choice,10,25,\n"
        "winograd,language understanding,schema,0,50,\nbigbench_operators,symbolic problem solving,lm,3,0,\n")
    return bundle

def test_bundle_tasks_read_a_real_shaped_core_yaml(tmp_path):
    """Flow and block lists, a '-' alone on its line, double- and single-quoted delimiters with
    escapes, comments, and settings CORE does not use (here and after icl_tasks)."""
    bundle = make_bundle(tmp_path)
    tasks = [(t.label, t.task_type, Path(t.path).relative_to(bundle / "eval_data").as_posix(), t.num_fewshot,
              t.continuation_delimiter) for t in bundle_tasks(bundle)]
    assert tasks == [("copa", "multiple_choice", "commonsense_reasoning/copa.jsonl", 0, " "),
                     ("arc_easy", "multiple_choice", "world_knowledge/arc_easy.jsonl", 10, "\nAnswer: "),
                     ("winograd", "schema", "language_understanding/winograd_wsc.jsonl", 0, " "),
                     ("bigbench_operators", "language_modeling", "symbolic_problem_solving/bigbench_operators.jsonl",
                      3, "it's ")]
    (bundle / "core.yaml").write_text("icl_tasks: [unclosed\n")
    with pytest.raises(DataError, match=r"core\.yaml: cannot read the task list 'icl_tasks'"):
        bundle_tasks(bundle)
    (bundle / "core.yaml").write_text("other_settings: {}\n")
    with pytest.raises(DataError, match=r"core\.yaml: cannot read the task list 'icl_tasks'"):
        bundle_tasks(bundle)

def test_bundle_tasks(tmp_path, tiny_tokenizer):
    bundle = make_bundle(tmp_path)
    tasks = {t.label: t for t in bundle_tasks(bundle)}
    assert list(tasks) == ["copa", "arc_easy", "winograd", "bigbench_operators"]
    assert tasks["arc_easy"].continuation_delimiter == "\nAnswer: " and tasks["arc_easy"].num_fewshot == 10
    assert tasks["arc_easy"].random_baseline == 0.25 and tasks["copa"].random_baseline == 0.5
    assert tasks["winograd"].task_type == "schema"
    assert tasks["bigbench_operators"].continuation_delimiter == "it's " and tasks["bigbench_operators"].num_fewshot == 3
    model = ScriptedLM(tiny_tokenizer, right_endings(tasks.values()), "right")
    assert evaluate_core(model, tiny_tokenizer, list(tasks.values()), "cpu", log=None)["core"] == 1.0
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\narc_easy,25\nwinograd,n/a\n")
    with pytest.raises(DataError, match=r"eval_meta_data.csv:4: 'Random baseline' of 'winograd' is not a number"):
        bundle_tasks(bundle)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\nwinograd,50\nunused,\n")
    with pytest.raises(DataError, match="no 'Random baseline' row for task 'arc_easy'"):
        bundle_tasks(bundle)
    with pytest.raises(DataError, match="not an eval bundle"):
        bundle_tasks(tmp_path)

def test_download_eval_bundle_from_loopback(tmp_path, base_dir, file_server):
    make_bundle(tmp_path / "src")
    with zipfile.ZipFile(Path(file_server.root) / "eval_bundle.zip", "w") as archive:
        for path in (tmp_path / "src").rglob("*"):
            archive.write(path, path.relative_to(tmp_path / "src"))
    url = f"{file_server.url}/eval_bundle.zip"
    file_server.faults.extend(["500", "truncate"])  # two failed attempts, then a good one
    bundle = download_eval_bundle(url=url, backoff=0.01)
    assert Path(bundle) == base_dir / "eval_bundle" and len(bundle_tasks(bundle)) == 4
    assert [status for _, _, status in file_server.requests] == [500, 200, 200]
    assert not list(base_dir.glob("*.tmp*")) and not list(base_dir.glob(".eval_bundle.*"))
    assert download_eval_bundle(url=url) == bundle and len(file_server.requests) == 3  # cached: no request

    other = tmp_path / "other_base"
    other.mkdir()
    with pytest.raises(DownloadError, match="(?s)HTTP 404.*Offline\\? Fetch .*--bundle-dir.*--data-dir"):
        download_eval_bundle(base_dir=str(other), url=f"{file_server.url}/missing.zip", backoff=0.01)
    assert list(other.iterdir()) == []  # nothing half-written
    (Path(file_server.root) / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="not a zip"):
        download_eval_bundle(base_dir=str(other), url=f"{file_server.url}/junk.zip", attempts=2, backoff=0.01)
    assert list(other.iterdir()) == []

# -----------------------------------------------------------------------------
# The script, on a tiny real GPT checkpoint

def make_checkpoint(base, tokenizer, source_dir="base_checkpoints", tag="d2", step=5, seed=0):
    """A tiny random GPT saved like a training run would, with the tokenizer in the base dir."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    if not (base / "tokenizer").exists():
        tokenizer.save(base / "tokenizer")
        torch.save(torch.tensor(tokenizer.token_bytes()), base / "tokenizer" / "token_bytes.pt")
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    with torch.no_grad():  # a random model with opinions: not the near-zero logits of a fresh init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    save_checkpoint(str(base / source_dir / tag), step, model.state_dict(), None, {"model_config": asdict(config)})
    return model

def test_base_eval_script_end_to_end(base_dir, tiny_tokenizer, monkeypatch):
    model = make_checkpoint(base_dir, tiny_tokenizer).eval()
    from scripts import base_eval
    out = base_eval.main(["--data-dir", str(FIXTURES), "--device", "cpu", "--tasks", "copa,winograd,bigbench_operators"])
    direct = evaluate_core(model, tiny_tokenizer, [t for t in local_tasks(FIXTURES) if t.label in
                                                   ("copa", "winograd", "bigbench_operators")], "cpu", log=None)
    assert out["core"] == pytest.approx(direct["core"])
    rows = list(csv.reader(open(base_dir / "base_eval" / "base_d2_000005.csv")))
    assert rows[0][0] == "task" and [r[0] for r in rows[1:]] == ["copa", "winograd", "bigbench_operators", "CORE"]
    assert float(rows[-1][-1]) == pytest.approx(out["core"], abs=1e-6)
    section = (base_dir / "report" / "core-evaluation-base.md").read_text()
    assert "CORE" in section and "copa" in section
    with pytest.raises(SystemExit, match="unknown task"):
        base_eval.main(["--data-dir", str(FIXTURES), "--device", "cpu", "--tasks", "copa,nope"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        base_eval.main(["--data-dir", str(FIXTURES), "--device", "cpu", "-i", "sft"])

@pytest.mark.slow
def test_two_ranks_give_the_single_process_score(tmp_path, tiny_tokenizer):
    """torchrun, 2 ranks (gloo): each scores every other item; the all-reduced counts must give
    exactly the one-process accuracies (computed here, in this process, on the same checkpoint)."""
    base = tmp_path / "base"
    base.mkdir()
    model = make_checkpoint(base, tiny_tokenizer).eval()
    tasks = local_tasks(FIXTURES)
    single = evaluate_core(model, tiny_tokenizer, tasks, "cpu", log=None)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "scripts.base_eval",
                           "--data-dir", str(FIXTURES), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader(open(base / "base_eval" / "base_d2_000005.csv")))
    ddp = {r[0]: float(r[-1]) for r in rows[1:]}
    assert set(ddp) == {t.label for t in tasks} | {"CORE"}
    for label, result in single["results"].items():
        assert ddp[label] == pytest.approx(result["centered"], abs=1e-6), label
    assert ddp["CORE"] == pytest.approx(single["core"], abs=1e-6)
    assert len({round(r["accuracy"], 6) for r in single["results"].values()}) > 1  # not a degenerate all-equal run

