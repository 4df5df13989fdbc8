"""
Dialogue from books: turn the conversations in plain-text novels into user/assistant pairs.

    python -m tasks.dialogue pg1342_pride_and_prejudice.txt pg11_alice.txt --out dialogue.jsonl
    # then train on it like any conversations: --mixture custom:dialogue.jsonl

How a book becomes conversations:
  - paragraphs are blank-line separated blocks (hard-wrapped lines are joined); a book with no
    blank lines is read one paragraph per line;
  - an utterance is the quoted text of one paragraph: “curly” or "straight" double quotes, or
    ‘single curly’ quotes (--quotes auto picks, per book, the style that opens more quotes).
    The narration around it (", said Alice," / "cried Mrs. Bennet, laughing.") is dropped; a
    sentence split by an attribution is rejoined ("Well," said he, "perhaps." -> "Well, perhaps.");
    _underscored_ emphasis loses its underscores. A paragraph that ends inside an open quote
    continues in the next one (the convention for long speeches) and is one utterance;
  - consecutive quoted paragraphs are a dialogue, each paragraph a new speaker (the novel's
    convention). When the narration names the speaker ("said Jane", "Elizabeth replied"), two
    adjacent utterances by the same person split the dialogue. Thoughts ("thought Alice") and
    paragraphs that are mostly narration around a short quote break it too;
  - a dialogue is cut into conversations of up to --max-turns user/assistant exchanges
    (speakers kept consistent: one on the user side, another on the assistant side);
  - filters: every message --min-chars..--max-chars long, --lang en (mostly ASCII letters and a
    fair share of common English words), no duplicates.
At the end a report says how many utterances and conversations were found, kept, and dropped
for which reason; the counts add up.

Output: jsonl, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...],
"source": {"book": NAME, "paragraph": N}} — the conversation format every chat task reads.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

QUOTE_STYLES = ("double", "single")
SPEECH_VERBS = ("said|says|say|replied|replies|cried|asked|asks|answered|returned|observed|continued|added|"
                "exclaimed|remarked|rejoined|whispered|shouted|called|began|repeated|resumed|interrupted|"
                "muttered|murmured|inquired|enquired|explained|protested|declared|retorted|thought|thinks")
NAME = r"((?:(?:Mr|Mrs|Miss|Dr|Lady|Sir|Colonel|Captain|Aunt|Uncle)\.?\s+)?[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*|I)"
SPEAKER_AFTER_VERB = re.compile(rf"\b({SPEECH_VERBS})\s+(?:the\s+)?{NAME}")
SPEAKER_BEFORE_VERB = re.compile(rf"{NAME}\s+(?:\w+ly\s+)?({SPEECH_VERBS})\b")
NOT_NAMES = {"The", "A", "An", "And", "But", "Then", "So", "He", "She", "It", "They", "We", "You", "This", "That",
             "There", "Here", "When", "What", "Now", "Oh", "Yes", "No", "Well"}
STOPWORDS = set("""a about after all also am an and any are as at be been but by can could did do does for from
had has have he her here him his how i if in into is it its just me more my no not now of on one only or our out
over said she so some than that the their them then there these they this to too up upon us very was we were what
when which who will with would you your""".split())


@dataclass
class Utterance:
    text: str
    speaker: str | None  # normalised name when the narration says who speaks ("said Jane"), else None
    paragraph: int       # 1-based index of the paragraph it starts in
    thought: bool = False
    mostly_narration: bool = False


@dataclass
class Options:
    max_turns: int = 1
    min_chars: int = 2
    max_chars: int = 1000
    lang: str = "en"
    quotes: str = "auto"
    narration_ratio: float = 3.0  # a paragraph with this many times more narration than quote (and > 200 chars) is narrative


# -----------------------------------------------------------------------------
# Paragraphs and quotes


def paragraphs(text):
    """Paragraph strings: blank-line separated blocks with their lines joined, or every line when
    the text has (almost) no blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    blank = sum(1 for line in lines if not line.strip())
    if blank < 0.05 * len(lines):
        return [line.strip() for line in lines if line.strip()]
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(line.strip() for line in block.split("\n") if line.strip()) for block in blocks if block.strip()]


def pick_quote_style(text):
    doubles = text.count("“") + text.count('"') // 2
    singles = len(re.findall(r"(?:^|(?<=[\s(\[—-]))‘", text))
    return "single" if singles > doubles else "double"


def split_quotes(paragraph, style, open_at_start=False):
    """
    (pieces, narration, still open at the end). pieces alternate: the quoted fragments, each
    followed by the narration up to the next fragment ("" after the last). open_at_start: the
    previous paragraph left a quote open (a speech running over paragraphs), so this one starts
    inside it unless it reopens the quote itself.
    """
    fragments, gaps, narration, current = [], [], [], []
    inside = open_at_start and not paragraph.lstrip().startswith(("“", '"', "‘"))
    n = len(paragraph)
    for i, ch in enumerate(paragraph):
        prev = paragraph[i - 1] if i > 0 else " "
        nxt = paragraph[i + 1] if i + 1 < n else " "
        if style == "double":
            opens = ch == "“" or (ch == '"' and not inside)
            closes = ch == "”" or (ch == '"' and inside)
        else:
            opens = ch == "‘" and not prev.isalnum()
            closes = ch == "’" and inside and not nxt.isalpha()  # don’t, they’ll: apostrophes
        if opens and not inside:
            inside, current = True, []
            if fragments:
                gaps[-1] = "".join(narration[gap_start:])
            continue
        if closes and inside:
            if "".join(current).strip():
                fragments.append("".join(current))
                gaps.append("")
                gap_start = len(narration)
            inside, current = False, []
            continue
        (current if inside else narration).append(ch)
    if inside and "".join(current).strip():
        fragments.append("".join(current))
        gaps.append("")
    return list(zip(fragments, gaps)), "".join(narration), inside


def join_fragments(pieces):
    """
    One utterance from (fragment, narration after it) pieces. An attribution often splits one
    sentence: "Well," said he, "perhaps." -> 'Well, perhaps.'; but when the narration ends a
    sentence, the comma before it did too: "I am," said Tom. "I will." -> 'I am. I will.'
    """
    text, gap = "", ""
    for fragment, next_gap in pieces:
        fragment = re.sub(r"\s+", " ", fragment).strip()
        if text.endswith(",") and gap.strip()[-1:] in (".", "!", "?", ";"):
            text = text[:-1] + "."
        text = f"{text} {fragment}" if text else fragment
        gap = next_gap
    return re.sub(r"_([^_]+)_", r"\1", text).strip()  # Gutenberg's _emphasis_


def find_speaker(narration):
    """(speaker or None, is_thought) from the narration of a paragraph."""
    for pattern, name_group, verb_group in ((SPEAKER_AFTER_VERB, 2, 1), (SPEAKER_BEFORE_VERB, 1, 2)):
        for match in pattern.finditer(narration):
            name, verb = match.group(name_group), match.group(verb_group)
            if name.split()[0] in NOT_NAMES:
                continue
            return re.sub(r"\.", "", name).lower(), verb.startswith("thought") or verb == "thinks"
    return None, bool(re.search(r"\b(thought|thinks)\b", narration))


def utterances(text, quotes="auto", narration_ratio=3.0):
    """The utterances of a book, in order, with None between dialogues (a narrative paragraph)."""
    style = pick_quote_style(text) if quotes == "auto" else quotes
    out, still_open = [], False
    for index, paragraph in enumerate(paragraphs(text), 1):
        pieces, narration, open_now = split_quotes(paragraph, style, open_at_start=still_open)
        continuing = still_open
        still_open = open_now
        if not pieces:
            out.append(None)
            continue
        utterance_text = join_fragments(pieces)
        speaker, thought = find_speaker(narration)
        if continuing and out and out[-1] is not None:  # the same speech, next paragraph
            previous = out[-1]
            previous.text = join_fragments([(previous.text, ""), (utterance_text, "")])
            previous.speaker = previous.speaker or speaker
            continue
        quoted_chars = sum(len(f) for f, _ in pieces)
        narration_chars = len(narration.strip())
        heavy = narration_chars > 200 and narration_chars > narration_ratio * quoted_chars
        out.append(Utterance(utterance_text, speaker, index, thought=thought, mostly_narration=heavy))
    for u in out:
        if u is not None and u.text.endswith(","):  # 'I don't know,' said Alice. -> the sentence ends there
            u.text = u.text[:-1] + "."
    return out


# -----------------------------------------------------------------------------
# Dialogues -> conversations


def is_english(text):
    """ASCII letters and common English words: enough to drop foreign-language passages."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) < 6 or sum(w in STOPWORDS for w in words) >= 0.15 * len(words)


def conversations_from_run(run, max_turns, report):
    """Cut one dialogue (consecutive utterances) into conversations of alternating speakers."""
    convs, i, n = [], 0, len(run)

    def differ(a, b):
        return a.speaker is None or b.speaker is None or a.speaker != b.speaker

    while i + 1 < n:
        if not differ(run[i], run[i + 1]):
            report["utterances unpaired (same speaker twice, or a lone line)"] += 1
            i += 1
            continue
        conv, j = [run[i], run[i + 1]], i + 2
        while len(conv) < 2 * max_turns and j + 1 < n:
            user_side = {u.speaker for u in conv[0::2] + [run[j]] if u.speaker}
            assistant_side = {u.speaker for u in conv[1::2] + [run[j + 1]] if u.speaker}
            if len(user_side) > 1 or len(assistant_side) > 1 or (user_side & assistant_side) \
                    or not differ(conv[-1], run[j]) or not differ(run[j], run[j + 1]):
                break
            conv += [run[j], run[j + 1]]
            j += 2
        convs.append(conv)
        report["utterances in conversations"] += len(conv)
        i = j
    report["utterances unpaired (same speaker twice, or a lone line)"] += n - i
    return convs


def extract(text, book, options, report=None, seen=None):
    """Conversations (records) from one book's text; counts go to `report` (a Counter)."""
    report = report if report is not None else Counter()
    seen = seen if seen is not None else set()
    items = utterances(text, options.quotes, options.narration_ratio)
    report["books"] += 1
    report["paragraphs"] += len(items)
    runs, run = [], []
    for u in items + [None]:
        if u is not None:
            report["utterances"] += 1
        if u is None or u.thought or u.mostly_narration:
            if u is not None:
                report["utterances dropped: a thought" if u.thought else "utterances dropped: mostly narration"] += 1
            if run:
                runs.append(run)
            run = []
        else:
            run.append(u)
    records = []
    for run in runs:
        for conv in conversations_from_run(run, options.max_turns, report):
            report["conversations"] += 1
            texts = [u.text for u in conv]
            if any(len(t) < options.min_chars for t in texts):
                reason = "too short"
            elif any(len(t) > options.max_chars for t in texts):
                reason = "too long"
            elif options.lang == "en" and not is_english(" ".join(texts)):
                reason = "not English"
            elif tuple(texts) in seen:
                reason = "duplicate"
            else:
                seen.add(tuple(texts))
                messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]
                records.append({"messages": messages, "source": {"book": book, "paragraph": conv[0].paragraph}})
                report["conversations kept"] += 1
                continue
            report[f"conversations dropped: {reason}"] += 1
    return records, report


def format_report(report):
    order = ["books", "paragraphs", "utterances", "utterances dropped: a thought", "utterances dropped: mostly narration",
             "utterances unpaired (same speaker twice, or a lone line)", "utterances in conversations",
             "conversations", "conversations kept"]
    keys = order + sorted(k for k in report if k not in order)
    return "\n".join(f"  {k:<58} {report[k]:>8,}" for k in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Turn the dialogue in plain-text books into user/assistant conversations.",
                                     epilog="See the docstring of tasks/dialogue.py for the rules.")
    parser.add_argument("books", nargs="+", help="plain-text books (UTF-8)")
    parser.add_argument("--out", required=True, help="output .jsonl of conversations")
    parser.add_argument("--max-turns", type=int, default=1, help="user/assistant exchanges per conversation, at most")
    parser.add_argument("--min-chars", type=int, default=2, help="drop a conversation with a message shorter than this")
    parser.add_argument("--max-chars", type=int, default=1000, help="drop a conversation with a message longer than this")
    parser.add_argument("--lang", choices=["en", "any"], default="en", help="keep only English-looking text (en), or all")
    parser.add_argument("--quotes", choices=["auto", *QUOTE_STYLES], default="auto",
                        help="quote marks that delimit speech: double (“” and \"), single (‘’), or auto per book")
    args = parser.parse_args(argv)
    if args.max_turns < 1:
        raise SystemExit("--max-turns must be >= 1")
    options = Options(args.max_turns, args.min_chars, args.max_chars, args.lang, args.quotes)

    report, seen, records = Counter(), set(), []
    for path in args.books:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise SystemExit(f"book not found: {path}") from None
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path}: not UTF-8 text ({e})") from None
        book_records, _ = extract(text, os.path.basename(path), options, report, seen)
        print(f"{path}: {len(book_records)} conversations")
        records += book_records

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    print(format_report(report))
    print(f"wrote {len(records)} conversations to {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
