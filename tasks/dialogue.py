"""Dialogue from books: the conversations in plain-text novels as user/assistant pairs, for SFT. A report
at the end says how many utterances and conversations were found, kept, and dropped for which reason.
    python -m tasks.dialogue pg1342_pride_and_prejudice.txt pg11_alice.txt --out dialogue.jsonl
    # then train on it like any conversations: --mixture custom:dialogue.jsonl"""
import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from nanochat.common import HelpFormatter, atomic_write

# the verbs of "said Jane" / "Jane replied" that name who speaks: one missing, and a character may answer herself
SPEECH_VERBS = ("said|says|say|replied|replies|cried|asked|asks|answered|returned|observed|continued|added|went on|"
                "exclaimed|remarked|rejoined|whispered|shouted|screamed|called|began|repeated|resumed|interrupted|"
                "pursued|demanded|suggested|assented|croaked|muttered|murmured|inquired|enquired|explained|protested|"
                "declared|retorted|thought|thinks")
NAME = r"((?:(?:Mr|Mrs|Miss|Dr|Lady|Sir|Colonel|Captain|Aunt|Uncle)\.?\s+)?[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*|I)"
SPEAKER_AFTER_VERB = re.compile(rf"\b({SPEECH_VERBS})\s+(?:the\s+)?{NAME}")
SPEAKER_BEFORE_VERB = re.compile(rf"{NAME}\s+(?:\w+ly\s+)?({SPEECH_VERBS})\b")
# capitalised words that NAME takes for a name, though they are none ("He said", "Well said")
NOT_NAMES = {"The", "A", "An", "And", "But", "Then", "So", "He", "She", "It", "They", "We", "You", "This", "That",
             "There", "Here", "When", "What", "Now", "Oh", "Yes", "No", "Well"}
# common English words: a passage with too few of them is in another language
STOPWORDS = set("""a about after all also am an and any are as at be been but by can could did do does for from had
has have he her here him his how i if in into is it its just me more my no not now of on one only or our out over said
she so some than that the their them then there these they this to too up upon us very was we were what when which who
will with would you your""".split())

@dataclass
class Utterance:
    text: str
    speaker: str | None  # normalised name when the narration says who speaks ("said Jane"), else None
    paragraph: int       # 1-based index of the paragraph it starts in
    dropped: str | None = None  # why it breaks a dialogue instead of joining one: "a thought", "mostly narration"

@dataclass
class Options:
    max_turns: int = 1
    min_chars: int = 2
    max_chars: int = 1000
    lang: str = "en"
    quotes: str = "auto"
    narration_ratio: float = 3.0  # this many times more narration than quote (and > 200 chars): a narrative paragraph

# -----------------------------------------------------------------------------
# Paragraphs and quotes
def paragraphs(text):
    # the paragraphs of a book, each one string: blank-line separated blocks, hard-wrapped lines joined; a book
    # with (almost) no blank lines has a paragraph per line
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if sum(1 for line in lines if not line.strip()) < 0.05 * len(lines):
        return [line.strip() for line in lines if line.strip()]
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(line.strip() for line in block.split("\n") if line.strip()) for block in blocks if block.strip()]

def split_quotes(paragraph, style, open_at_start=False):
    """(pieces, narration, still open at the end); pieces: [(quoted fragment, narration after it)]."""
    # open_at_start: the previous paragraph left a quote open (a speech running over paragraphs), so
    # this one starts inside it unless it reopens the quote itself
    pieces, narration, current = [], [], []
    inside = open_at_start and not paragraph.lstrip().startswith(("“", '"', "‘"))
    for i, ch in enumerate(paragraph):
        prev, nxt = paragraph[i - 1:i] or " ", paragraph[i + 1:i + 2] or " "
        if style == "double":  # a straight quote opens outside a quote and closes inside one
            opens, closes = ch == "“" or (ch == '"' and not inside), ch == "”" or (ch == '"' and inside)
        else:  # don’t, they’ll: a ’ before a letter is an apostrophe, not a closing quote
            opens, closes = ch == "‘" and not prev.isalnum(), ch == "’" and inside and not nxt.isalpha()
        if not (closes if inside else opens):
            (current if inside else narration).append(ch)
            continue
        # a quote closes (a blank one is no fragment), or one opens: then the narration between two fragments
        # goes with the first ("Well," said he, "perhaps.")
        if inside and "".join(current).strip():
            pieces.append(["".join(current), ""])
            gap_start = len(narration)
        elif not inside and pieces:
            pieces[-1][1] = "".join(narration[gap_start:])
        inside, current = not inside, []
    if inside and "".join(current).strip():
        pieces.append(["".join(current), ""])
    return [tuple(piece) for piece in pieces], "".join(narration), inside

def join_fragments(pieces):
    """One utterance from (fragment, narration after it) pieces, the narration dropped."""
    # an attribution often splits one sentence: "Well," said he, "perhaps." -> 'Well, perhaps.'; but when
    # the narration ends a sentence, the comma before it did too: "I am," said Tom. "I will." -> 'I am. I will.'
    text, gap = "", ""
    for fragment, next_gap in pieces:
        fragment = re.sub(r"\s+", " ", fragment).strip()
        if text.endswith(",") and gap.strip()[-1:] in (".", "!", "?", ";"):
            text = text[:-1] + "."
        text, gap = (f"{text} {fragment}" if text else fragment), next_gap
    return re.sub(r"_([^_]+)_", r"\1", text).strip()  # Gutenberg's _emphasis_

def find_speaker(narration):
    """(speaker or None, is_thought) from the narration of a paragraph."""
    for pattern, name_group, verb_group in ((SPEAKER_AFTER_VERB, 2, 1), (SPEAKER_BEFORE_VERB, 1, 2)):
        for match in pattern.finditer(narration):
            name, verb = match.group(name_group), match.group(verb_group)
            if name.split()[0] not in NOT_NAMES:
                return re.sub(r"\.", "", name).lower(), verb.startswith("thought") or verb == "thinks"
    return None, bool(re.search(r"\b(thought|thinks)\b", narration))

def utterances(text, quotes="auto", narration_ratio=3.0):
    """The utterances of a book, in order, with None between dialogues (a narrative paragraph)."""
    if quotes == "auto":
        # “curly” or "straight" double quotes, or ‘single curly’ ones: whichever opens more quotes in this book
        doubles, singles = text.count("“") + text.count('"') // 2, len(re.findall(r"(?:^|(?<=[\s(\[—-]))‘", text))
        quotes = "single" if singles > doubles else "double"
    out, still_open = [], False
    for index, paragraph in enumerate(paragraphs(text), 1):
        continuing, (pieces, narration, still_open) = still_open, split_quotes(paragraph, quotes, still_open)
        if not pieces:
            out.append(None)
            continue
        spoken, (speaker, thought) = join_fragments(pieces), find_speaker(narration)
        # a paragraph that ended inside an open quote continues here: the convention for long speeches
        if continuing and out and out[-1] is not None:
            out[-1].text = join_fragments([(out[-1].text, ""), (spoken, "")])
            out[-1].speaker = out[-1].speaker or speaker
            continue
        # a short quote in a long stretch of narration is part of the story, not of a dialogue
        quoted_chars, narration_chars = sum(len(f) for f, _ in pieces), len(narration.strip())
        heavy = narration_chars > 200 and narration_chars > narration_ratio * quoted_chars
        out.append(Utterance(spoken, speaker, index, "a thought" if thought else "mostly narration" if heavy else None))
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

# a speaker named twice in a row: one person talking on, not an exchange (an unnamed speaker is someone else)
def same_speaker(a, b):
    return a.speaker is not None and a.speaker == b.speaker

def conversations_from_run(run, max_turns, report):
    """Cut one dialogue (consecutive utterances) into conversations of up to max_turns exchanges."""
    # each paragraph is a new speaker (the novel's convention), unless the narration names the same
    # person twice in a row; a conversation keeps one speaker on the user side, another on the assistant's
    convs, i, n = [], 0, len(run)
    while i + 1 < n:
        if same_speaker(run[i], run[i + 1]):
            report["utterances unpaired (same speaker twice, or a lone line)"] += 1
            i += 1
            continue
        conv, j = [run[i], run[i + 1]], i + 2
        while len(conv) < 2 * max_turns and j + 1 < n:
            user_side = {u.speaker for u in conv[0::2] + [run[j]] if u.speaker}
            assistant_side = {u.speaker for u in conv[1::2] + [run[j + 1]] if u.speaker}
            if len(user_side) > 1 or len(assistant_side) > 1 or (user_side & assistant_side) \
                    or same_speaker(conv[-1], run[j]) or same_speaker(run[j], run[j + 1]):
                break
            conv, j = conv + [run[j], run[j + 1]], j + 2
        convs.append(conv)
        report["utterances in conversations"] += len(conv)
        i = j
    report["utterances unpaired (same speaker twice, or a lone line)"] += n - i
    return convs

def extract(text, book, options, report=None, seen=None):
    """Conversations (records) from one book's text; counts go to `report` (a Counter)."""
    report, seen = Counter() if report is None else report, set() if seen is None else seen
    items = utterances(text, options.quotes, options.narration_ratio)
    report.update(books=1, paragraphs=len(items), utterances=sum(u is not None for u in items))  # adds the counts
    # a dialogue is a run of consecutive quoted paragraphs; a thought, or mostly narration, breaks it
    report.update(f"utterances dropped: {u.dropped}" for u in items if u is not None and u.dropped)
    runs = [list(run) for in_dialogue, run in groupby(items, lambda u: u is not None and not u.dropped) if in_dialogue]
    records = []
    for conv in (conv for run in runs for conv in conversations_from_run(run, options.max_turns, report)):
        report["conversations"] += 1
        texts = [u.text for u in conv]
        # why the conversation (its message texts) is left out, or None to keep it
        reason = ("too short" if any(len(t) < options.min_chars for t in texts) else
                  "too long" if any(len(t) > options.max_chars for t in texts) else
                  "not English" if options.lang == "en" and not is_english(" ".join(texts)) else
                  "duplicate" if tuple(texts) in seen else None)
        if reason:
            report[f"conversations dropped: {reason}"] += 1
            continue
        seen.add(tuple(texts))
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]
        # the conversation format every chat task reads, and where it comes from
        records.append({"messages": messages, "source": {"book": book, "paragraph": conv[0].paragraph}})
        report["conversations kept"] += 1
    return records, report

def main(argv=None):
    parser = argparse.ArgumentParser(description="Turn the dialogue in plain-text books into user/assistant conversations.",
                                     epilog="See tasks/dialogue.py for the rules.", formatter_class=HelpFormatter)
    parser.add_argument("books", nargs="+", help="plain-text books (UTF-8)")
    parser.add_argument("--out", required=True, help="output .jsonl of conversations")
    parser.add_argument("--max-turns", type=int, default=1, help="user/assistant exchanges per conversation, at most")
    parser.add_argument("--min-chars", type=int, default=2, help="drop a conversation with a message shorter than this")
    parser.add_argument("--max-chars", type=int, default=1000, help="drop a conversation with a message longer than this")
    parser.add_argument("--lang", choices=["en", "any"], default="en", help="keep only English-looking text (en), or all")
    parser.add_argument("--quotes", choices=["auto", "double", "single"], default="auto",
                        help="quote marks that delimit speech: double (“” and \"), single (‘’), or auto per book")
    args = parser.parse_args(argv)
    if args.max_turns < 1:
        raise SystemExit("--max-turns must be >= 1")
    options = Options(args.max_turns, args.min_chars, args.max_chars, args.lang, args.quotes)
    report, seen, records = Counter(), set(), []
    for path in args.books:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SystemExit(f"book not found: {path}") from None
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path}: not UTF-8 text ({e})") from None
        book_records, _ = extract(text, Path(path).name, options, report, seen)
        print(f"{path}: {len(book_records)} conversations")
        records += book_records
    atomic_write(args.out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    # the counts add up: every utterance and every conversation falls in exactly one line below its total
    order = ["books", "paragraphs", "utterances", "utterances dropped: a thought", "utterances dropped: mostly narration",
             "utterances unpaired (same speaker twice, or a lone line)", "utterances in conversations",
             "conversations", "conversations kept"]
    print("\n".join(f"  {k:<58} {report[k]:>8,}" for k in order + sorted(k for k in report if k not in order))
          + f"\nwrote {len(records)} conversations to {args.out}")
    return report

if __name__ == "__main__":
    main()
