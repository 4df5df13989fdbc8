"""nanochat.tokenizer: save/load, encode/decode, token_bytes, conversation rendering and masks."""
import random

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1234, 56789))\n",
    "Größe, naïve café — ünïcödé text. 東京は日本の首都です。 Привет, мир! 🙂🚀",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
] * 20
# plus enough distinct words that 200 merges are always available
_rng = random.Random(1)
TEXTS += [" ".join("".join(_rng.choice("etaoinshrdlu") for _ in range(_rng.randint(2, 9))) for _ in range(50))
          for _ in range(40)]

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(TEXTS), vocab_size=256 + len(SPECIAL_TOKENS) + 200)

def random_unicode(rng, n):
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x300, 0x36F), (0x10000, 0x1000F)]
    chars = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            chars.append(rng.choice(["\n", "\r\n", "\t", "  ", "0123456789"]))
        else:
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)

def test_vocab_and_specials(tok):
    assert tok.get_vocab_size() == 256 + 200 + len(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == 256 + 200
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(456, 456 + len(SPECIAL_TOKENS)))
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")

def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 80))
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        # token_bytes comes from raw bytes, so it must add up exactly to the UTF-8 length
        sizes = tok.token_bytes()
        assert sum(sizes[i] for i in ids) == len(s.encode("utf-8"))

def test_special_text_is_not_special(tok):
    ids = tok.encode("<|bos|> hi")
    assert tok.get_bos_token_id() not in ids
    assert tok.decode(ids) == "<|bos|> hi"

def test_batch_prepend_append(tok):
    texts = ["hello world", "", "Größe 123"]
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    for text, ids in zip(texts, batch):
        assert ids == [tok.get_bos_token_id()] + tok.encode(text) + [tok.encode_special("<|assistant_end|>")]
    with pytest.raises(TypeError):
        tok.encode(123)

def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_directory(tmp_path)
    s = "It was the best of times 1234 🙂"
    assert again.encode(s) == tok.encode(s)
    assert again.get_vocab_size() == tok.get_vocab_size()
    assert again.token_bytes() == tok.token_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.from_directory(tmp_path / "missing")

def test_vocab_too_small():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_from_iterator(iter(TEXTS), vocab_size=260)

def test_render_conversation_masks_exactly(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conversation)
    S = tok.encode_special
    E = tok.encode
    expected = [
        ([tok.get_bos_token_id()], 0),
        ([S("<|user_start|>")] + E("Be brief.\n\nWhat is 2+3?") + [S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0),
        (E("Let me compute."), 1),
        ([S("<|python_start|>")] + E("2+3") + [S("<|python_end|>")], 1),
        ([S("<|output_start|>")] + E("5") + [S("<|output_end|>")], 0),
        (E("It is 5."), 1),
        ([S("<|assistant_end|>")], 1),
        ([S("<|user_start|>")] + E("Thanks") + [S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0),
        (E("You're welcome."), 1),
        ([S("<|assistant_end|>")], 1),
    ]
    exp_ids = [i for chunk, _ in expected for i in chunk]
    exp_mask = [m for chunk, m in expected for _ in chunk]
    assert ids == exp_ids
    assert mask == exp_mask
    # truncation keeps ids and mask aligned
    ids8, mask8 = tok.render_conversation(conversation, max_tokens=8)
    assert ids8 == exp_ids[:8] and mask8 == exp_mask[:8]

def test_render_for_completion(tok):
    conversation = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]}
    ids = tok.render_for_completion(conversation)
    S = tok.encode_special
    assert ids == [tok.get_bos_token_id(), S("<|user_start|>")] + tok.encode("Hi") + [S("<|user_end|>"), S("<|assistant_start|>")]

@pytest.mark.parametrize("messages, match", [
    ([], "empty message list"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "robot", "content": "a"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\]\.role: expected 'assistant', got 'system'"),
    ([{"role": "user", "content": None}], "content: expected a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "html", "text": "x"}]}], r"content\[0\]"),
    ([{"role": "system", "content": "a"}], "only a system message"),
])
def test_invalid_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})

def test_a_chat_with_an_empty_reply_still_renders(tok):
    # a reply stopped at once (or that ended at once) is part of the chat the next turn sends
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                                                      {"role": "user", "content": "hello?"}]})
    assert sum(mask) == 1 and ids[-1] == tok.encode_special("<|user_end|>")  # only the empty reply's <|assistant_end|>

def test_tok_eval_table_shows_file_names_whole(tok, base_dir, tmp_path, capsys):
    """scripts/tok_eval on files whose names agree on their first 12 characters (and two that share a name in
    different folders): every row shows its file as typed, whole, and the columns stay aligned."""
    from scripts import tok_eval
    tok.save(str(base_dir / "tokenizer"))
    paths = [tmp_path / "a" / "my_domain_corpus_train.txt", tmp_path / "b" / "my_domain_corpus_train.txt",
             tmp_path / "a" / "my_domain_corpus_valid.txt"]
    for i, path in enumerate(paths):
        path.parent.mkdir(exist_ok=True)
        path.write_text(TEXTS[i] * (i + 1), encoding="utf-8")
    capsys.readouterr()
    # --no-stock: tiktoken would download GPT-2 / GPT-4 (offline here)
    ratios = tok_eval.main([arg for path in paths for arg in ("--text-file", str(path))] + ["--no-stock"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("text "))
    rows = [line for line in lines if line.startswith(str(tmp_path))]
    assert [row.split()[0] for row in rows] == [str(path) for path in paths]
    assert len({row.split()[1] for row in rows}) == 3, "three files of different sizes, three rows of their own"
    # aligned: every row (and the pooled one) as long as the header, its numbers right under the header's
    table = lines[lines.index(header):]
    assert all(len(line) == len(header) for line in table if line.strip("-"))
    assert table[-1].startswith("all ") and float(table[-1].split()[-1]) == pytest.approx(ratios["ours"], abs=0.01)
