"""
Tests for tasks/: slicing and mixing, every task on its local formats (fixtures here, the shared
datasets when present), grading, validation errors, the default datasets fetched from a loopback
Hugging Face, identity personas, and the CLI specs. No internet.
"""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import Task, TaskMixture, RecordError, check_messages, first_letter
from tasks.specs import build_task, train_val_mixtures
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K, solution_to_parts, extract_answer
from tasks.humaneval import HumanEval, extract_code, humaneval_program
from tasks.spelling import SpellingBee, SimpleSpelling
from tasks.customjson import CustomJSON
from tasks.smoltalk import SmolTalk
from tasks.preferences import Preferences
from tasks.identity import (IdentityConversations, IdentityPreferences, identity_preference_pairs,
                            load_persona, validate_persona)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PERSONA = {"name": "Pico", "maker": "the Ferris Lab", "description": "a tiny chat model", "style": "cheerful"}

@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_HF_URL", raising=False)
    return tmp_path / "base"

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path

class Numbers(Task):
    """A minimal Task over offset..offset+n-1, to test the base class machinery on its own."""

    def __init__(self, n, offset=0, **kwargs):
        super().__init__(**kwargs)
        self.n, self.offset = n, offset

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return self.offset + index

# -----------------------------------------------------------------------------
# Task, TaskMixture

def test_task_slicing():
    assert list(Numbers(10)) == list(range(10))
    task = Numbers(10, start=2, stop=9, step=3)
    assert len(task) == 3 and list(task) == [2, 5, 8]
    assert task[0] == 2 and task[-1] == 8
    with pytest.raises(IndexError):
        task[3]
    assert len(Numbers(5, start=3, stop=100)) == 2  # stop past the end is clipped
    assert len(Numbers(5, start=7)) == 0
    with pytest.raises(ValueError):
        Numbers(5, step=0)
    with pytest.raises(ValueError):
        Numbers(5, start=4, stop=2)

def test_mixture_is_deterministic_and_oversamples():
    a, b = Numbers(50), Numbers(30, offset=1000)
    mixture = TaskMixture([a, b, a], seed=7)
    assert len(mixture) == 130
    counts = Counter(mixture)
    assert all(counts[i] == 2 for i in range(50)) and all(counts[1000 + i] == 1 for i in range(30))
    order = list(mixture)
    assert order == list(TaskMixture([a, b, a], seed=7))
    assert order != list(TaskMixture([a, b, a], seed=8))
    assert order[:50] != list(range(50))  # actually shuffled
    assert mixture.locate(0)[0] in (a, b)
    assert list(TaskMixture([a, b], seed=7, stop=5)) == list(TaskMixture([a, b], seed=7))[:5]

# -----------------------------------------------------------------------------
# Multiple choice

def test_arc_and_mmlu_local_format():
    arc = ARC("easy", "test", data_path=FIXTURES / "mc.jsonl")
    mmlu = MMLU("test", data_path=FIXTURES / "mc.jsonl")
    assert len(arc) == len(mmlu) == 4 and arc.eval_type == mmlu.eval_type == "categorical"
    conversation = mmlu[2]
    assert conversation["messages"][-1] == {"role": "assistant", "content": "C"}
    assert conversation["letters"] == ["A", "B", "C", "D"] and conversation["subject"] == "astronomy"
    prompt = conversation["messages"][0]["content"]
    assert "Which planet is closest to the Sun?" in prompt and "\nC. Mercury\n" in prompt
    assert arc[3]["letters"] == ["A", "B", "C"]  # three choices, three letters
    for right in ["C", " C", "C.", "(C) Mercury", "c: Mercury"]:
        assert mmlu.evaluate(conversation, right) == 1.0, right
    for wrong in ["A", "B. Venus", "", "Mercury", "E"]:
        assert mmlu.evaluate(conversation, wrong) == 0.0, wrong
    assert first_letter("D", ["A", "B", "C"]) is None
    assert len(MMLU("test", subset="astronomy", data_path=FIXTURES / "mc.jsonl")) == 1
    with pytest.raises(ValueError, match="no questions with subject"):
        MMLU("test", subset="cooking", data_path=FIXTURES / "mc.jsonl")

def test_hugging_face_parquet_layouts(tmp_path):
    mmlu_file = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["2+2?", "Sky color?"], "subject": ["", ""],
                             "choices": [["3", "4", "5", "6"], ["red", "green", "blue", "pink"]],
                             "answer": [1, 2]}), mmlu_file)
    mmlu = MMLU("auxiliary_train", data_path=mmlu_file)
    assert [c["messages"][-1]["content"] for c in mmlu] == ["B", "C"]
    arc_file = tmp_path / "arc.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "question": ["Q1?", "Q2?"],
                             "choices": [{"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                                         {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}],
                             "answerKey": ["C", "2"]}), arc_file)
    arc = ARC("challenge", "train", data_path=arc_file)
    assert [c["messages"][-1]["content"] for c in arc] == ["C", "B"]
    assert arc[1]["letters"] == ["A", "B", "C", "D"]

# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_tool_call_rendering():
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert solution_to_parts(solution) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    task = GSM8K("train", data_path=FIXTURES / "gsm8k_chat.jsonl")
    assert task[0]["messages"][1]["content"] == solution_to_parts(solution)
    # the parts put back together are the original text, annotations aside
    parts = task[1]["messages"][1]["content"]
    assert "".join(p["text"] for p in parts if p["type"] == "text") == "It sells 1200*5=6,000 pens.\n#### 6,000"

def test_gsm8k_evaluate():
    train = GSM8K("train", data_path=FIXTURES / "gsm8k_chat.jsonl")
    test = GSM8K("test", data_path=FIXTURES / "gsm8k_eval.jsonl")
    assert len(train) == 2 and len(test) == 3 and test.eval_type == "generative"
    assert train[1]["answer"] == 6000
    for right in ["so 6,000 pens\n#### 6,000", "#### 6000", "#### 6000.0", "#### 6,000."]:
        assert train.evaluate(train[1], right) == 1.0, right
    for wrong in ["#### 600", "6000", "#### 6001", "the answer is 6,000", ""]:
        assert train.evaluate(train[1], wrong) == 0.0, wrong
    assert test.evaluate(test[2], "10-12 is -2\n#### -2") == 1.0
    assert test.evaluate(test[2], "#### 2") == 0.0
    assert extract_answer("first #### 1 then #### 2") == 2

# -----------------------------------------------------------------------------
# HumanEval

def run_python(program):
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30).returncode == 0

def test_humaneval_programs():
    task = HumanEval(data_path=FIXTURES / "humaneval.jsonl")
    assert len(task) == 2 and task.eval_type == "generative"
    conversation = task[1]
    full_function = conversation["messages"][1]["content"]
    body = "    return [n for n in numbers if n % 2 == 0]\n"
    assert extract_code("Sure:\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert extract_code("```\ny = 2\n") == "y = 2\n"  # unclosed block runs to the end
    assert extract_code("z = 3") == "z = 3"
    # full function, bare body, markdown-wrapped: all pass; a wrong body fails
    for completion in [full_function, body, f"Here you go:\n```python\n{full_function}```\n"]:
        assert run_python(humaneval_program(conversation, completion)), completion
    assert not run_python(humaneval_program(conversation, "    return numbers\n"))

def test_humaneval_evaluate_in_sandbox():
    pytest.importorskip("nanochat.execution", reason="nanochat.execution (the sandbox) is not written yet")
    task = HumanEval(data_path=FIXTURES / "humaneval.jsonl")
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"]) == 1.0
        assert task.evaluate(conversation, "    return None\n") == 0.0

# -----------------------------------------------------------------------------
# Spelling

def test_spelling_tasks_are_deterministic_and_graded():
    bee = SpellingBee(size=200, split="train")
    assert bee[17] == SpellingBee(size=200, split="train")[17]
    assert SpellingBee(size=200, start=10)[0] == bee[10]
    assert [bee[i] for i in range(20)] != [SpellingBee(size=200, split="test")[i] for i in range(20)]
    for conversation in bee:
        parts = conversation["messages"][1]["content"]
        call, output = parts[1], parts[2]
        assert call["type"] == "python" and output["type"] == "python_output"
        assert str(eval(call["text"])) == output["text"] == str(conversation["answer"])  # the tool call is right
        assert conversation["answer"] == conversation["word"].count(conversation["letter"])
        assert bee.evaluate(conversation, parts[-1]["text"]) == 1.0
        assert bee.evaluate(conversation, f"#### {conversation['answer'] + 1}") == 0.0
    assert any(c["answer"] == 0 for c in bee) and any(c["answer"] >= 2 for c in bee)
    spell = SimpleSpelling(size=50)
    for conversation in spell:
        word = conversation["word"]
        assert conversation["messages"][1]["content"] == f"{word}: {'-'.join(word)}"
        assert spell.evaluate(conversation, conversation["messages"][1]["content"]) == 1.0
        assert spell.evaluate(conversation, "-".join(word[:-1])) == 0.0

# -----------------------------------------------------------------------------
# Conversations: CustomJSON, SmolTalk, and validation errors

def test_customjson_formats():
    task = CustomJSON(FIXTURES / "custom.jsonl")
    assert len(task) == 4  # the blank line is skipped
    assert task[0]["messages"] == [{"role": "user", "content": "What is the capital of France?"},
                                   {"role": "assistant", "content": "Paris."}]
    assert task[1]["messages"][0]["role"] == "system" and isinstance(task[1]["messages"][-1]["content"], list)
    assert task[2]["messages"] == [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                                   {"role": "assistant", "content": "Bonjour"}]
    assert task[3]["messages"][0]["content"] == "Name a primary color."  # empty input: no blank lines
    with pytest.raises(NotImplementedError):
        task.evaluate(task[0], "x")

GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'

@pytest.mark.parametrize("bad_line, field, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}, ', "json", "not valid JSON"),
    ('["a list"]', "record", "expected a JSON object"),
    ('{"text": "no messages"}', "messages", "missing"),
    ('{"messages": "hi"}', "messages", "expected a list"),
    ('{"messages": []}', "messages", "empty message list"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     "messages[1].role", "unknown role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "messages[0].role", "expected 'user'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     "messages[1].role", "expected 'assistant'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "messages[1].content", "empty content"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content", "expected a string"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content", "expected a string"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}]}',
     "messages[1].content[0]", "expected {'type'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "messages[2].role", "must end with the assistant"),
    ('{"messages": [{"role": "system", "content": "be nice"}]}', "messages", "only a system message"),
    ('{"instruction": "Do it", "input": "", "output": ""}', "output", "empty"),
    ('{"instruction": 3, "output": "x"}', "instruction", "expected a string"),
])
def test_customjson_reports_bad_records(tmp_path, bad_line, field, problem):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD, GOOD, bad_line, GOOD, bad_line, GOOD])
    with pytest.raises(ValueError) as info:
        CustomJSON(path)
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert first_line.startswith(f"{path}:3: {field}: "), message
    assert problem in first_line, message
    assert "2 of 6 records are bad" in message and f"{path}:5" in message
    # skip_bad: knowingly leave them out
    assert len(CustomJSON(path, skip_bad=True)) == 4

ALPACA = [{"instruction": "Name a primary color.", "input": "", "output": "Red."},
          {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
          {"instruction": "Add 2 and 2.", "input": "", "output": "4"}]

def test_customjson_reads_a_json_array(tmp_path):
    # alpaca_data.json's own shape: one pretty-printed JSON array of records, whatever the extension
    for name in ("alpaca_data.json", "array.jsonl"):
        path = tmp_path / name
        path.write_text("\n  " + json.dumps(ALPACA, indent=4), encoding="utf-8")
        task = CustomJSON(path)
        assert len(task) == 3 and task[1]["messages"] == [
            {"role": "user", "content": "Translate to French.\n\nGood morning"},
            {"role": "assistant", "content": "Bonjour"}]
    assert len(build_task(f"custom:{path}")) == 3
    # a bad record is named by its index in the array, with the same checks as a JSON Lines record
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ALPACA[0], {"instruction": "Do it", "output": ""}, ALPACA[2], ["a list"]]))
    with pytest.raises(ValueError) as info:
        CustomJSON(bad)
    assert str(info.value).startswith(f"{bad}[1]: output: empty\n2 of 4 records are bad (first ones: {bad}[1], {bad}[3])")
    assert len(CustomJSON(bad, skip_bad=True)) == 2

@pytest.mark.parametrize("text, line", [
    (json.dumps(ALPACA, indent=2)[:-2], 1),         # a JSON array cut short
    ('{\n  "messages": [\n  ]\n}\n', 1),             # one pretty-printed object
    ('\n\n{"instruction": "a", "output": }\n', 3),   # a single line, not JSON
])
def test_customjson_neither_json_lines_nor_an_array(tmp_path, text, line):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:{line}: expected JSON Lines or a JSON array \("):
        CustomJSON(path)
    # JSON Lines with a few bad lines stay bad records, counted (and skippable) with the good ones
    path.write_text(f"{GOOD}\n{text}\n{GOOD}\n", encoding="utf-8")
    assert len(CustomJSON(path, skip_bad=True)) == 2

def test_check_messages_final_role():
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert check_messages(prompt, final_role="user") == prompt
    with pytest.raises(RecordError) as info:
        check_messages(prompt)
    assert info.value.field == "messages[2].role"

def test_smoltalk_local_parquet_and_jsonl(tmp_path):
    path = tmp_path / "chat.parquet"
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    pq.write_table(pa.table({"messages": messages, "source": ["x", "y"]}), path)
    task = SmolTalk("train", data_path=path)
    assert [c["messages"] for c in task] == messages
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": messages + [[{"role": "user", "content": "only a question"}]]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet:row 2: messages\[0\]\.role: the conversation must end"):
        SmolTalk("train", data_path=bad)
    assert len(SmolTalk("test", data_path=FIXTURES / "custom.jsonl")) == 4

# -----------------------------------------------------------------------------
# Preferences

def pair_conversations(item):
    """(chosen, rejected) conversations of a preference item: its prompt followed by each reply."""
    return tuple({"messages": item["prompt_messages"] + [{"role": "assistant", "content": item[key]}]}
                 for key in ("chosen", "rejected"))

def test_preferences_formats():
    task = Preferences(FIXTURES / "prefs.jsonl")
    assert len(task) == 4
    assert task[0] == {"prompt_messages": [{"role": "user", "content": "Say hello politely."}],
                       "chosen": "Hello, nice to meet you!", "rejected": "What do you want?"}
    assert len(task[1]["prompt_messages"]) == 3 and task[1]["prompt_messages"][-1]["content"] == "Tell me a fact."
    assert task[3] == {"prompt_messages": [{"role": "user", "content": "Name a color."}],
                       "chosen": "Blue.", "rejected": "I won't."}
    chosen, rejected = pair_conversations(task[1])
    assert chosen["messages"][:-1] == rejected["messages"][:-1] == task[1]["prompt_messages"]
    assert chosen["messages"][-1] == {"role": "assistant", "content": "Honey never spoils."}

@pytest.mark.parametrize("bad_record, field, problem", [
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing or empty"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "   "}, "rejected", "empty"),
    ({"prompt": "p", "chosen": "same answer", "rejected": "same answer "}, "rejected", "identical to chosen"),
    ({"prompt": "p", "chosen": 1, "rejected": "r"}, "chosen", "expected a string or a list"),
    ({"prompt_messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "x"}],
      "chosen": "c", "rejected": "r"}, "prompt_messages[1].role", "must end with the user"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "r"}]},
     "rejected", "earlier turns differ"),
])
def test_preferences_report_bad_records(tmp_path, bad_record, field, problem):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = write_lines(tmp_path / "prefs.jsonl", [good, good, good, json.dumps(bad_record), "{oops", good])
    with pytest.raises(ValueError) as info:
        Preferences(path)
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith(f"{path}:4: {field}: ") and problem in first_line, str(info.value)
    assert "2 of 6 records are bad" in str(info.value) and f"{path}:5" in str(info.value)

# -----------------------------------------------------------------------------
# The default datasets, from a loopback Hugging Face (conftest's file_server)

def serve_parquet(server, repo_id, filename, table):
    """Put `table` where a task fetches `filename` of `repo_id` from a Hugging Face at server.url."""
    path = server.root / "datasets" / repo_id / "resolve" / "main" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)

def test_default_datasets_come_from_hugging_face(file_server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", file_server.url)
    messages = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    messages.append([{"role": "user", "content": "no answer"}])  # a bad row in data we cannot fix
    serve_parquet(file_server, "HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet",
                  pa.table({"messages": messages, "source": ["s"] * 4}))
    task = SmolTalk("test")
    assert len(task) == 3 and task[2]["messages"][0]["content"] == "q2"  # the bad row is left out (warned)
    uf = [{"role": "user", "content": "Name a fruit."}]
    serve_parquet(file_server, "HuggingFaceH4/ultrafeedback_binarized", "data/test_prefs-00000-of-00001.parquet",
                  pa.table({"prompt": ["Name a fruit."], "prompt_id": ["0"],
                            "chosen": [uf + [{"role": "assistant", "content": "Apple."}]],
                            "rejected": [uf + [{"role": "assistant", "content": "Rock."}]],
                            "score_chosen": [9.0], "score_rejected": [2.0]}))
    prefs = Preferences(split="test")
    assert prefs[0] == {"prompt_messages": uf, "chosen": "Apple.", "rejected": "Rock."}
    serve_parquet(file_server, "openai/gsm8k", "main/test-00000-of-00001.parquet",
                  pa.table({"question": ["1+1?"], "answer": ["1+1=<<1+1=2>>2\n#### 2"]}))
    assert build_task("gsm8k", default_split="test")[0]["answer"] == 2

# -----------------------------------------------------------------------------
# Identity

def test_persona_validation(tmp_path):
    assert validate_persona({"name": "Pico", "maker": "Ferris Lab."})["maker"] == "Ferris Lab"  # defaults filled
    for persona, error in [
        ({"maker": "x"}, "field 'name' is required"),
        ({"name": "Pico", "maker": ""}, "field 'maker' must be a non-empty string"),
        ({"name": 7, "maker": "x"}, "field 'name' must be a non-empty string"),
        ({"name": "Pico", "author": "x"}, "unknown field.*'author'.*called 'maker'"),
        (["Pico"], "expected a JSON object"),
    ]:
        with pytest.raises(ValueError, match=error):
            validate_persona(persona)
    bad = tmp_path / "persona.json"
    bad.write_text('{"name": "Pico",\n "maker": }')
    with pytest.raises(ValueError, match=rf"{bad}:2: not valid JSON"):
        load_persona(bad)
    assert load_persona(FIXTURES / "persona.json")["name"] == "Pico"

@pytest.mark.parametrize("template_path", [None, "shared"])
def test_identity_conversations(template_path):
    if template_path == "shared":
        template_path = SHARED / "chat" / "identity_template_chat.jsonl"
        if not template_path.exists():
            pytest.skip(f"shared data not found at {template_path}")
    task = IdentityConversations(PERSONA, n=300, template_path=template_path)
    assert len(task) == 300 and task[5] == IdentityConversations(PERSONA, n=300, template_path=template_path)[5]
    texts, about_persona = [], 0
    for conversation in task:
        check_messages(conversation["messages"])
        answers = " ".join(m["content"] for m in conversation["messages"] if m["role"] == "assistant")
        assert not re.search(r"\{\{?(name|author|maker|description|style)\}", answers)  # placeholders filled
        about_persona += "Pico" in answers or "the Ferris Lab" in answers
        texts.append(json.dumps(conversation))
    # every built-in answer names the persona; a few template answers (e.g. on privacy) do not
    assert about_persona == 300 if template_path is None else about_persona > 270
    assert sum("Pico" in t for t in texts) > 200
    assert len(set(texts)) > 100  # varied
    assert sum(len(c["messages"]) > 2 for c in task) > 30  # some multi-turn

def test_identity_preference_pairs():
    pairs = identity_preference_pairs(PERSONA, n=100)
    assert pairs == identity_preference_pairs(PERSONA, n=100)
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
        assert "Pico" in pair["chosen"] or "the Ferris Lab" in pair["chosen"]
        assert "Pico" not in pair["rejected"] and "Ferris" not in pair["rejected"]
    assert len({p["rejected"] for p in pairs}) > 3
    task = IdentityPreferences(PERSONA, n=10)
    assert len(task) == 10 and task[3] == pairs[3]

def test_identity_cli_help_shows_the_defaults():
    result = subprocess.run([sys.executable, "-m", "tasks.identity", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    printed = " ".join(result.stdout.split())  # argparse wraps the help lines
    for default in ("(default: 5)", "(default: 42)", "(default: -)", "identity_template_chat.jsonl)"):
        assert default in printed, printed
    # the default --out '-': a preview on stdout
    result = subprocess.run([sys.executable, "-m", "tasks.identity", "--persona", str(FIXTURES / "persona.json"),
                             "--n", "2"], capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and len([json.loads(line) for line in result.stdout.splitlines()]) == 2

# -----------------------------------------------------------------------------
# CLI specs

def test_build_task_specs():
    persona = FIXTURES / "persona.json"
    cases = {
        f"arc:challenge:test:{FIXTURES}/mc.jsonl": (ARC, 4),
        f"mmlu:test:astronomy:{FIXTURES}/mc.jsonl": (MMLU, 1),
        f"gsm8k:{FIXTURES}/gsm8k_chat.jsonl[1:]": (GSM8K, 1),
        f"humaneval:{FIXTURES}/humaneval.jsonl": (HumanEval, 2),
        f"smoltalk:{FIXTURES}/custom.jsonl[::2]": (SmolTalk, 2),
        f"custom:{FIXTURES}/custom.jsonl": (CustomJSON, 4),
        f"preferences:{FIXTURES}/prefs.jsonl": (Preferences, 4),
        f"identity:{persona}:40": (IdentityConversations, 40),
        f"identity_pairs:{persona}": (IdentityPreferences, 1000),
        "spelling:30": (SpellingBee, 30),
        "spellingbee[:7]": (SpellingBee, 7),
        "simplespelling:test:12": (SimpleSpelling, 12),
    }
    for spec, (cls, length) in cases.items():
        task = build_task(spec)
        assert type(task) is cls and len(task) == length, spec
    assert build_task(f"arc:challenge:{FIXTURES}/mc.jsonl").variant == "challenge"
    assert build_task(f"mmlu:{FIXTURES}/mc.jsonl").split == "auxiliary_train"
    assert build_task(f"mmlu:{FIXTURES}/mc.jsonl", default_split="test").split == "test"
    assert build_task(f"mmlu:train:{FIXTURES}/mc.jsonl", default_split="test").split == "auxiliary_train"
    # as build_chat_tasks mixes the --mixture specs: a spec given twice counts twice
    specs = ["spelling:30", "spelling:30", f"identity:{persona}:40"]
    train, _ = train_val_mixtures([build_task(spec) for spec in specs], [build_task("spelling:test:5")])
    assert len(train) == 100
    for spec in ["nonsense", "custom", "arc:medium:" + str(FIXTURES / "mc.jsonl"), "spelling[1:x]",
                 f"gsm8k:5:{FIXTURES}/gsm8k_chat.jsonl", f"mmlu:test:a:b:{FIXTURES}/mc.jsonl"]:
        with pytest.raises(ValueError):
            build_task(spec)

# -----------------------------------------------------------------------------
# The shared datasets, and the tokenizer's view of what the tasks make

def shared(relative):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path

def test_shared_datasets_load():
    assert len(ARC("easy", "test", data_path=shared("eval/arc_easy.jsonl"))) == 1901
    assert len(ARC("challenge", "test", data_path=shared("eval/arc_challenge.jsonl"))) == 938
    assert len(MMLU("test", data_path=shared("eval/mmlu_test_26subjects.jsonl"))) == 3690
    assert len(MMLU("dev", data_path=shared("eval/mmlu_dev_fewshot.jsonl"))) == 285
    assert len(HumanEval(data_path=shared("eval/humaneval.jsonl"))) == 124
    assert len(CustomJSON(shared("chat/selfinstruct_seed_tasks_chat.jsonl"))) == 175
    train = GSM8K("train", data_path=shared("chat/gsm8k_train_chat.jsonl"))
    test = GSM8K("test", data_path=shared("eval/gsm8k_test.jsonl"))
    assert len(train) == 4532 and len(test) == 1000
    for task in (train, test):  # the reference solution always grades as right
        for conversation in task:
            text = "".join(p["text"] for p in conversation["messages"][1]["content"])
            assert task.evaluate(conversation, text) == 1.0
    mmlu = MMLU("test", data_path=shared("eval/mmlu_test_26subjects.jsonl"))
    assert all(mmlu.evaluate(c, c["messages"][-1]["content"]) == 1.0 for c in mmlu)

def test_shared_preferences_have_four_empty_chosen():
    path = shared("preference/hh_rlhf_harmless_base_test.jsonl")
    with pytest.raises(ValueError, match=r"hh_rlhf_harmless_base_test\.jsonl:87: chosen: empty"):
        Preferences(path)
    task = Preferences(path, skip_bad=True)
    assert len(task) == 2299 and task[0]["prompt_messages"][-1]["role"] == "user"

def test_conversations_are_valid_for_the_tokenizer(tiny_tokenizer):
    tasks = [ARC("easy", "test", data_path=FIXTURES / "mc.jsonl"), GSM8K("train", data_path=FIXTURES / "gsm8k_chat.jsonl"),
             HumanEval(data_path=FIXTURES / "humaneval.jsonl"), SpellingBee(size=20), SimpleSpelling(size=20),
             CustomJSON(FIXTURES / "custom.jsonl"), IdentityConversations(PERSONA, n=50, template_path=None)]
    # render_conversation runs the one validator (check_messages) and then the rendering itself
    for task in tasks:
        for conversation in task:
            tiny_tokenizer.render_conversation(conversation)
    for item in Preferences(FIXTURES / "prefs.jsonl"):
        for conversation in pair_conversations(item):
            tiny_tokenizer.render_conversation(conversation)

def test_gsm8k_huge_or_odd_numbers_do_not_crash():
    # a small model happily writes "#### 999...9" (overflows float to inf) or "#### inf"
    from tasks.gsm8k import extract_answer
    huge = "9" * 400
    assert extract_answer(f"so #### {huge}") == huge
    assert extract_answer("#### 1,234.0") == 1234
    assert extract_answer("#### 2.5") == 2.5

def test_specs_cli_prints_the_error_line_not_a_traceback(tmp_path):
    """python -m tasks.specs custom:FILE on a bad file: the file:line: field error, exit 1, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = subprocess.run([sys.executable, "-m", "tasks.specs", f"custom:{bad}"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{bad}:1: messages[0].role" in out.stderr
