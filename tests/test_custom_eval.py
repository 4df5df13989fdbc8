"""
chat_eval -a custom:FILE (tasks/customjson.CustomEval): your own multiple-choice and exact-match questions scored
by scripted models that are always right, always wrong or random; the confusion table's exact counts; the few-shot
conversations, message by message; the normalisation of answers; bad files; the script end to end on a tiny GPT.
"""
import json
import random
import re
from pathlib import Path

import pytest

from nanochat.report import Report
from scripts import chat_eval
from scripts.chat_eval import confusion_table, parse_task_list, run_categorical, run_generative, task_label
from tasks.customjson import CustomEval, normalize_answer
from test_chat_eval import ScriptedLetterLM

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "custom_eval"
QUIZ, QUIZ_SHOTS = str(FIXTURES / "quiz.jsonl"), str(FIXTURES / "quiz_shots.jsonl")
SENTIMENT, SENTIMENT_SHOTS = str(FIXTURES / "sentiment.jsonl"), str(FIXTURES / "sentiment_shots.jsonl")
LETTERS_PROMPT = "\n\nAnswer with the letter of the correct choice ({})."

def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)

def user(content):
    return {"role": "user", "content": content}

def assistant(content):
    return {"role": "assistant", "content": content}

def scripted_generate(tokenizer, task, mode, labels=(), seed=0):
    """A generate(prompts) that knows each question's answer: says it as a chat model might dress it up, on the
    first line of a longer reply ("right"), says another label ("wrong"), or a random label ("random")."""
    answers = {tuple(tokenizer.render_for_completion(c)): c["messages"][-1]["content"] for c in task}
    rng = random.Random(seed)

    def reply(answer):
        if mode == "right":
            return f' "{answer.upper()}."\nThat is my final answer.'
        if mode == "wrong":
            return next(label for label in labels if normalize_answer(label) != normalize_answer(answer))
        return rng.choice(labels)
    return lambda prompts: [[reply(answers[tuple(prompt)])] for prompt in prompts]

# -----------------------------------------------------------------------------
# Scripted models: right 1, wrong 0, random about chance

def test_multiple_choice_right_wrong_random(tiny_tokenizer, tmp_path):
    task = CustomEval(QUIZ)
    assert task.eval_type == "categorical" and len(task) == 6
    for mode, expected in [("right", 6), ("wrong", 0)]:
        model = ScriptedLetterLM(tiny_tokenizer, task, mode)
        for batch_size in (1, 4):
            assert run_categorical(model, tiny_tokenizer, task, list(range(6)), "cpu", batch_size) == (expected, 6)
    # random letter logits over 400 questions of 2 to 5 choices: about the mean of 1 / the number of choices
    rng = random.Random(0)
    records = []
    for n in range(400):
        k = rng.randint(2, 5)
        choices = [f"choice {j}" for j in range(k)]
        records.append({"question": f"Question {n}?", "choices": choices, "answer": rng.randrange(k)})
    task = CustomEval(write_jsonl(tmp_path / "random.jsonl", records))
    chance = sum(1 / len(r["choices"]) for r in records) / 400  # ~0.32; the std of a chance accuracy: ~0.023
    right, asked = run_categorical(ScriptedLetterLM(tiny_tokenizer, task, "random"), tiny_tokenizer, task,
                                   list(range(400)), "cpu", batch_size=16)
    assert asked == 400 and abs(right / asked - chance) < 0.08

def test_exact_match_right_wrong_random(tiny_tokenizer, tmp_path):
    task = CustomEval(SENTIMENT)  # prompt, messages (one with a system message, one multi-turn) and Alpaca records
    assert task.eval_type == "generative" and task.labels == ["negative", "neutral", "positive"]
    for mode, expected in [("right", 6), ("wrong", 0)]:
        generate = scripted_generate(tiny_tokenizer, task, mode, ["positive", "negative"])
        assert run_generative(generate, tiny_tokenizer, task, list(range(6)), batch_size=4) == (expected, 6)
    # a random one of the file's 4 answers: chance 1/4 (std ~0.022 over 400)
    colors, rng = ["red", "green", "blue", "yellow"], random.Random(1)
    records = [{"prompt": f"What color is item {n}?", "answer": rng.choice(colors)} for n in range(400)]
    task = CustomEval(write_jsonl(tmp_path / "colors.jsonl", records))
    passed, asked = run_generative(scripted_generate(tiny_tokenizer, task, "random", colors, seed=2), tiny_tokenizer,
                                   task, list(range(400)), batch_size=50)
    assert asked == 400 and task.labels == sorted(colors) and abs(passed / asked - 0.25) < 0.08

# -----------------------------------------------------------------------------
# The confusion table

def test_confusion_table_counts(tiny_tokenizer):
    task = CustomEval(SENTIMENT)
    # the file's answers: positive, negative, neutral, negative, Positive, neutral
    replies = ["Positive.", "positive", "I am not sure", "negative!", '"positive"', "negative"]
    by_prompt = {tuple(tiny_tokenizer.render_for_completion(task[i])): reply for i, reply in enumerate(replies)}
    seen = []  # run_generative hands back each problem's first sample, in order, over batches
    passed, asked = run_generative(lambda prompts: [[by_prompt[tuple(p)], "second sample"] for p in prompts],
                                   tiny_tokenizer, task, list(range(6)), batch_size=4, first_samples=seen)
    assert seen == replies and (passed, asked) == (3, 6)
    assert confusion_table("custom:sentiment", task, list(range(6)), seen, "cpu") == (
        "custom:sentiment: right answer (rows) x reply (columns)\n\n"
        "| | negative | neutral | positive | (other) |\n"
        "|---|---|---|---|---|\n"
        "| negative | 1 | 0 | 1 | 0 |\n"
        "| neutral | 1 | 0 | 0 | 1 |\n"
        "| positive | 0 | 0 | 2 | 0 |")
    # only the problems asked count: here this rank's share, questions 1, 3, 5
    assert confusion_table("t", task, [1, 3, 5], ["neutral", "negative", "x"], "cpu").splitlines()[4:] == [
        "| negative | 1 | 1 | 0 | 0 |", "| neutral | 0 | 0 | 0 | 1 |", "| positive | 0 | 0 | 0 | 0 |"]

# -----------------------------------------------------------------------------
# Few-shot conversations

QUIZ_SKY = user("What color is the sky on a clear day?\n\nA. green\nB. blue" + LETTERS_PROMPT.format("A or B"))
QUIZ_DAYS = user("How many days are in a week?\n\nA. seven\nB. five\nC. ten" + LETTERS_PROMPT.format("A, B or C"))
QUIZ_GAS = user("Which gas do plants take in to make food?\n\nA. oxygen\nB. carbon dioxide\nC. helium\nD. neon"
                + LETTERS_PROMPT.format("A, B, C or D"))
QUIZ_MAMMAL = user("Which is a mammal?\n\nA. shark\nB. whale\nC. trout\nD. eel" + LETTERS_PROMPT.format("A, B, C or D"))
QUIZ_TIMES = user("What is 7 times 8?\n\nA. 54\nB. 56" + LETTERS_PROMPT.format("A or B"))

def test_fewshot_multiple_choice():
    # from --fewshot-file: every question of the file is scored, after the same two solved examples (their letters)
    task = CustomEval(QUIZ, fewshot=2, fewshot_path=QUIZ_SHOTS)
    assert len(task) == 6
    assert task[0]["messages"] == [QUIZ_SKY, assistant("B"), QUIZ_DAYS, assistant("A"), QUIZ_GAS, assistant("B")]
    assert task[0]["letters"] == ["A", "B", "C", "D"]  # the question's own choices are scored
    assert all(task[i]["messages"][:4] == task[0]["messages"][:4] for i in range(6))
    # from the file itself: two of its questions are the examples (seeded), and only the other 6 - 2 are scored
    task = CustomEval(QUIZ, fewshot=2, seed=42)
    assert len(task) == 4
    assert task[0]["messages"] == [QUIZ_MAMMAL, assistant("B"), QUIZ_GAS, assistant("B"), QUIZ_TIMES, assistant("B")]
    questions = [task[i]["messages"][-2]["content"].split("\n")[0] for i in range(4)]
    assert questions == ["What is 7 times 8?", "Which planet is closest to the Sun?", "How many legs does a spider have?",
                         "What is frozen water called?"]
    # another seed, other examples; the same seed, the same ones
    assert len({tuple(m["content"] for m in CustomEval(QUIZ, 2, seed=seed)[0]["messages"]) for seed in range(6)}) > 1
    assert CustomEval(QUIZ, 2, seed=42)[3] == task[3]

def test_fewshot_exact_match():
    chair, loved = user("Classify the sentiment: it is a chair."), user("Classify the sentiment: I loved this film.")
    system = {"role": "system", "content": "Answer with one word: positive, negative or neutral."}
    task = CustomEval(SENTIMENT, fewshot=2, seed=42)
    assert len(task) == 4 and task.labels == ["negative", "neutral", "positive"]
    shots = [chair, assistant("neutral"), loved, assistant("positive")]
    assert task[0]["messages"] == shots + [user("Classify the sentiment: A dull, boring mess."), assistant("negative")]
    # the question's system message opens the conversation, before the examples
    assert task[1]["messages"] == [system] + shots + [user("The food arrived on time."), assistant("neutral")]
    assert task[2]["messages"] == shots + [user("Rate: what a fantastic day!"), assistant("positive"),
                                           user("And: the rain ruined it."), assistant("negative")]
    # Alpaca examples from --fewshot-file: user = instruction + input, assistant = output
    task = CustomEval(SENTIMENT, fewshot=2, fewshot_path=SENTIMENT_SHOTS)
    assert len(task) == 6
    assert task[2]["messages"] == [system, user("Classify the sentiment: Terrible service."), assistant("negative"),
                                   user("Classify the sentiment of the review.\n\nWonderful staff!"), assistant("positive"),
                                   user("The food arrived on time."), assistant("neutral")]
    assert CustomEval(SENTIMENT, fewshot=0)[0]["messages"] == [loved, assistant("positive")]

# -----------------------------------------------------------------------------
# Normalisation, and which part of the reply is compared

@pytest.mark.parametrize("reply, answer, same", [
    (" Positive.", "positive", True), ('"yes"', "yes", True), ("no way", "no", False), ("Yes!\n", "yes", True),
    ("'Paris'.", "Paris", True), ("New   York", "new york", True), ("yes, indeed", "yes", False), ("No.", "yes", False)])
def test_normalisation(reply, answer, same):
    assert (normalize_answer(reply) == normalize_answer(answer)) == same

def test_reply_first_line_is_compared(tmp_path):
    records = [{"prompt": "Sentiment?", "answer": "positive"},
               {"prompt": "A poem?", "answer": "Roses are red\nviolets are blue"}]
    task = CustomEval(write_jsonl(tmp_path / "lines.jsonl", records))
    one, two = task[0], task[1]
    assert task.evaluate(one, "\n  Positive.\nbecause it says so") == 1.0  # leading blank lines are skipped
    assert task.evaluate(one, "I think it is\npositive") == 0.0  # only the first line counts
    assert task.evaluate(two, "roses are red\nViolets are blue.\nSugar is sweet") == 1.0  # as many lines as the answer
    assert task.evaluate(two, "roses are red") == 0.0
    assert task.graded(one, ' "POSITIVE"!\nyes') == ("positive", "positive")

# -----------------------------------------------------------------------------
# Bad files fail before any model is loaded, naming file:line

MC_RECORD = {"question": "Q?", "choices": ["a", "b"], "answer": 0}
EM_RECORD = {"prompt": "Q?", "answer": "a"}

@pytest.mark.parametrize("records, match", [
    ([MC_RECORD, MC_RECORD, EM_RECORD], r"bad.jsonl:3: a 'exact match' question in a file whose first \(.*bad.jsonl:1\) "
                                        r"is 'multiple choice'"),
    ([EM_RECORD, {"instruction": "Q?", "output": "a"}, MC_RECORD], "bad.jsonl:3: a 'multiple choice' question"),
    ([MC_RECORD, {"question": "Q?", "choices": ["a", "b"]}], "bad.jsonl:2: answer: expected a choice index 0..1"),
    ([EM_RECORD, {"prompt": "Q?"}], "bad.jsonl:2: answer: missing"),
    ([EM_RECORD, {"messages": [user("Q?"), assistant("a")]}],
     r"bad.jsonl:2: messages\[1\]\.role: the conversation must end with the user"),
    ([{"text": "Q?"}], "bad.jsonl:1: prompt: missing: expected one of these records"),
    ([], "bad.jsonl:1: no questions in the file"),
    (["", "   "], "bad.jsonl:1: no questions in the file"),
])
def test_bad_files(tmp_path, base_dir, records, match):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=match):
        CustomEval(path)
    # base_dir holds no checkpoint: the message is the file's, not "no checkpoint"
    with pytest.raises(SystemExit, match=match):
        chat_eval.main(["--device", "cpu", "-a", f"ARC-Easy|custom:{path}", "--data-dir", str(FIXTURES.parent / "eval")])

def test_bad_fewshot_and_task_lists(base_dir):
    with pytest.raises(ValueError, match=r"--fewshot 6: .*quiz.jsonl has 6 multiple choice questions; .* one more to ask"):
        CustomEval(QUIZ, fewshot=6)
    with pytest.raises(ValueError, match="--fewshot 3: .*quiz_shots.jsonl has 2 multiple choice"):
        CustomEval(QUIZ, fewshot=3, fewshot_path=QUIZ_SHOTS)
    assert len(CustomEval(QUIZ, fewshot=2, fewshot_path=QUIZ_SHOTS)) == 6  # all of a shots file may be used
    # one --fewshot-file for every custom task: it must hold the same kind of questions as each
    with pytest.raises(SystemExit, match=r"quiz_shots.jsonl has 2 multiple choice questions; .*sentiment.jsonl needs 1 "
                                         "exact match ones"):
        chat_eval.main(["--device", "cpu", "-a", f"custom:{QUIZ},custom:{SENTIMENT}", "--fewshot", "1",
                        "--fewshot-file", QUIZ_SHOTS])
    assert parse_task_list(f"ARC-Easy|custom:{QUIZ}") == ["ARC-Easy", f"custom:{QUIZ}"]
    labels = [task_label(name) for name in ("MMLU", "custom:quiz.jsonl", f"custom:{QUIZ}")]
    assert labels == ["MMLU", "custom:quiz", "custom:quiz"]
    with pytest.raises(SystemExit, match="listed twice"):  # two files of one stem would share a result
        parse_task_list(f"custom:{QUIZ}|custom:/elsewhere/quiz.jsonl")
    with pytest.raises(SystemExit, match="custom:FILE"):
        parse_task_list("quiz.jsonl")
    with pytest.raises(SystemExit):  # argparse's error: exit status 2, the message on stderr
        chat_eval.main(["--device", "cpu", "-a", f"custom:{QUIZ}", "--fewshot", "-1"])

def test_own_files_are_checked_before_any_download(tmp_path, base_dir, monkeypatch):
    # no --data-dir and no network: ARC-Easy would be downloaded, but the bad file of your own stops the run first
    monkeypatch.setenv("NANOCHAT_HF_URL", "http://127.0.0.1:9")  # nothing listens there: a download would fail
    path = write_jsonl(tmp_path / "bad.jsonl", [EM_RECORD, {"prompt": "Q?"}])
    with pytest.raises(SystemExit, match="bad.jsonl:2: answer: missing"):
        chat_eval.main(["--device", "cpu", "-a", f"ARC-Easy|custom:{path}"])

# -----------------------------------------------------------------------------
# The script, on a tiny real GPT

def test_chat_eval_custom_end_to_end(base_dir, tiny_tokenizer, capsys):
    from test_core_eval import make_checkpoint
    make_checkpoint(base_dir, tiny_tokenizer, source_dir="chatsft_checkpoints", tag="d2", step=7)
    eval_fixtures = FIXTURES.parent / "eval"
    out = chat_eval.main(["--device", "cpu", "-a", f"ARC-Easy|custom:{QUIZ}|custom:{SENTIMENT}", "--data-dir",
                          str(eval_fixtures), "--fewshot", "2", "--max-new-tokens", "4", "--batch-size", "2"])
    assert set(out["results"]) == {"ARC-Easy", "custom:quiz", "custom:sentiment"}
    assert out["ChatCORE"] is None  # over the built-in tasks only, and not all of them ran
    quiz, sentiment = out["custom"]["custom:quiz"], out["custom"]["custom:sentiment"]
    # the 4 quiz questions left after the 2 examples have 2, 3, 5 and 2 choices
    assert quiz["scored"] == sentiment["scored"] == 4 and quiz["table"] is None
    assert quiz["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 5 + 1 / 2) / 4)
    # the table's rows hold the 4 scored answers (negative, neutral, negative, positive); its diagonal is the accuracy
    rows = [[int(n) for n in line.strip("| ").split(" | ")[1:]] for line in sentiment["table"].splitlines()[4:]]
    assert [sum(row) for row in rows] == [2, 1, 1] and len(rows[0]) == 4
    assert sum(rows[i][i] for i in range(3)) / 4 == out["results"]["custom:sentiment"]
    assert sentiment["chance"] == pytest.approx(1 / 3)  # a guess among the file's 3 answers
    printed = capsys.readouterr().out
    # a prompt longer than the model's context loses its start: counted, as the prompts measure with our tokenizer
    shown = re.search(rf"chance {quiz['chance']:.4f}, 4 scored, (\d+) cut to the (\d+)-token context, 2-shot "
                      r"\(examples from the file, not scored\)", printed)
    task, context = CustomEval(QUIZ, fewshot=2), int(shown.group(2))
    cut = sum(len(tiny_tokenizer.render_for_completion(task[i])) > context for i in range(len(task)))
    assert int(shown.group(1)) == quiz["cut"] == cut and 0 < cut
    assert sentiment["table"] in printed
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    accuracy = out["results"]
    for line in (f"- custom:quiz: {accuracy['custom:quiz']:.4f}", f"- custom_chance:quiz: {quiz['chance']:.4f}",
                 f"- custom:sentiment: {accuracy['custom:sentiment']:.4f}", "- custom_scored:sentiment: 4", "- fewshot: 2"):
        assert line in section.splitlines()
    assert sentiment["table"] in section
    # the report card's summary: a row per custom file, beside ARC-Easy
    summary = Report(str(base_dir / "report")).summary()
    assert summary["custom:quiz"] == {"sft": f"{out['results']['custom:quiz']:.4f}"} and "ARC-Easy" in summary
    # without the examples the same questions fit the context
    alone = chat_eval.main(["--device", "cpu", "-a", f"custom:{QUIZ}", "--batch-size", "2"])["custom"]["custom:quiz"]
    assert alone["cut"] == 0 and alone["scored"] == 6
