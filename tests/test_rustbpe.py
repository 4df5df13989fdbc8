"""
Tests for the Rust BPE trainer `rustbpe`, against independent references:
- a plain Python BPE trainer (recount every pair each step), fed by HF `tokenizers`' own
  implementation of the split pattern (Oniguruma, not fancy-regex);
- tiktoken (fancy-regex + its own BPE) for encoding with the learned ranks;
- HF `tokenizers`' BpeTrainer, both configured for identical ids and in the usual byte-level
  setup (where only the tie-break order differs, which the reference trainer reproduces).
"""
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rustbpe
import tiktoken
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
GPT4_PATTERN = DEFAULT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")

# -----------------------------------------------------------------------------
# test corpora

def generated_texts(seed=0, n_texts=400):
    """Deterministic text exercising every branch of the split pattern."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "and", "then", "it", "ran", "away", "quickly", "hello", "world",
             "café", "naïve", "Zürich", "中文", "слово", "ſtraße", "😀", "e\u0301", "THE", "Hello", "don", "we"]
    suffixes = ["'s", "'t", "'LL", "'ve", "'Re", "'d", "'m", "'x", "'\u017F", ""]
    puncts = [".", ",", "!", "?", "...", " -", " (", ")", "\"", ":", ";", "#", "''"]
    spaces = [" ", " ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n ", "\u00a0", "\u3000"]
    texts = []
    for _ in range(n_texts):
        parts = []
        for _ in range(rng.randint(5, 60)):
            kind = rng.random()
            if kind < 0.6:
                parts.append(rng.choice(words) + rng.choice(suffixes))
            elif kind < 0.75:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
            else:
                parts.append(rng.choice(puncts))
            parts.append(rng.choice(spaces))
        texts.append("".join(parts))
    return texts

def real_texts(max_bytes=60_000):
    """A few hundred KB of real text (several domains, digits included), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    texts = []
    for rel in ["pretrain/train/tinyshakespeare.txt", "pretrain/train/tinystories_head.txt",
                "pretrain/train/gutenberg/pg1342_pride_and_prejudice.txt", "pretrain/val/wikitext2_valid.txt"]:
        text = (SHARED_DATA / rel).read_text(encoding="utf-8")[:max_bytes]
        texts.extend(block for block in text.split("\n\n") if block)
    with open(SHARED_DATA / "chat" / "gsm8k_train_chat.jsonl", encoding="utf-8") as f:
        size = 0
        for line in f:
            for message in json.loads(line)["messages"]:
                texts.append(message["content"])
                size += len(message["content"])
            if size > max_bytes:
                break
    return texts

def random_unicode(rng, length):
    """Random text: any non-surrogate code point from any plane, plus the usual troublemakers."""
    pieces = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.3:
            cp = rng.randrange(0x110000)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randrange(0x110000)
            pieces.append(chr(cp))
        elif kind < 0.5:
            pieces.append(rng.choice(["😀", "👍🏽", "👨‍👩‍👧", "e\u0301", "\u0301\u0302", "ſ", "\u212a", "ß", "中", "ﬁ"]))
        elif kind < 0.6:
            pieces.append(rng.choice(["\r\n", "\n", "\r", "\t", "  ", "\u00a0", "\u2028", "\x00", "\x7f"]))
        elif kind < 0.7:
            pieces.append("".join(rng.choice("0123456789٣") for _ in range(rng.randint(1, 30))))
        elif kind < 0.8:
            pieces.append(rng.choice(["'s", "'LL", "'Ve", " don't", "?!", "...", " ("]))
        else:
            pieces.append(rng.choice(["hello", " world", "Text", " ", "a"]))
    return "".join(pieces)

# -----------------------------------------------------------------------------
# references

HF_SPLIT = pre_tokenizers.Split(Regex(DEFAULT_PATTERN), behavior="isolated")

def hf_split(text, splitter=HF_SPLIT):
    return [chunk for chunk, _ in splitter.pre_tokenize_str(text)]

def reference_bpe(chunk_counts, num_merges, id_of_byte=range(256)):
    """
    Plain BPE, vectorized with numpy: every step recounts every adjacent pair in every unique
    chunk (weighted by its count), merges the most frequent everywhere (left to right, no
    overlaps), ties to the lowest pair of ids. `id_of_byte` gives the initial id of each byte
    (the tie-break order); merged tokens get ids 256, 257, ... Returns merged tokens as bytes.
    """
    chunks = list(chunk_counts)
    symbols = np.array([id_of_byte[b] for chunk in chunks for b in chunk], dtype=np.int64)
    word = np.repeat(np.arange(len(chunks)), [len(c) for c in chunks])
    weight = np.repeat(np.array([chunk_counts[c] for c in chunks], dtype=np.int64), [len(c) for c in chunks])
    token_bytes = {id_of_byte[b]: bytes([b]) for b in range(256)}
    merged = []
    for new_id in range(256, 256 + num_merges):
        same_word = word[:-1] == word[1:]
        keys = (symbols[:-1] << 32 | symbols[1:])[same_word]
        if keys.size == 0:
            break
        unique_keys, index = np.unique(keys, return_inverse=True)
        totals = np.bincount(index, weights=weight[:-1][same_word])
        best = unique_keys[np.argmax(totals)]  # first maximum = lowest pair (keys are sorted)
        a, b = int(best >> 32), int(best & 0xFFFFFFFF)
        at = np.flatnonzero(same_word & (symbols[:-1] == a) & (symbols[1:] == b))
        if a == b:  # in a run like "aaaa", merge the 1st, 3rd, ... occurrence
            run_start = np.r_[True, at[1:] != at[:-1] + 1]
            first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(at.size), 0))
            at = at[(np.arange(at.size) - first_of_run) % 2 == 0]
        symbols[at] = new_id
        keep = np.ones(symbols.size, dtype=bool)
        keep[at + 1] = False
        symbols, word, weight = symbols[keep], word[keep], weight[keep]
        token_bytes[new_id] = token_bytes[a] + token_bytes[b]
        merged.append(token_bytes[new_id])
    return merged

def chunk_counts_of(texts, splitter=HF_SPLIT):
    return Counter(chunk.encode("utf-8") for text in texts for chunk in hf_split(text, splitter))

def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok

def merged_tokens(tok):
    ranks = tok.get_mergeable_ranks()
    return [token for token, _ in ranks[256:]]

def tiktoken_encoding(tok):
    return tiktoken.Encoding("rustbpe_test", pat_str=tok.get_pattern(),
                             mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})

# the generated corpus alone supports ~380 merges before every chunk is one token
TRAINED_VOCAB = 256 + (1500 if SHARED_DATA.is_dir() else 300)

@pytest.fixture(scope="module")
def trained():
    """One tokenizer trained on generated + (when present) real text, shared by several tests."""
    texts = generated_texts()
    if SHARED_DATA.is_dir():
        texts += real_texts(max_bytes=30_000)
    return train(texts, TRAINED_VOCAB)

# -----------------------------------------------------------------------------
# the split pattern: HF's Oniguruma implementation agrees with fancy-regex (tiktoken's engine)

def fancy_regex_split_equals(texts, chunks_per_text):
    """
    Check that tiktoken splits every text into exactly `chunks_per_text`: give tiktoken a vocab
    of single bytes + every expected chunk + every concatenation of 2-4 consecutive chunks.
    tiktoken maps a piece that is in the vocab to one token, so its output equals the expected
    chunks only if each of its pieces is exactly one expected chunk.
    """
    vocab = {bytes([b]) for b in range(256)}
    for chunks in chunks_per_text:
        encoded = [c.encode("utf-8") for c in chunks]
        for k in range(1, 5):
            vocab.update(b"".join(encoded[i:i + k]) for i in range(len(encoded) - k + 1))
    ranks = {token: rank for rank, token in enumerate(sorted(vocab, key=lambda t: (len(t), t)))}
    enc = tiktoken.Encoding("split_check", pat_str=DEFAULT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text, chunks in zip(texts, chunks_per_text):
        pieces = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]
        assert pieces == [c.encode("utf-8") for c in chunks], f"split differs on {text[:200]!r}"

def test_hf_split_agrees_with_fancy_regex_on_generated_and_random_text():
    rng = random.Random(1)
    texts = generated_texts(seed=1, n_texts=100) + [random_unicode(rng, 60) for _ in range(200)]
    chunks = [hf_split(t) for t in texts]
    assert all("".join(c) == t for c, t in zip(chunks, texts))  # the pattern covers all text
    fancy_regex_split_equals(texts, chunks)

def test_hf_split_agrees_with_fancy_regex_on_real_text():
    texts = real_texts()
    fancy_regex_split_equals(texts, [hf_split(t) for t in texts])

# -----------------------------------------------------------------------------
# merges: identical, in order, to the plain reference trainer

def test_merges_match_reference_on_generated_text():
    texts = generated_texts()
    ours = merged_tokens(train(texts, 256 + 300))
    assert ours == reference_bpe(chunk_counts_of(texts), 300)

def test_merges_match_reference_on_real_text():
    texts = real_texts()
    assert sum(len(t) for t in texts) > 250_000
    ours = merged_tokens(train(texts, 256 + 300))
    assert ours == reference_bpe(chunk_counts_of(texts), 300)

def test_custom_pattern_uses_it_and_matches_reference():
    pattern = r"\w+|[^\w\s]+|\s+"
    texts = generated_texts(seed=3, n_texts=100)
    tok = train(texts, 256 + 200, pattern=pattern)
    assert tok.get_pattern() == pattern
    splitter = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    assert merged_tokens(tok) == reference_bpe(chunk_counts_of(texts, splitter), 200)

def test_scanner_and_regex_give_the_same_tokenizer():
    # the default pattern family is run by a hand-written scanner; wrapping the pattern in a
    # group makes it go through fancy-regex instead: the results must be identical
    texts = generated_texts(seed=4, n_texts=200) + [random_unicode(random.Random(4), 80) for _ in range(50)]
    for pattern in [DEFAULT_PATTERN, GPT4_PATTERN]:
        fast = train(texts, 256 + 400, pattern=pattern)
        slow = train(texts, 256 + 400, pattern=f"(?:{pattern})")
        assert fast.get_mergeable_ranks() == slow.get_mergeable_ranks()

def test_deterministic_across_buffer_sizes_and_runs():
    texts = generated_texts(seed=5, n_texts=300)
    ranks = [train(texts, 256 + 300, buffer_size=bs).get_mergeable_ranks() for bs in (1, 7, 8192, 8192)]
    assert all(r == ranks[0] for r in ranks)

def test_ranks_layout(trained):
    ranks = trained.get_mergeable_ranks()
    assert len(ranks) == TRAINED_VOCAB
    assert ranks[:256] == [(bytes([b]), b) for b in range(256)]
    assert [rank for _, rank in ranks] == list(range(len(ranks)))
    assert len({token for token, _ in ranks}) == len(ranks)
    assert all(len(token) >= 2 for token, _ in ranks[256:])
    assert trained.get_pattern() == DEFAULT_PATTERN

def test_stops_early_when_nothing_is_left_to_merge():
    tok = train(["ab ab", "a"], 1000)
    assert merged_tokens(tok) == [b"ab", b" ab"]

# -----------------------------------------------------------------------------
# HF tokenizers' BpeTrainer

def hf_merged_tokens(tok_json, byte_of_char):
    merges = json.loads(tok_json)["model"]["merges"]
    pairs = [m if isinstance(m, list) else m.split(" ") for m in merges]
    return [bytes(byte_of_char[c] for c in left + right) for left, right in pairs]

def gpt2_byte_chars():
    """GPT-2's byte -> printable char table (what HF's ByteLevel pre-tokenizer uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        chars[b] = chr(b) if b in keep else chr(256 + extra)
        extra += b not in keep
    return chars

def hf_texts():
    texts = generated_texts(seed=6)
    if SHARED_DATA.is_dir():
        texts += real_texts(max_bytes=40_000)
    return texts

def test_hf_trainer_gives_identical_ids_when_byte_order_is_kept():
    # HF orders its initial alphabet by char and breaks ties by the lowest pair of ids, like us.
    # Mapping byte b to chr(0x100 + b) keeps the byte order, so HF's ids equal our ranks.
    texts, num_merges = hf_texts(), 800
    byte_char = {b: chr(0x100 + b) for b in range(256)}
    mapped = [" ".join("".join(byte_char[b] for b in chunk.encode("utf-8")) for chunk in hf_split(t)) for t in texts]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the mapped chunks contain no whitespace
    hf.train_from_iterator(mapped, trainers.BpeTrainer(
        vocab_size=256 + num_merges, show_progress=False, special_tokens=[],
        initial_alphabet=list(byte_char.values())))
    char_byte = {c: b for b, c in byte_char.items()}
    hf_ranks = sorted(((bytes(char_byte[c] for c in token), i) for token, i in hf.get_vocab().items()), key=lambda x: x[1])
    ours = train(texts, 256 + num_merges)
    assert hf_ranks == ours.get_mergeable_ranks()

def test_hf_bytelevel_trainer_differs_only_by_tie_break_order():
    # The usual HF setup (Split + ByteLevel) numbers bytes by GPT-2's printable-char order
    # (e.g. space is 'Ġ', after the letters), so equal-count ties can resolve differently.
    # The reference trainer with that byte order reproduces HF exactly.
    texts, num_merges = hf_texts(), 400
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        HF_SPLIT, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=256 + num_merges, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_char = gpt2_byte_chars()
    hf_merges = hf_merged_tokens(hf.to_str(), {c: b for b, c in byte_char.items()})
    chars_sorted = sorted(byte_char.values())
    hf_id_of_byte = [chars_sorted.index(byte_char[b]) for b in range(256)]
    counts = chunk_counts_of(texts)
    assert hf_merges == reference_bpe(counts, num_merges, id_of_byte=hf_id_of_byte)
    # ...while ours is the same trainer with bytes in byte order (the two part at the first
    # tie between pairs whose order the mapping changes, e.g. " Elizabeth" vs "all")
    assert merged_tokens(train(texts, 256 + num_merges)) == reference_bpe(counts, num_merges)

# -----------------------------------------------------------------------------
# encoding

def test_encode_matches_tiktoken_and_roundtrips(trained):
    enc = tiktoken_encoding(trained)
    rng = random.Random(7)
    texts = [random_unicode(rng, rng.randint(0, 200)) for _ in range(300)] + generated_texts(seed=8, n_texts=50)
    texts += ["", " ", "\r\n\r\n", "1" * 1000, " " * 500 + "x", "😀" * 50]
    if SHARED_DATA.is_dir():
        texts += [(SHARED_DATA / "pretrain/val/wikitext2_valid.txt").read_text(encoding="utf-8")[:200_000]]
    token_bytes = [token for token, _ in trained.get_mergeable_ranks()]
    for text in texts:
        ids = trained.encode(text)
        assert ids == enc.encode_ordinary(text), f"differs from tiktoken on {text[:100]!r}"
        assert b"".join(token_bytes[i] for i in ids).decode("utf-8") == text

def test_gpt4_pattern_encode_matches_tiktoken():
    texts = generated_texts(seed=9, n_texts=200)
    tok = train(texts, 256 + 300, pattern=GPT4_PATTERN)
    enc = tiktoken_encoding(tok)
    for text in texts[:50] + ["1234567890 12 123 1234"]:
        assert tok.encode(text) == enc.encode_ordinary(text)

# -----------------------------------------------------------------------------
# bad input: clear Python exceptions, never a crash

def test_rejects_small_vocab():
    for vocab_size in (255, 0, -1):
        with pytest.raises(ValueError, match="vocab_size must be at least 256"):
            train(["hello"], vocab_size)

def test_rejects_empty_corpus():
    for texts in ([], ["", ""]):
        with pytest.raises(ValueError, match="empty corpus"):
            train(texts, 300)

def test_rejects_non_str_item_naming_index_and_type():
    with pytest.raises(TypeError, match=r"item 2 is bytes, expected str"):
        train(["a", "b", b"c"], 300)
    with pytest.raises(TypeError, match=r"item 0 is int"):
        train([5], 300)

def test_rejects_non_iterable():
    tok = rustbpe.Tokenizer()
    with pytest.raises(TypeError, match="iterable of str"):
        tok.train_from_iterator(42, 300)

def test_rejects_invalid_pattern():
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(["hello"], 300, pattern="(unclosed")

def test_rejects_lone_surrogate_and_bad_buffer_size():
    with pytest.raises(ValueError, match="item 1"):
        train(["ok", "bad \ud800"], 300)
    with pytest.raises(ValueError, match="buffer_size"):
        train(["ok"], 300, buffer_size=0)

def test_iterator_errors_propagate():
    def failing():
        yield "fine"
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(failing(), 300)

def test_use_before_training_raises():
    tok = rustbpe.Tokenizer()
    assert tok.get_pattern() == DEFAULT_PATTERN
    with pytest.raises(ValueError, match="not trained"):
        tok.encode("hello")
    with pytest.raises(ValueError, match="not trained"):
        tok.get_mergeable_ranks()

def test_failed_training_keeps_previous_state(trained):
    before = trained.get_mergeable_ranks()
    with pytest.raises(TypeError):
        trained.train_from_iterator(iter(["x", None]), 300)
    assert trained.get_mergeable_ranks() == before
