"""The tokenizer: BPE trained by rustbpe (ours, in Rust), served by tiktoken; conversations rendered for training:
    ids, mask = get_tokenizer().render_conversation({"messages": [{"role": "user", "content": "hi"}, ...]})"""
import base64
import json
import os

import tiktoken
import torch

from nanochat.common import DataError, atomic_write, get_base_dir

# GPT-4's split pattern, except numbers split in runs of 1-2 digits (not 1-3): with a small
# vocabulary, spending ids on every 3-digit number is a poor trade.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# <|bos|> starts every document; inside an assistant turn, python_start/end wrap a tool call and
# output_start/end the tool's result, which the engine forces into the stream
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
ROLES, PART_TYPES = ("system", "user", "assistant"), ("text", "python", "python_output")

class Tokenizer:
    """A tiktoken Encoding built from trained BPE ranks plus nanochat's special tokens."""
    def __init__(self, enc: tiktoken.Encoding, bos_token_id=None):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>") if bos_token_id is None else bos_token_id
    # -- construction / persistence -------------------------------------------------------
    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        """mergeable_ranks: dict bytes -> rank (ranks 0..N-1); specials get ids N, N+1, ..."""
        ranks = dict(mergeable_ranks)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("mergeable ranks must be exactly 0..N-1 with no gaps")
        specials = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
        return cls(tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials))
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=None, buffer_size=8192):
        """Train BPE on an iterator of str. vocab_size includes the special tokens."""
        import rustbpe  # imported here: only tok_train trains, and the compiled extension is otherwise not needed
        if (merges_vocab := vocab_size - len(SPECIAL_TOKENS)) < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, merges_vocab, buffer_size=buffer_size, pattern=pattern)
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        return cls.from_ranks(ranks, pattern=trainer.get_pattern())
    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load what save() wrote: ranks.tiktoken ("base64(bytes) rank" lines) and tokenizer.json."""
        config_path, ranks_path = (os.path.join(tokenizer_dir, name) for name in ("tokenizer.json", "ranks.tiktoken"))
        if not (os.path.exists(config_path) and os.path.exists(ranks_path)):
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (expected tokenizer.json and "
                                    f"ranks.tiktoken): train one with `python -m scripts.tok_train`")
        ranks = {}
        with open(config_path, encoding="utf-8") as config_file, open(ranks_path, "rb") as ranks_file:
            config = json.load(config_file)
            for lineno, line in enumerate(ranks_file, 1):
                try:
                    token_b64, rank = line.split()
                    ranks[base64.b64decode(token_b64)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{ranks_path}:{lineno}: malformed rank line ({e})") from None
        # the specials in id order, so from_ranks gives them back the same ids
        specials = sorted(config["special_tokens"], key=config["special_tokens"].get)
        return cls.from_ranks(ranks, pattern=config["pattern"], special_tokens=specials)
    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A stock tiktoken encoding ("gpt2", "cl100k_base"), for comparisons only."""
        enc = tiktoken.get_encoding(tiktoken_name)
        # a stock encoding has no <|bos|>: its <|endoftext|> separates documents instead
        return cls(enc, bos_token_id=enc.eot_token)
    def save(self, tokenizer_dir):
        """Write ranks.tiktoken and tokenizer.json, each all or nothing."""
        by_rank = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in by_rank)
        config = {"pattern": self.enc._pat_str, "special_tokens": self.enc._special_tokens}
        atomic_write(os.path.join(tokenizer_dir, "ranks.tiktoken"), lines)
        atomic_write(os.path.join(tokenizer_dir, "tokenizer.json"), json.dumps(config, indent=2))
    # -- vocabulary, encode / decode ------------------------------------------------------
    def get_vocab_size(self):
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
    def token_bytes(self):
        """Number of UTF-8 bytes each id stands for (0 for specials), for bits per byte."""
        # from the raw token bytes, never by decoding: many tokens are partial UTF-8 and decode lossily
        sizes = {rank: len(tok) for tok, rank in self.enc._mergeable_ranks.items()}
        return [sizes.get(i, 0) for i in range(self.get_vocab_size())]
    def encode(self, text, prepend=None, append=None, num_threads=8):
        """A str -> list[int]; a list of str -> list[list[int]] (batched on threads)."""
        # prepend/append: a special token's name or an id
        pre, post = ([] if t is None else [self.encode_special(t) if isinstance(t, str) else t] for t in (prepend, append))
        # encode_ordinary: special-token text typed by a user ("<|bos|>") stays ordinary text
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [pre + ids + post for ids in batch] if pre or post else batch
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")
    # -- conversations --------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens=2048):
        """Conversation -> (ids, mask), mask 1 where the model is trained to produce the id."""
        # final_role=None: a prompt rendered for completion ends with the user; allow_empty: a chat may
        # hold an empty reply (stopped at once, or the model ended at once), and the next turn must render
        messages = check_messages(conversation.get("messages"), final_role=None, allow_empty=True)
        if messages[0]["role"] == "system":  # there are no system tokens: the system text opens the first user turn
            messages = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]
        ids, mask, special = [self.bos_token_id], [0], self.encode_special
        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([int(supervised)] * len(token_ids))
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([special("<|user_start|>")] + self.encode(content) + [special("<|user_end|>")], 0)
                continue
            # <|assistant_start|> is forced by the engine at inference, so it is not trained on
            add([special("<|assistant_start|>")], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add([special("<|python_start|>")] + self.encode(part["text"]) + [special("<|python_end|>")], 1)
                else:  # python_output: the tool's result, forced in by the engine, not the model's to predict
                    add([special("<|output_start|>")] + self.encode(part["text"]) + [special("<|output_end|>")], 0)
            add([special("<|assistant_end|>")], 1)  # trained on: without it the model never learns to stop
        return ids[:max_tokens], mask[:max_tokens]
    def render_for_completion(self, conversation):
        """Ids that prime the next assistant reply: the conversation (less a final reply) + <|assistant_start|>."""
        messages = conversation["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=10**9)
        return ids + [self.encode_special("<|assistant_start|>")]

# -----------------------------------------------------------------------------
# The one conversation validator: of the task records, gen_data's replies, and what is rendered
class RecordError(DataError):
    """What is wrong with one record; `field` says where inside it, e.g. 'messages[2].role'."""
    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

def check_messages(messages, field="messages", final_role="assistant", allow_empty=False):
    """Clean {"role", "content"} copies of a valid message list; else RecordError naming the field."""
    if not isinstance(messages, list):
        raise RecordError(field, f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RecordError(field, "empty message list")
    # an optional system message first, then user, assistant, user, ... (final_role: who must speak last)
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    clean = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(where, f"expected an object with role and content, got {type(message).__name__}")
        if (role := message.get("role")) not in ROLES:
            raise RecordError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if i >= start and role != (expected := "user" if (i - start) % 2 == 0 else "assistant"):
            raise RecordError(f"{where}.role", f"expected {expected!r}, got {role!r} (after an optional "
                              "first system message, turns alternate user/assistant starting with user)")
        content = _check_content(message.get("content"), role, f"{where}.content", allow_empty)
        clean.append({"role": role, "content": content})
    if len(clean) == start:
        raise RecordError(field, "only a system message, no conversation")
    if final_role is not None and clean[-1]["role"] != final_role:
        raise RecordError(f"{field}[{len(clean) - 1}].role",
                          f"the conversation must end with the {final_role}, got {clean[-1]['role']!r}")
    return clean

def _check_content(content, role, field, allow_empty):
    if isinstance(content, str):
        if not allow_empty and not content.strip():
            raise RecordError(field, "empty content")
        return content
    # only the assistant makes tool calls: a list of {"type": text|python|python_output, "text"} parts
    if role == "assistant" and isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise RecordError(f"{field}[{j}]", f"expected {{'type': one of {', '.join(PART_TYPES)}, 'text': str}}")
        # a reply of tool output only has nothing the model could learn to produce
        if not allow_empty and not any(part["text"].strip() for part in content if part["type"] != "python_output"):
            raise RecordError(field, "empty content (no text or code in any part)" if content else "empty list of parts")
        return [{"type": part["type"], "text": part["text"]} for part in content]
    allowed = "a string or a list of parts" if role == "assistant" else "a string"
    raise RecordError(field, f"expected {allowed}, got {type(content).__name__}")

# -----------------------------------------------------------------------------
# The project's trained tokenizer
def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")

def get_tokenizer():
    return Tokenizer.from_directory(get_tokenizer_dir())

def get_token_bytes(device="cpu"):
    """token_bytes.pt, written by tok_train, as a tensor on `device` (for bits per byte)."""
    path = os.path.join(get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m scripts.tok_train` first")
    return torch.load(path, map_location=device)
