"""
The tokenizer: BPE ranks trained by `rustbpe` (our Rust trainer), served by `tiktoken` (fast,
batched, thread-parallel encoding), plus the special tokens that structure documents and
conversations, and the rendering of a conversation into (ids, loss mask) for chat training.

On disk ($NANOCHAT_BASE_DIR/tokenizer/):
    ranks.tiktoken     one "base64(token bytes) rank" per line (tiktoken's own file format)
    tokenizer.json     {"pattern": ..., "special_tokens": {name: id}}
    token_bytes.pt     bytes per token id (0 for specials), for bits-per-byte; written by tok_train
"""
import base64
import json
import os

import tiktoken

from nanochat.common import get_base_dir

# GPT-4's split pattern, except numbers split in runs of 1-2 digits (not 1-3): with a small
# vocabulary, spending ids on every 3-digit number is a poor trade.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call inside an assistant turn
    "<|output_start|>", "<|output_end|>",  # the tool's result, forced into the stream
]

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """A tiktoken Encoding built from trained BPE ranks plus nanochat's special tokens."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")

    # -- construction / persistence -------------------------------------------------------

    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        """mergeable_ranks: dict bytes -> rank (ranks 0..N-1); specials get ids N, N+1, ..."""
        ranks = dict(mergeable_ranks)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("mergeable ranks must be exactly 0..N-1 with no gaps")
        offset = len(ranks)
        specials = {name: offset + i for i, name in enumerate(special_tokens)}
        enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=None, buffer_size=8192):
        """Train BPE on an iterator of str. vocab_size includes the special tokens."""
        import rustbpe
        merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        if merges_vocab < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, merges_vocab, buffer_size=buffer_size, pattern=pattern)
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        return cls.from_ranks(ranks, pattern=trainer.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir):
        config_path = os.path.join(tokenizer_dir, "tokenizer.json")
        ranks_path = os.path.join(tokenizer_dir, "ranks.tiktoken")
        if not (os.path.exists(config_path) and os.path.exists(ranks_path)):
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (expected tokenizer.json and "
                                    f"ranks.tiktoken): train one with `python -m scripts.tok_train`")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        ranks = {}
        with open(ranks_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    token_b64, rank = line.split()
                    ranks[base64.b64decode(token_b64)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{ranks_path}:{lineno}: malformed rank line ({e})") from None
        specials = sorted(config["special_tokens"], key=config["special_tokens"].get)
        return cls.from_ranks(ranks, pattern=config["pattern"], special_tokens=specials)

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A stock tiktoken encoding ("gpt2", "cl100k_base") — used for comparisons only."""
        return cls.__new__(cls)._init_stock(tiktoken.get_encoding(tiktoken_name))

    def _init_stock(self, enc):
        self.enc = enc
        self.bos_token_id = enc.eot_token
        return self

    def save(self, tokenizer_dir):
        """Write ranks + config atomically (tmp then rename), so a crash never leaves half a tokenizer."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        lines = [base64.b64encode(tok).decode("ascii") + f" {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
        config = {"pattern": self.enc._pat_str, "special_tokens": self.enc._special_tokens}
        for name, payload in [("ranks.tiktoken", "".join(lines)), ("tokenizer.json", json.dumps(config, indent=2))]:
            path = os.path.join(tokenizer_dir, name)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(payload)
            os.replace(path + ".tmp", path)

    # -- vocabulary -----------------------------------------------------------------------

    def get_vocab_size(self):
        return self.enc.n_vocab

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, text):
        try:
            return self.enc._special_tokens[text]
        except KeyError:
            raise ValueError(f"unknown special token {text!r}; known: {sorted(self.enc._special_tokens)}") from None

    def id_to_token(self, token_id):
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self):
        """Number of UTF-8 bytes each id stands for (0 for specials), from the raw token bytes.
        Never by decoding to str: many tokens are partial UTF-8 sequences and decode lossily."""
        sizes = [0] * self.vocab_size
        for tok, rank in self.enc._mergeable_ranks.items():
            sizes[rank] = len(tok)
        return sizes

    # -- encode / decode ------------------------------------------------------------------

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else token

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a str (-> list[int]) or a list of str (-> list[list[int]], batched on threads).
        Special-token text inside `text` is treated as ordinary text, never as a special token."""
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if pre or post:
                batch = [pre + ids + post for ids in batch]
            return batch
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    # -- conversations --------------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Conversation -> (ids, mask). mask[i] = 1 where the model is trained to produce ids[i]:
        the assistant's text, its tool calls and <|assistant_end|> (else it never learns to
        stop); 0 for <|bos|>, user/system text, <|assistant_start|> and tool outputs (those are
        forced in by the engine at inference). A system message is folded into the first user turn.
        """
        messages = validate_conversation(conversation)
        if messages[0]["role"] == "system":
            first_user = dict(messages[1])
            first_user["content"] = messages[0]["content"] + "\n\n" + first_user["content"]
            messages = [first_user] + messages[2:]

        ids, mask = [], []

        def add(token_ids, supervised):
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([int(supervised)] * len(token_ids))

        special = self.encode_special
        add(self.bos_token_id, 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(self.encode(part["text"]), 1)
                    add(special("<|python_end|>"), 1)
                else:  # python_output: produced by the tool, not by the model
                    add(special("<|output_start|>"), 0)
                    add(self.encode(part["text"]), 0)
                    add(special("<|output_end|>"), 0)
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Ids that prime the model for the next assistant reply: the conversation without its
        final assistant message (if any), followed by <|assistant_start|>."""
        messages = list(conversation["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=10**9)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize(self, ids, mask=None, color=True):
        """A readable rendering for debugging: tokens separated by '|', supervised ones in green
        (or wrapped in [[ ]] when color=False)."""
        mask = mask if mask is not None else [0] * len(ids)
        out = []
        for token_id, m in zip(ids, mask):
            text = self.enc.decode([token_id], errors="replace").replace("\n", "\\n")
            if m:
                text = f"\033[92m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
        return "|".join(out)


def validate_conversation(conversation):
    """Check roles and contents; return the message list. Raises ValueError saying what is wrong."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("conversation must be a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    first = messages[0]
    start = 1 if isinstance(first, dict) and first.get("role") == "system" else 0
    if start == 1 and len(messages) == 1:
        raise ValueError("conversation has only a system message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {ROLES})")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}].role: a system message may only come first")
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"messages[{i}].role: expected {expected!r} (turns alternate user/assistant, "
                                 f"starting with user), got {role!r}")
        content = message.get("content")
        if role == "assistant" and isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: expected {{'type': one of {PART_TYPES}, 'text': str}}")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
    return messages


# -----------------------------------------------------------------------------
# The project's trained tokenizer

def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    import torch
    path = os.path.join(get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m scripts.tok_train` first")
    with open(path, "rb") as f:
        return torch.load(f, map_location=device)
