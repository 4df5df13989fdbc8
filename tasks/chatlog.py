"""Chat exports as conversations, your messages the assistant's turns: DiscordChatExporter JSON/CSV, WhatsApp .txt
(Android, iOS), Telegram Desktop's result.json, or a CSV of timestamp,author,content. A report says what was dropped.
    python -m tasks.chatlog discord.json chat.txt --me alice --out chats.jsonl   # then --mixture custom:chats.jsonl"""
import argparse
import csv
import io
import json
import re
from collections import Counter, namedtuple
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path

from nanochat.common import HelpFormatter, atomic_write, exit_on
from tasks.common import Task, chat_record_to_conversation

# time: seconds since the epoch (a time without a zone is read as UTC: only gaps matter); ref: where it is, for the
# record's source; dropped: None, or why it is no message; aliases: the author's other names (a Discord nickname)
Message = namedtuple("Message", "time stamp author text ref dropped aliases")

def message(when, author, text, ref, dropped=None, media=False, aliases=()):
    text = text.strip()  # a photo with a caption is the caption; without one there is nothing to learn from
    return Message((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp(), when.isoformat(), author,
                   text, ref, dropped or (None if text else "attachments only" if media else "empty"), aliases)

def parse_time(value, where):
    try:  # unix seconds, ISO 8601, or the old DiscordChatExporter CSV dates ("05-Jan-23 02:03 PM")
        return (datetime.fromtimestamp(float(value), timezone.utc) if re.fullmatch(r"\d+(\.\d+)?", value) else
                datetime.strptime(value, "%d-%b-%y %I:%M %p") if re.match(r"\d\d-[A-Za-z]{3}-", value) else
                datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise ValueError(f"{where}: bad timestamp {value!r} (expected ISO 8601 or unix seconds)") from None

# The parsers: each turns one export into its [Message], in the export's order
def get(obj, key, kind, at):
    # a field of a JSON export, or an error naming its JSON path: at + key = "result.json: messages[12].date"
    if not isinstance(value := obj.get(key) if isinstance(obj, dict) else None, kind):
        raise ValueError(f"{at}{key}: {'missing' if value is None else f'not a {kind.__name__}'}")
    return value

def parse_discord_json(path, text, options):
    messages = []
    for i, m in enumerate(get(json.loads(text), "messages", list, f"{path}: ")):
        author = get(m, "author", dict, at := f"{path}: messages[{i}].")
        name, kind = get(author, "name", str, f"{at}author."), get(m, "type", str, at)
        # the export holds an edited message's final text; a reply stays, as a plain message (its link is dropped)
        messages.append(message(parse_time(get(m, "timestamp", str, at), f"{at}timestamp"), name,
                                get(m, "content", str, at), {"id": m.get("id")}, None if kind in ("Default", "Reply")
                                else "system", any(m.get(key) for key in ("attachments", "embeds", "stickers")),
                                (author.get("nickname") or name,)))
    return messages

def csv_rows(path, text, columns):  # (line, {column: value}), header lower-cased; a broken row: error at FILE:LINE
    reader, start = csv.reader(io.StringIO(text, newline=""), strict=True), 1
    try:
        if missing := set(columns) - set(header := [h.strip().lower() for h in next(reader, [])]):
            raise ValueError(f"{path}:1: no column {', '.join(sorted(missing))} in the header {','.join(header)!r}")
        for row in reader:
            if row and len(row) != len(header):
                raise ValueError(f"{path}:{start + 1}: expected {len(header)} fields (as the header), got {len(row)}")
            yield from [(start + 1, dict(zip(header, row)))] if row else []
            start = reader.line_num  # the next row starts on the line after this one's last
    except csv.Error as e:
        raise ValueError(f"{path}:{start + 1}: broken CSV row ({e})") from None

def parse_csv(path, text, options):
    # DiscordChatExporter's CSV has no message type (a "Pinned a message." reads as text); old ones say "alice#1234"
    when = "date" if options["kind"] == "discord-csv" else "timestamp"
    return [message(parse_time(row[when], f"{path}:{line}"), row["author"], row["content"], {"line": line},
                    media=bool(row.get("attachments", "").strip()), aliases=(re.sub(r"#\d{4}$", "", row["author"]),))
            for line, row in csv_rows(path, text, (when, "author", "content"))]

def parse_telegram(path, text, options):
    # one chat's export, or the full export: every chat (a new chat is a new conversation)
    messages, full = [], isinstance(data := json.loads(text), dict) and "chats" in data
    chats = get(get(data, "chats", dict, f"{path}: "), "list", list, f"{path}: chats.") if full else [data]
    for c, chat in enumerate(chats):
        chat_at = f"{path}: chats.list[{c}]." if full else f"{path}: "
        for i, m in enumerate(get(chat, "messages", list, chat_at)):
            system = get(m, "type", str, at := f"{chat_at}messages[{i}].") != "message"
            # formatted text is a list of plain strings and {"type": "bold"|"link"|..., "text": ...} entities
            parts = [t] if isinstance(t := m.get("text", ""), str) else get(m, "text", list, at)
            body = "".join(p if isinstance(p, str) else get(p, "text", str, f"{at}text[{j}].")
                           for j, p in enumerate(parts))
            messages.append(message(parse_time(get(m, "date", str, at), f"{at}date"), str(m.get("from") or "Deleted"),
                                    body, {"chat": chat.get("name"), "id": m.get("id")}, "system" if system else None,
                                    any(k in m for k in ("photo", "file", "media_type", "sticker_emoji", "poll"))))
    return messages

# Android "01/02/2023, 14:05 - Name: text" / "1/2/23, 2:05 PM - ..."; iOS "[01/02/2023, 14:05:09] Name: text"
WHATSAPP = re.compile(r"[\u200e\u200f]?(\[)?(\d{1,2})[/.-](\d{1,2})[/.-](\d{2,4}),? (\d{1,2})[:.](\d{2})"
                      r"(?:[:.](\d{2}))?(?:[ \u202f\u00a0]?([AaPp])\.?[Mm]\.?)?(?(1)\] | [-–] )(?:(.+?): )?(.*)")
MEDIA = re.compile(r"<media omitted>|<attached: [^>]*>|(.* )?(image|video|audio|sticker|gif|document|contact card)"
                   r" omitted|.* \(file attached\)", re.I)
DELETED = re.compile(r"(this message was deleted|you deleted this message)\.?", re.I)

def parse_whatsapp(path, text, options):
    lines = text.replace("\r\n", "\n").split("\n")
    matches = [WHATSAPP.fullmatch(line) for line in lines]
    if not (starts := [n for n, match in enumerate(matches) if match]) or any(s.strip() for s in lines[:starts[0]]):
        raise ValueError(f"{path}:1: unknown chat export format (no JSON, no CSV header we know, no WhatsApp message)")
    if (order := options["date_order"]) == "auto":  # a first field over 12 is a day (dmy), a second one too (mdy)
        order = ("dmy" if any(int(m[2]) > 12 for m in matches if m) else
                 "mdy" if any(int(m[3]) > 12 for m in matches if m) else "dmy (ambiguous: no field over 12)")
    options["note"], messages = f", dates {order}", []
    for start, stop in zip(starts, starts[1:] + [len(lines)]):
        _, first, second, year, hour, minute, sec, half, author, body = matches[start].groups()
        day, month = (first, second) if order.startswith("dmy") else (second, first)
        try:  # 12-hour clock: 12 AM is 0h, 12 PM 12h; an hour out of 1..12 is 24, which datetime() rejects
            hour = int(hour) if not half else int(hour) % 12 + 12 * (half in "Pp") if 1 <= int(hour) <= 12 else 24
            when = datetime(int(year) + 2000 * (len(year) == 2), int(month), int(day), hour, int(minute), int(sec or 0))
        except ValueError as e:
            raise ValueError(f"{path}:{start + 1}: broken line (dates {order}): {e}: {lines[start][:60]!r}") from None
        # a timestamp and no "Name:" is WhatsApp speaking ("X added Y"); iOS writes those "Group: \u200eX added Y"
        system = author is None or body.startswith("\u200e")
        # the lines up to the next timestamp continue the message; "<This message was edited>" marks an edit
        body = "\n".join([body, *lines[start + 1:stop]]).replace("\u200e", "").strip()
        body = re.sub(r"\s*<This message was edited>$", "", body)
        messages.append(message(when, author or "", body, {"line": start + 1}, "deleted" if DELETED.fullmatch(body) else
                                "attachments only" if MEDIA.fullmatch(body) else "system" if system else None))
    return messages

PARSERS = {"discord-json": parse_discord_json, "discord-csv": parse_csv, "whatsapp": parse_whatsapp,
           "telegram": parse_telegram, "csv": parse_csv}

def detect(path, text):
    # DiscordChatExporter writes "guild" first; what is no JSON and no CSV we know must be WhatsApp (or an error there)
    first = text.split("\n", 1)[0].strip().lower().replace('"', "")
    return (("discord-json" if re.match(r'\s*{\s*"guild"', text) else "telegram")
            if path.endswith(".json") or first[:1] == "{" else
            "discord-csv" if first.startswith("authorid,author,date,content") else
            "csv" if {"timestamp", "author", "content"} <= set(first.replace(" ", "").split(",")) else "whatsapp")

def conversations(messages, me, gap, speaker_names, source, report):
    """Records of one export's messages, a new conversation after `gap` minutes of silence; counts go to `report`."""
    report["messages"] += len(messages)
    report.update(f"messages dropped: {m.dropped}" for m in messages if m.dropped)
    # the dropped ones go first: a photo or a "X joined" between two messages breaks neither a session nor a turn
    kept, sessions, records = [m for m in messages if not m.dropped], [], []
    for before, m in zip([None] + kept, kept):
        if before is None or m.time - before.time > gap * 60 or m.ref.get("chat") != before.ref.get("chat"):
            sessions.append([])
        sessions[-1].append(m)
    def count(turns, what):  # Counter.update adds
        report.update({"turns": len(turns), f"turns {what}": len(turns)})
        report[f"messages {what}"] += sum(len(run) for _, run in turns)
        return turns
    def turn_text(mine, run):
        # with speaker_names, each other person's run of messages in a user turn says who wrote it
        return "\n".join((f"{name}: " if speaker_names and not mine else "") + "\n".join(m.text for m in by)
                         for name, by in groupby(run, lambda m: m.author))
    for session in sessions:
        # a turn: consecutive messages of one side (mine, or anyone else's: several people merge into one turn)
        turns = [(mine, list(run)) for mine, run in
                 groupby(session, lambda m: not me.isdisjoint(a.casefold() for a in (m.author, *m.aliases)))]
        report["conversations"] += 1
        # I spoke first: nothing there to answer; the last word was someone else's: no answer of mine to learn.
        # What is kept is turns[lead:end]: from the first user turn to my last answer
        lead, end = int(turns[0][0]), len(turns) - (not turns[-1][0])
        count(turns[:lead], "dropped: leading assistant turn")
        if lead >= end:  # no turn of mine between those
            count(turns[lead:], "dropped: conversation without an assistant turn")
            report["conversations dropped: no assistant turn"] += 1
            continue
        count(turns[end:], "dropped: trailing user turn")
        turns, first = count(turns[lead:end], "kept"), turns[lead][1][0]
        report["conversations kept"] += 1
        records.append({"messages": [{"role": "assistant" if mine else "user", "content": turn_text(mine, run)}
                                     for mine, run in turns], "source": {**source, "timestamp": first.stamp, **first.ref}})
        chat_record_to_conversation(records[-1])  # our format (user first, alternating, assistant last), or an error
    return records

def convert(paths, me, gap=60.0, speaker_names=False, fmt="auto", date_order="auto"):
    """(records, report, a summary line per file) of chat exports; a bad file: ValueError at FILE:LINE or JSON path."""
    me, report, records, lines = {name.casefold() for name in me}, Counter(), [], []
    for path in map(str, paths):
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
            options = {"kind": fmt if fmt != "auto" else detect(path, text), "date_order": date_order, "note": ""}
            messages, counts = PARSERS[options["kind"]](path, text, options), Counter()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if me.isdisjoint(a.casefold() for m in messages for a in (m.author, *m.aliases)):
            authors = Counter(m.author for m in messages if m.dropped != "system").most_common()
            raise ValueError(f"{path}: --me {' / '.join(sorted(me))} matches no author; the authors, by message count: "
                             + (", ".join(f"{name} ({n})" for name, n in authors) or "none"))
        records += conversations(messages, me, gap, speaker_names, {"file": Path(path).name}, counts)
        report.update(counts)
        dropped = ", ".join(f"{k[18:]} {n}" for k, n in counts.items() if k.startswith("messages dropped: ") and n)
        lines.append(f"{path}: {options['kind']} ({'detected' if fmt == 'auto' else '--format'}{options['note']}): "
                     f"{counts['conversations kept']} conversations, {counts['messages']} messages; dropped: {dropped}")
    return records, report, lines

class ChatLog(Task):
    """The spec chatlog:EXPORT:me=NAME[:me=NAME2...][:gap=MINUTES][:speaker_names]: its conversations, in memory."""
    def __init__(self, path, words, **slice_kwargs):
        super().__init__(**slice_kwargs)
        me, gaps = [w[3:] for w in words if w.startswith("me=")], [w[4:] for w in words if w.startswith("gap=")]
        if not me or not all(re.fullmatch(r"me=.+|gap=\d+(\.\d+)?|speaker_names", w) for w in words):
            raise ValueError(f"chatlog:{path}: expected me=NAME[:gap=MINUTES][:speaker_names], got {words}")
        records = convert([path], me, float(gaps[-1]) if gaps else 60.0, "speaker_names" in words)[0]
        self.items = [chat_record_to_conversation(record) for record in records]

def main(argv=None):
    parser = argparse.ArgumentParser(description="Chat exports to conversations, you the assistant (tasks/chatlog.py)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("exports", nargs="+", help="chat exports (.json, .csv, .txt)")
    parser.add_argument("--me", action="append", required=True, help="your name (any case); repeat for several")
    parser.add_argument("--out", required=True, help="output .jsonl of conversations")
    parser.add_argument("--session-gap", type=float, default=60.0, help="minutes of silence that end a conversation")
    parser.add_argument("--speaker-names", action="store_true", help='prefix the others\' messages with "Name: "')
    parser.add_argument("--format", choices=["auto", *PARSERS], default="auto", help="export format (auto: detected)")
    parser.add_argument("--date-order", choices=["auto", "dmy", "mdy"], default="auto", help="WhatsApp dates")
    args = parser.parse_args(argv)
    if args.session_gap <= 0:
        parser.error(f"--session-gap must be > 0 minutes, got {args.session_gap}")
    # everything is built and validated before the one write: after a bad file, --out is as it was
    with exit_on(ValueError, OSError):
        records, report, lines = convert(args.exports, args.me, args.session_gap, args.speaker_names, args.format,
                                         args.date_order)
    atomic_write(args.out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    # the counts add up: each message, turn and conversation is in exactly one of the lines below its total
    keys = sorted(report, key=lambda k: (("messages", "turns", "conversations").index(k.split()[0]), "kept" in k, k))
    print("\n".join(lines + [f"  {k:<58} {report[k]:>8,}" for k in keys]))
    print(f"wrote {len(records)} conversations to {args.out}")

if __name__ == "__main__":
    main()
