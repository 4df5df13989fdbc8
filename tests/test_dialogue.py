"""Tests for tasks/dialogue.py: known fixture paragraphs give the expected pairs (curly,
straight and single quotes, attributions, split sentences, speeches over two paragraphs,
same-speaker splits, thoughts, narration), filters and multi-turn cutting, report counts that
add up, and a real book (Pride and Prejudice) when the shared data is there."""
import json

import pytest

from tasks.specs import build_task
from tasks.dialogue import Options, extract, main, utterances

BOOK = """\
Chapter 1

It was a fine morning, and nobody had said anything yet.

“Good morning, Mr. Brown,” said Alice. “Is it not a _lovely_ day?”

“It is,” replied Mr. Brown, “the loveliest of the year.”

“I am glad you think so.”

* * *

“Are you coming to the fair?” asked Tom.

“I am,” said Tom. “I would not miss it.”

“Then we shall go together,” said Mary.

* * *

"Straight quotes work too," said Bob.

"So they do," said Carol, "and nicely."

* * *

"This speech runs on, and on,

"and ends in the next paragraph," said Dan.

"Indeed it does," said Eve.

* * *

"What a day," thought Carol.

"Lovely," said Eve.

* * *

“Bonjour, ça va très bien, merci beaucoup à vous, mon cher ami.”

“Très bien, et vous? À bientôt mon ami, je suis très content.”

* * *

“Oh.”

“Ah.”

* * *

"Straight quotes work too," said Bob.

"So they do," said Carol, "and nicely."

* * *

The old clock in the hall struck nine, and then ten, while the rain kept falling on the roofs of the village and the lamps were lit one by one along the river, where the boats lay still and the ferryman slept in his hut by the water, as he always did. "Late," he muttered.

"Very late indeed," said Frank.
"""

ALICE = """\
‘I don’t think,’ said Alice, ‘that it’s fair.’

‘You don’t know much,’ said the Duchess, ‘and that’s a fact.’
"""

def pairs(records):
    return [[m["content"] for m in r["messages"]] for r in records]

def test_fixture_book_gives_the_expected_pairs():
    records, report = extract(BOOK, "fixture.txt", Options(min_chars=4))
    assert pairs(records) == [
        ["Good morning, Mr. Brown. Is it not a lovely day?", "It is, the loveliest of the year."],
        ["I am. I would not miss it.", "Then we shall go together."],       # Tom twice: first one unpaired
        ["Straight quotes work too.", "So they do, and nicely."],
        ["This speech runs on, and on, and ends in the next paragraph.", "Indeed it does."],
    ]
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in records)
    assert records[0]["source"] == {"book": "fixture.txt", "paragraph": 3}
    assert report["conversations dropped: not English"] == 1
    assert report["conversations dropped: too short"] == 1               # “Oh.” / “Ah.”
    assert report["conversations dropped: duplicate"] == 1               # Bob and Carol again
    assert report["utterances dropped: a thought"] == 1
    assert report["utterances dropped: mostly narration"] == 1
    # “I am glad…”, Tom's first line, Eve's lonely “Lovely”, Frank after the narration
    assert report["utterances unpaired (same speaker twice, or a lone line)"] == 4
    # the counts add up
    assert report["utterances"] == (report["utterances dropped: a thought"] + report["utterances dropped: mostly narration"]
                                    + report["utterances unpaired (same speaker twice, or a lone line)"]
                                    + report["utterances in conversations"])
    assert report["conversations"] == report["conversations kept"] + sum(
        v for k, v in report.items() if k.startswith("conversations dropped"))
    assert report["conversations kept"] == len(records) == 4

def test_single_quotes_speakers_and_multi_turn():
    records, _ = extract(ALICE, "alice.txt", Options())
    assert pairs(records) == [["I don’t think, that it’s fair.", "You don’t know much, and that’s a fact."]]
    found = [u for u in utterances(ALICE) if u]
    assert [u.speaker for u in found] == ["alice", "duchess"]

    # six alternating lines: one conversation of three exchanges, or three of one
    lines = [f'"Line number {i} of the talk," said {"Ann" if i % 2 == 0 else "Ben"}.' for i in range(6)]
    talk = "\n\n".join(lines)
    records, report = extract(talk, "t", Options(max_turns=3))
    assert pairs(records) == [[f"Line number {i} of the talk." for i in range(6)]]
    records, _ = extract(talk, "t", Options(max_turns=1))
    assert len(records) == 3
    # a third speaker cannot join a two-sided conversation: Ann/Ben, then Cyd/Ben, then Ann/Ben
    lines[2] = '"Line number 2 of the talk," said Cyd.'
    records, report = extract("\n\n".join(lines), "t", Options(max_turns=3))
    assert [r["messages"][0]["content"][:13] for r in records] == ["Line number 0", "Line number 2", "Line number 4"]
    assert [len(r["messages"]) for r in records] == [2, 2, 2]
    lines[4] = '"Line number 4 of the talk," said Cyd.'  # now Cyd/Ben talk twice
    records, report = extract("\n\n".join(lines), "t", Options(max_turns=3))
    assert [len(r["messages"]) for r in records] == [2, 4]
    # long messages are dropped; --lang any keeps the French
    records, report = extract(BOOK, "b", Options(max_chars=20, lang="any"))
    assert report["conversations dropped: too long"] >= 1 and report["conversations dropped: not English"] == 0

def test_cli_on_files_and_report(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(BOOK, encoding="utf-8")
    alice = tmp_path / "alice.txt"
    alice.write_text(ALICE, encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    report = main([str(book), str(alice), "--out", str(out), "--min-chars", "4"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == report["conversations kept"] == 5 and report["books"] == 2
    assert json.loads(lines[-1])["source"]["book"] == "alice.txt"
    printed = capsys.readouterr().out
    assert "conversations kept" in printed and "wrote 5 conversations" in printed
    task = build_task(f"custom:{out}")  # what SFT reads
    assert len(task) == 5
    with pytest.raises(SystemExit, match="not found"):
        main([str(tmp_path / "missing.txt"), "--out", str(out)])

def test_pride_and_prejudice(shared_data):
    path = shared_data / "pretrain" / "train" / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records, report = extract(path.read_text(encoding="utf-8"), path.name, Options())
    assert len(records) > 300, report
    texts = [t for pair in pairs(records) for t in pair]
    assert not any(q in t for t in texts for q in "“”"), "quote marks must not leak into the messages"
    assert not any("said Mrs. Bennet" in t or t.endswith(",") for t in texts), "attributions are removed"
    assert report["utterances"] == sum(v for k, v in report.items() if k.startswith("utterances "))
    first = records[0]["messages"]
    assert first[0]["content"] == "Do you not want to know who has taken it?"
    assert first[1]["content"] == "You want to tell me, and I have no objection to hearing it."

def test_a_character_does_not_answer_herself():
    # the Queen speaks twice, named by verbs ("screamed", "went on") once unknown: her lines must not be a pair
    book = ("‘Get up!’ said the Queen.\n\n‘Leave off that!’ screamed the Queen. ‘You make me giddy.’\n\n"
            "‘I beg your pardon,’ said Alice.\n\n‘And what are you doing here?’ the Queen went on.\n")
    records, report = extract(book, "queen.txt", Options())
    assert pairs(records) == [["Leave off that! You make me giddy.", "I beg your pardon."]]
    assert [u.speaker for u in utterances(book)] == ["queen", "queen", "alice", "queen"]
    assert report["utterances unpaired (same speaker twice, or a lone line)"] == 2

def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    for default in ("(default: 1)", "(default: 2)", "(default: 1000)", "(default: en)", "(default: auto)"):
        assert default in printed
