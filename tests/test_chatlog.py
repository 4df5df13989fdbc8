"""Tests for tasks/chatlog.py: small hand-made exports of each format (DiscordChatExporter JSON and CSV,
WhatsApp Android/iOS in 12h and 24h, Telegram single-chat and full exports, generic CSV) give exactly the
expected conversations and drop counts; --speaker-names, several --me names, the session gap, errors that
name FILE:LINE or the JSON path (and leave --out alone), the CLI end to end, and the chatlog: task spec."""
import json

import pytest

from tasks.chatlog import convert, main
from tasks.customjson import CustomJSON
from tasks.specs import build_task

def user(text):
    return {"role": "user", "content": text}

def assistant(text):
    return {"role": "assistant", "content": text}

def messages_of(records):
    return [record["messages"] for record in records]

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path

# -----------------------------------------------------------------------------
# DiscordChatExporter JSON: a multi-party channel with a join, an edit, a reply, an attachment, and gaps
def discord_message(id, minute, name, content, type="Default", nickname=None, **extra):
    hour, minute = divmod(minute, 60)
    return {"id": str(id), "type": type, "timestamp": f"2023-01-05T{10 + hour:02d}:{minute:02d}:00.123+01:00",
            "timestampEdited": None, "content": content,
            "author": {"id": "9", "name": name, "nickname": nickname or name},
            "attachments": [], "embeds": [], "stickers": [], **extra}

DISCORD = {"guild": {"id": "1", "name": "Friends"}, "channel": {"id": "2", "name": "general"}, "messages": [
    discord_message(1, 0, "carol", "Joined the server.", type="GuildMemberJoin"),
    discord_message(2, 1, "bob", "hey alice 👋"),
    discord_message(3, 2, "carol", "hi all"),
    # the export has the final text of an edited message
    discord_message(4, 3, "alice_b", "hello! 😀", nickname="Alice", timestampEdited="2023-01-05T10:04:00+01:00"),
    discord_message(5, 4, "bob", "", attachments=[{"id": "7", "url": "https://x/cat.png", "fileName": "cat.png"}]),
    discord_message(6, 5, "bob", "how are you?", type="Reply", reference={"messageId": "4"}),
    discord_message(7, 6, "carol", "", type="ChannelPinnedMessage"),
    discord_message(8, 7, "alice_b", "good", nickname="Alice"),
    discord_message(9, 8, "alice_b", "thanks", nickname="Alice"),
    # two hours later: a new conversation that I start (that turn is dropped), ending with someone else (dropped)
    discord_message(10, 120, "alice_b", "anyone here?", nickname="Alice"),
    discord_message(11, 121, "bob", "yes"),
    discord_message(12, 122, "alice_b", "cool", nickname="Alice"),
    discord_message(13, 123, "carol", "bye"),
    # and later still, others alone: a conversation without an assistant turn
    discord_message(14, 300, "bob", "anyone?"),
    discord_message(15, 301, "carol", "no"),
]}

def test_discord_json(tmp_path):
    path = write(tmp_path, "discord.json", json.dumps(DISCORD, ensure_ascii=False))
    records, report, lines = convert([path], ["alice"])  # the nickname, any case
    assert messages_of(records) == [
        [user("hey alice 👋\nhi all"), assistant("hello! 😀"), user("how are you?"), assistant("good\nthanks")],
        [user("yes"), assistant("cool")]]
    assert records[0]["source"] == {"file": "discord.json", "timestamp": "2023-01-05T10:01:00.123000+01:00", "id": "2"}
    assert records[1]["source"]["id"] == "11"
    assert report == {
        "messages": 15, "messages dropped: system": 2, "messages dropped: attachments only": 1,
        "messages dropped: leading assistant turn": 1, "turns dropped: leading assistant turn": 1,
        "messages dropped: trailing user turn": 1, "turns dropped: trailing user turn": 1,
        "messages dropped: conversation without an assistant turn": 2,
        "turns dropped: conversation without an assistant turn": 1,
        "messages kept": 8, "turns": 9, "turns kept": 6,
        "conversations": 3, "conversations kept": 2, "conversations dropped: no assistant turn": 1}
    # the counts add up
    assert sum(n for k, n in report.items() if k.startswith("messages ")) == report["messages"]
    assert lines[0].startswith(f"{path}: discord-json (detected): 2 conversations, 15 messages; dropped: system 2")
    # several people in a user turn, each named; my own turns stay as they are
    named, _, _ = convert([path], ["alice_b"], speaker_names=True)
    assert messages_of(named)[0] == [user("bob: hey alice 👋\ncarol: hi all"), assistant("hello! 😀"),
                                     user("bob: how are you?"), assistant("good\nthanks")]
    # a longer session gap joins the first two sessions: 10:08 to 12:00 is under 3 hours
    joined, _, _ = convert([path], ["Alice"], gap=180)
    assert messages_of(joined)[0][-3:] == [assistant("good\nthanks\nanyone here?"), user("yes"), assistant("cool")]

def test_unknown_me_lists_the_authors(tmp_path):
    path = write(tmp_path, "discord.json", json.dumps(DISCORD))
    with pytest.raises(ValueError, match=r"discord.json: --me dave matches no author; the authors, by message count: "
                                         r"bob \(5\), alice_b \(5\), carol \(3\)$"):
        convert([path], ["Dave"])
    # several names for one person: one that matches is enough
    assert len(convert([path], ["dave", "ALICE_B"])[0]) == 2

# -----------------------------------------------------------------------------
# DiscordChatExporter CSV: ISO and the old date format, quoted multi-line content, attachments
DISCORD_CSV = '''\
AuthorID,Author,Date,Content,Attachments,Reactions
1,bob#0420,2023-01-05T14:03:00.123+00:00,"so, what's up?
anything new?",,
2,alice#1234,05-Jan-23 02:04 PM,not much 🙂,,👍 (1)
1,bob#0420,2023-01-05T14:05:00+00:00,,https://cdn.discordapp.com/x/cat.png,
1,bob#0420,2023-01-05T14:06:00+00:00,"look, a ""cat""",https://cdn.discordapp.com/x/cat2.png,
2,alice#1234,2023-01-05T14:07:00+00:00,cute,,
'''

def test_discord_csv(tmp_path):
    path = write(tmp_path, "discord.csv", DISCORD_CSV)
    records, report, lines = convert([path], ["alice"])  # old exports add a #discriminator to the name
    assert messages_of(records) == [[user("so, what's up?\nanything new?"), assistant("not much 🙂"),
                                     user('look, a "cat"'), assistant("cute")]]
    assert records[0]["source"] == {"file": "discord.csv", "timestamp": "2023-01-05T14:03:00.123000+00:00", "line": 2}
    assert report["messages dropped: attachments only"] == 1 and report["messages kept"] == 4
    assert "discord-csv (detected)" in lines[0]

# -----------------------------------------------------------------------------
# WhatsApp
WHATSAPP_ANDROID_24H = """\
25/12/2022, 09:00 - Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them. Tap to learn more.
25/12/2022, 09:01 - Bob added Carol
25/12/2022, 09:02 - Bob: Merry Christmas! 🎄
25/12/2022, 09:03 - Carol: <Media omitted>
25/12/2022, 09:04 - Carol: and a happy new year
to everyone
25/12/2022, 09:05 - Alice: Thank you both!
See you soon <This message was edited>
25/12/2022, 09:06 - Bob: This message was deleted
25/12/2022, 09:07 - Carol joined using this group's invite link
25/12/2022, 11:30 - Bob: still there?
25/12/2022, 11:31 - Alice: yes: eating
"""

def test_whatsapp_android_24h(tmp_path):
    path = write(tmp_path, "chat.txt", WHATSAPP_ANDROID_24H)
    records, report, lines = convert([path], ["alice"], speaker_names=True)
    assert messages_of(records) == [
        [user("Bob: Merry Christmas! 🎄\nCarol: and a happy new year\nto everyone"),
         assistant("Thank you both!\nSee you soon")],
        [user("Bob: still there?"), assistant("yes: eating")]]
    assert records[1]["source"] == {"file": "chat.txt", "timestamp": "2022-12-25T11:30:00", "line": 11}
    assert {k: n for k, n in report.items() if k.startswith("messages dropped")} == {
        "messages dropped: system": 3, "messages dropped: attachments only": 1, "messages dropped: deleted": 1,
        "messages dropped: leading assistant turn": 0, "messages dropped: trailing user turn": 0}
    assert report["messages"] == 10 and report["messages kept"] == 5
    assert "whatsapp (detected, dates dmy)" in lines[0]

WHATSAPP_ANDROID_12H = """\
1/13/23, 9:58\u202fPM - Bob: you up?
1/13/23, 9:59\u202fPM - Alice: You deleted this message
1/13/23, 10:01\u202fPM - Alice: yes
1/13/23, 10:02\u202fPM - Alice: why
1/13/23, 10:03\u202fPM - Bob: sticker omitted
1/13/23, 11:55\u202fPM - Bob: never mind
1/14/23, 12:05\u202fAM - Alice: ok 😴
"""

def test_whatsapp_android_12h(tmp_path):
    path = write(tmp_path, "chat.txt", WHATSAPP_ANDROID_12H)
    records, report, lines = convert([path], ["Alice"])
    # a second field of 13: month/day; 11:55 PM is 112 minutes after 10:03 PM, a new conversation, and
    # 12:05 AM (the next day) ten minutes after it, the same one
    assert messages_of(records) == [[user("you up?"), assistant("yes\nwhy")],
                                    [user("never mind"), assistant("ok 😴")]]
    assert records[0]["source"]["timestamp"] == "2023-01-13T21:58:00"
    assert records[1]["source"] == {"file": "chat.txt", "timestamp": "2023-01-13T23:55:00", "line": 6}
    assert "dates mdy" in lines[0]
    assert report["messages dropped: deleted"] == 1 and report["messages dropped: attachments only"] == 1
    records, _, _ = convert([path], ["Alice"], gap=120)
    assert messages_of(records) == [[user("you up?"), assistant("yes\nwhy"), user("never mind"), assistant("ok 😴")]]

WHATSAPP_IOS = """\
\u200e[01/02/2023, 14:05:09] Friends: \u200eMessages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them.
\u200e[01/02/2023, 14:05:10] Friends: \u200eBob added Alice
[01/02/2023, 14:06:00] Bob: hi Alice
\u200e[01/02/2023, 14:06:30] Bob: \u200eimage omitted
[01/02/2023, 14:06:40] Bob: \u200e<attached: 00000012-PHOTO-2023-02-01-14-06-40.jpg>
[01/02/2023, 14:07:00] Alice: hi!
[01/02/2023, 14:08:00] Bob: bye
"""

def test_whatsapp_ios_and_ambiguous_dates(tmp_path):
    path = write(tmp_path, "_chat.txt", WHATSAPP_IOS)
    records, report, lines = convert([path], ["alice"])
    assert messages_of(records) == [[user("hi Alice"), assistant("hi!")]]
    # no field over 12: day/month, and the summary says it was a guess
    assert records[0]["source"]["timestamp"] == "2023-02-01T14:06:00"
    assert "dates dmy (ambiguous" in lines[0]
    assert report["messages dropped: system"] == 2 and report["messages dropped: attachments only"] == 2
    assert report["messages dropped: trailing user turn"] == 1
    records, _, lines = convert([path], ["alice"], date_order="mdy")
    assert records[0]["source"]["timestamp"] == "2023-01-02T14:06:00" and "dates mdy" in lines[0]

WHATSAPP_IOS_12H = "[1/2/23, 2:05:09 PM] Bob: hello\n[1/2/23, 2:06:00 PM] Alice: hey\n"

def test_whatsapp_ios_12h(tmp_path):
    records, _, _ = convert([write(tmp_path, "chat.txt", WHATSAPP_IOS_12H)], ["alice"])
    assert messages_of(records) == [[user("hello"), assistant("hey")]]
    assert records[0]["source"]["timestamp"] == "2023-02-01T14:05:09"

@pytest.mark.parametrize("text, order, line, problem", [
    ("25/12/2022, 09:02 - Bob: hi\n13/13/2022, 09:03 - Alice: hi\n", "auto", 2, "month must be in 1..12"),
    ("25/12/2022, 09:02 - Bob: hi\n", "mdy", 1, "month must be in 1..12"),
    ("1/2/23, 13:05 PM - Bob: hi\n", "auto", 1, "hour must be in 0..23"),
    ("hello there\n1/2/23, 1:05 PM - Bob: hi\n", "auto", 1, "unknown chat export format"),
])
def test_whatsapp_broken_line(tmp_path, text, order, line, problem):
    path = write(tmp_path, "chat.txt", text)
    with pytest.raises(ValueError, match=rf"^{path}:{line}: .*{problem}"):
        convert([path], ["alice"], fmt="whatsapp", date_order=order)

# -----------------------------------------------------------------------------
# Telegram Desktop: one chat, and the full export of several
def telegram_chat(name, messages):
    return {"name": name, "type": "personal_chat", "id": 42, "messages": [
        {"id": i, "type": "message", "date": f"2023-01-05T14:{i:02d}:00", "date_unixtime": str(1672927380 + 60 * i),
         **m} for i, m in enumerate(messages, 1)]}

TELEGRAM = telegram_chat("Bob", [
    {"type": "service", "actor": "Bob", "action": "phone_call", "text": ""},
    {"from": "Bob", "from_id": "user1", "text": ["look at ", {"type": "link", "text": "this"}, " — ",
                                                 {"type": "bold", "text": "wow"}]},
    {"from": "Bob", "from_id": "user1", "photo": "photos/p1.jpg", "width": 10, "height": 10, "text": ""},
    {"from": "Bob", "from_id": "user1", "photo": "photos/p2.jpg", "text": "my cat 🐈"},
    {"from": "Alice", "from_id": "user2", "text": "nice!", "edited": "2023-01-05T14:06:00"},
    {"from": "Alice", "from_id": "user2", "text": "", "media_type": "sticker", "sticker_emoji": "😻"},
    {"from": "Bob", "from_id": "user1", "text": "", "reply_to_message_id": 5},
])

def test_telegram_single_chat(tmp_path):
    path = write(tmp_path, "result.json", json.dumps(TELEGRAM, ensure_ascii=False))
    records, report, lines = convert([path], ["alice"])
    assert messages_of(records) == [[user("look at this — wow\nmy cat 🐈"), assistant("nice!")]]
    assert records[0]["source"] == {"file": "result.json", "timestamp": "2023-01-05T14:02:00", "chat": "Bob", "id": 2}
    assert report["messages dropped: system"] == 1 and report["messages dropped: attachments only"] == 2
    assert report["messages dropped: empty"] == 1 and report["messages kept"] == 3
    assert "telegram (detected)" in lines[0]

def test_telegram_full_export(tmp_path):
    # each chat on its own: a new chat starts a new conversation, however close in time
    carol = telegram_chat("Carol", [{"from": "Alice", "text": "hi Carol"}, {"from": "Carol", "text": "hi"},
                                    {"from": "Alice", "text": "how are you"}])
    export = {"about": "Here is the data you requested.", "chats": {"about": "...", "list": [TELEGRAM, carol]}}
    path = write(tmp_path, "result.json", json.dumps(export))
    records, _, _ = convert([path], ["alice"])
    assert messages_of(records) == [[user("look at this — wow\nmy cat 🐈"), assistant("nice!")],
                                    [user("hi"), assistant("how are you")]]
    assert records[1]["source"]["chat"] == "Carol"

@pytest.mark.parametrize("export, where", [
    ({"name": "x", "messages": [{"id": 1, "type": "message", "from": "Bob", "text": "a"}]},
     r"messages\[0\].date: missing"),
    ({"chats": {"list": [telegram_chat("x", [{"from": "Bob", "text": ["a", {"type": "bold"}]}])]}},
     r"chats.list\[0\].messages\[0\].text\[1\].text: missing"),
    ({"chats": {"list": [{"name": "x", "messages": [{"type": "message", "date": "yesterday", "text": "a"}]}]}},
     r"chats.list\[0\].messages\[0\].date: bad timestamp 'yesterday'"),
    ({"chats": {"about": "..."}}, "chats.list: missing"),
    ({"chats": []}, "chats: not a dict"),
    ({"name": "x", "messages": {}}, "messages: not a list"),
])
def test_telegram_errors_name_the_json_path(tmp_path, export, where):
    path = write(tmp_path, "result.json", json.dumps(export))
    with pytest.raises(ValueError, match=rf"^{path}: {where}"):
        convert([path], ["alice"])

# -----------------------------------------------------------------------------
# Generic CSV: unix seconds or ISO 8601, any other column order
GENERIC_CSV = """\
author,timestamp,content
Bob,1672927380,"two
lines"
me,2023-01-05T14:04:00Z,one
"""

def test_generic_csv(tmp_path):
    records, report, lines = convert([write(tmp_path, "log.csv", GENERIC_CSV)], ["me"])
    assert messages_of(records) == [[user("two\nlines"), assistant("one")]]
    assert records[0]["source"] == {"file": "log.csv", "timestamp": "2023-01-05T14:03:00+00:00", "line": 2}
    assert "csv (detected)" in lines[0]
    assert "csv (--format)" in convert([tmp_path / "log.csv"], ["me"], fmt="csv")[2][0]

@pytest.mark.parametrize("text, line, problem", [
    ("timestamp,author,content\n1672927380,Bob,hi\n1672927440,me\n", 3, "expected 3 fields"),
    ('timestamp,author,content\n1672927380,Bob,"hi\n1672927440,me,yo\n', 2, "broken CSV row"),
    ("timestamp,author,content\n1672927380,Bob,hi\nsoon,me,yo\n", 3, "bad timestamp 'soon'"),
    ("timestamp,name,content\n1672927380,Bob,hi\n", 1, "no column author"),
])
def test_csv_errors_name_the_line(tmp_path, text, line, problem):
    path = write(tmp_path, "log.csv", text)
    with pytest.raises(ValueError, match=rf"^{path}:{line}: {problem}"):
        convert([path], ["me"], fmt="csv")

def test_unknown_format_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="notes.txt:1: unknown chat export format"):
        convert([write(tmp_path, "notes.txt", "dear diary\n")], ["me"])
    with pytest.raises(ValueError, match=r"discord.json:3: not valid JSON"):
        convert([write(tmp_path, "discord.json", '{"guild": {},\n"messages": [\n}')], ["me"])
    with pytest.raises(ValueError, match=r"discord.json: messages\[0\].author: missing"):
        convert([write(tmp_path, "discord.json", '{"guild": {}, "messages": [{"type": "Default"}]}')], ["me"])
    # --format overrides the detection: this CSV is not a WhatsApp chat
    with pytest.raises(ValueError, match="log.csv:1: unknown chat export format"):
        convert([write(tmp_path, "log.csv", GENERIC_CSV)], ["me"], fmt="whatsapp")

# -----------------------------------------------------------------------------
# The CLI, and the chatlog: task spec
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out" / "conversations.jsonl"
    exports = [write(tmp_path, "discord.json", json.dumps(DISCORD)), write(tmp_path, "chat.txt", WHATSAPP_ANDROID_24H)]
    main([*map(str, exports), "--me", "alice", "--me", "Alice_B", "--out", str(out), "--speaker-names"])
    printed = capsys.readouterr().out
    assert "discord-json (detected)" in printed and "whatsapp (detected, dates dmy)" in printed
    assert "\n  conversations kept " in printed and f"wrote 4 conversations to {out}" in printed
    task = CustomJSON(out)  # the output validates as our conversation format
    assert len(task) == 4 and task[3]["messages"] == [user("Bob: still there?"), assistant("yes: eating")]
    files = [json.loads(line)["source"]["file"] for line in out.read_text().splitlines()]
    assert files == ["discord.json"] * 2 + ["chat.txt"] * 2

def test_cli_bad_file_writes_nothing(tmp_path):
    good = write(tmp_path, "chat.txt", WHATSAPP_ANDROID_24H)
    broken = write(tmp_path, "broken.txt", WHATSAPP_ANDROID_24H + "32/12/2022, 11:32 - Bob: oops\n")
    out = tmp_path / "conversations.jsonl"
    with pytest.raises(SystemExit, match=rf"^error: {broken}:13: broken line \(dates dmy\): day is out of range"):
        main([str(good), str(broken), "--me", "alice", "--out", str(out)])
    assert not out.exists()
    out.write_text("before\n")
    with pytest.raises(SystemExit, match="matches no author"):
        main([str(good), "--me", "nobody", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse's error: exit status 2, the message on stderr
        main([str(good), "--me", "alice", "--out", str(out), "--session-gap", "-5"])
    assert out.read_text() == "before\n"

def test_chatlog_spec(tmp_path):
    path = write(tmp_path, "discord.json", json.dumps(DISCORD))
    task = build_task(f"chatlog:{path}:me=alice")
    assert len(task) == 2 and task[1] == {"messages": [user("yes"), assistant("cool")]}
    assert build_task(f"chatlog:{path}:me=dave:me=alice:gap=180:speaker_names")[0]["messages"][0] == \
        user("bob: hey alice 👋\ncarol: hi all")
    # a .txt path counts as a file too; slicing works like any task's
    chat = write(tmp_path, "chat.txt", WHATSAPP_ANDROID_24H)
    assert len(build_task(f"chatlog:{chat}:me=Alice[1:]")) == 1
    for spec in [f"chatlog:{path}", f"chatlog:{path}:me=alice:gap=soon", f"chatlog:{path}:me=alice:names",
                 "chatlog:me=alice", f"chatlog:{path}:me=alice:5"]:
        with pytest.raises(ValueError):
            build_task(spec)
