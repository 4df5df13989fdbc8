"""Inference: a trained GPT as a stream of tokens and text (KV cache, continuous batching, sampling, tool use).
Usage: results, masks = Engine(model, tokenizer).generate_batch(prompt_ids, num_samples=4, max_tokens=64)"""
import ast
import codecs
import operator
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import autocast_ctx

# -----------------------------------------------------------------------------
# The calculator tool. The model writes <|python_start|>expr<|python_end|>; the engine evaluates expr and forces
# <|output_start|>result<|output_end|> into the stream. expr is never given to eval(): we walk its AST over a
# whitelist (arithmetic, a few string methods), so nothing else can run. It runs on the decode thread, between two
# tokens of every row in the batch, so no operation may be slow: each size is checked *before* the operation that
# would build it, and a wall-clock budget is checked before each node ("9**9**9", "'a' * 10**9", "round(1, -10**9)").
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_CALC_EXPR_CHARS, MAX_CALC_VALUE_CHARS, MAX_CALC_SECONDS = 200, 1000, 0.05

def _round(x, ndigits=None):  # round(1, -10**9) would compute 10**(10**9) first
    if ndigits is not None and not (isinstance(ndigits, int) and abs(ndigits) <= 100):
        raise ValueError("too many digits")
    return round(x, ndigits)

_FUNCTIONS = {"abs": abs, "round": _round, "min": min, "max": max, "len": len, "int": int, "float": float}
_STRING_METHODS = {"count", "find", "index", "rfind", "startswith", "endswith", "upper", "lower",
                   "strip", "lstrip", "rstrip", "replace", "split", "join", "isdigit", "isalpha"}

def _size(value):
    """About how many characters str(value) takes, counted through nested lists, stopping past the limit."""
    if isinstance(value, int):
        return value.bit_length() // 3  # 3 bits per digit is generous (a digit is 3.3 bits)
    total = len(value) if isinstance(value, (str, list, tuple)) else 0
    # the items of [['a'*1000]*1000]*1000 are shared: its str() is 1 GB, built from 8 kB of lists
    for item in value if isinstance(value, (list, tuple)) else ():
        if (total := total + _size(item)) > MAX_CALC_VALUE_CHARS:
            break
    return total

def _check_size(value):
    if _size(value) > MAX_CALC_VALUE_CHARS:
        raise ValueError("too large")
    return value

def _evaluate(node, deadline):
    if time.monotonic() > deadline:
        raise ValueError("too slow")
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return _check_size(node.value)
    if isinstance(node, (ast.List, ast.Tuple)):
        return _check_size([_evaluate(elt, deadline) for elt in node.elts])
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, deadline), _evaluate(node.right, deadline)
        seq, count = (left, right) if isinstance(left, (str, list)) else (right, left)
        # refused before they run, as the result would be built before any size check
        if (isinstance(node.op, ast.Pow) and isinstance(right, (int, float))
                and (abs(right) > 1000 or isinstance(left, int) and left.bit_length() * right > 3 * MAX_CALC_VALUE_CHARS)
                or isinstance(node.op, ast.Mod) and isinstance(left, str)  # '%0999999999d' % 1
                or isinstance(node.op, ast.Mult) and isinstance(seq, (str, list)) and isinstance(count, int)
                and count * _size(seq) > MAX_CALC_VALUE_CHARS):  # "ab" * 10**9, [[1] * 999] * 999
            raise ValueError("too large")
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_evaluate(arg, deadline) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _check_size(_FUNCTIONS[node.func.id](*args))
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_METHODS:
            if isinstance(target := _evaluate(node.func.value, deadline), str):
                return _check_size(getattr(target, node.func.attr)(*args))
    raise ValueError("not allowed")

def use_calculator(expr):
    """The value of a tool-call expression as text, or None when it is refused or fails."""
    if len(expr.strip()) > MAX_CALC_EXPR_CHARS:
        return None
    try:
        value = _evaluate(ast.parse(expr.strip(), mode="eval").body, time.monotonic() + MAX_CALC_SECONDS)
    except (SyntaxError, ArithmeticError, ValueError, TypeError, IndexError, RecursionError):
        return None
    if isinstance(value, float):
        # 48/2 -> "24", as GSM8K writes its answers; other floats to 10 significant digits
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.10g}"
    return str(value)

# -----------------------------------------------------------------------------
# Sampling. Every row has its own seeded torch.Generator: a request's output does not depend on what shares its batch.
MIN_TEMPERATURE = 1e-3  # anything lower samples greedily (see sample_token)

@dataclass
class SamplingParams:
    temperature: float = 1.0       # 0 = greedy
    top_k: int | None = None       # keep the k most likely tokens (None = all)
    top_p: float | None = None     # keep the smallest set of tokens with this much probability mass
    max_tokens: int | None = None  # per row, counting forced tool tokens; None = up to the context limit
    seed: int = 42                 # row i of a request samples with its own generator seeded seed + i
    stop: tuple | str = ()         # stop string(s): generation ends when the text contains one (not included)

def add_sampling_args(parser, temperature, max_tokens):
    """The sampling flags of chat_cli and chat_web (the server's defaults for requests that set none)."""
    parser.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per reply")

def sampling_from_args(args, seed=42):
    """SamplingParams from add_sampling_args' flags; SystemExit when one is out of range."""
    if not args.temperature >= 0 or args.top_k < 0 or args.max_tokens < 1 or not (args.top_p is None or 0 < args.top_p <= 1):
        raise SystemExit("error: need --temperature >= 0, --top-k >= 0, --max-tokens >= 1, --top-p in (0, 1]")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          max_tokens=args.max_tokens, seed=seed)

def sample_token(logits, params, rng):
    """One token id from a (V,) row of logits, in the order of GPT.generate (the reference)."""
    # below 1e-3 sampling is greedy in all but name, and logits / 1e-300 overflow to inf, then NaN
    if params.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    if params.top_k is not None and params.top_k < logits.size(-1):
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], -float("inf"))
    probs = F.softmax(logits / params.temperature, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (so the first always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        drop[0] = False  # even when top_p rounds to 0 in fp32 (1e-300)
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs[None], num_samples=1, generator=rng))

# -----------------------------------------------------------------------------
# Tokens -> text that is safe to show
class TextStream:
    """Token ids in, text out: the chunks add up to the decoded text, cut before the first stop string."""
    def __init__(self, token_bytes, stop=(), display=None):
        self.token_bytes = token_bytes  # id -> bytes
        self.stop = tuple(s for s in ((stop,) if isinstance(stop, str) else stop or ()) if s)
        self.display = display or {}  # how special tokens read: id -> text
        # tokens are byte strings that often cut a character in two: hold its bytes until it is whole
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not released yet: it could be the start of a stop string
        self.stopped = False
    def push(self, token_id):
        if self.stopped:
            return ""
        piece = self.display[token_id].encode() if token_id in self.display else self.token_bytes(token_id)
        self.pending += self.decoder.decode(piece)
        return self._release()
    def _release(self):
        if hits := [i for i in (self.pending.find(s) for s in self.stop) if i != -1]:
            text, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return text
        # hold back the longest tail that could still grow into a stop string, release the rest
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text
    def flush(self):
        """The rest, at the end of generation (a dangling partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        # what was held back for a stop string that never came goes out too
        text, self.pending = self._release() + self.pending, ""
        return text

# -----------------------------------------------------------------------------
# KV caches. A prompt is run through the model once (its prefill); after that each new token costs one forward of
# length 1 that reads the cached keys/values instead of the whole prefix. GPT.forward asks its cache get_pos() and
# insert_kv(); a (rows,) tensor from get_pos() tells it every row sits at its own position.
class _Prefill(list):
    """One prompt's keys/values, per layer (k, v), each (1, kv_heads, T, head_dim), from its single forward."""
    logits = None  # at the prompt's last position: the first token is drawn from them
    def get_pos(self):
        return 0  # an int: the forward takes its plain causal path, as in training
    def insert_kv(self, layer_idx, k, v):
        self.append((k, v))
        return k, v

class RaggedKVCache:
    """Keys/values of unrelated sequences in one batch, row b at its own length lengths[b]."""
    # rows join from a prefill and leave by the last row moving into their place: a forward never carries dead rows
    TIME_CHUNK = 256
    def __init__(self):
        self.kv = None     # (layers, 2, rows, kv_heads, time, head_dim), shaped by the first prefill
        self.lengths = []  # host copy, for sizes without a device sync
        self.pos = None    # device copy, for GPT.forward
    def get_pos(self):
        return self.pos
    def _reserve(self, rows, time):
        layers, _, have_rows, heads, have_time, head_dim = self.kv.shape
        if rows > have_rows or time > have_time:
            # rows double and time grows in whole chunks, so a long run reallocates (and copies) rarely
            rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
            time = max(have_time, -(-time // self.TIME_CHUNK) * self.TIME_CHUNK)
            # zeros, not torch.empty: a masked key gets weight 0, but 0 * NaN garbage in padding is still NaN
            bigger = self.kv.new_zeros((layers, 2, rows, heads, time, head_dim))
            n, t = len(self.lengths), max(self.lengths, default=0)
            bigger[:, :, :n, :, :t] = self.kv[:, :, :n, :, :t]
            self.kv = bigger
    def add_row(self, prefill):
        n, (_, heads, T, head_dim) = len(self.lengths), prefill[0][0].shape
        if self.kv is None:  # the device and dtype of the model's keys (bf16 under autocast)
            self.kv = prefill[0][0].new_zeros((len(prefill), 2, 0, heads, 0, head_dim))
        self._reserve(n + 1, T)
        for layer, (k, v) in enumerate(prefill):
            self.kv[layer, 0, n, :, :T], self.kv[layer, 1, n, :, :T] = k[0], v[0]
        self.lengths.append(T)
        self.pos = torch.tensor(self.lengths, dtype=torch.long, device=self.kv.device)
    def remove_row(self, i):
        """Drop row i; the last row moves into its place (callers mirror this in their lists)."""
        last = self.lengths.pop()
        if i < len(self.lengths):
            self.kv[:, :, i, :, :last] = self.kv[:, :, len(self.lengths), :, :last]
            self.lengths[i] = last
        self.pos = torch.tensor(self.lengths, dtype=torch.long, device=self.kv.device)
    def insert_kv(self, layer_idx, k, v):
        """Write k, v (rows, heads, T, head_dim) at each row's own position; return all up to the longest row."""
        # GPT.forward masks the padding between a row's end and the longest row's
        B, _, T, _ = k.shape
        num_keys = max(self.lengths) + T
        self._reserve(B, num_keys)
        rows = torch.arange(B, device=k.device)[:, None]
        times = self.pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
        layer = self.kv[layer_idx]
        # advanced indices first: the indexed slots are (B, T, heads, head_dim)
        layer[0][rows, :, times] = k.transpose(1, 2).to(layer.dtype)
        layer[1][rows, :, times] = v.transpose(1, 2).to(layer.dtype)
        if layer_idx == self.kv.size(0) - 1:  # every layer of this forward saw the same positions
            self.lengths = [n + T for n in self.lengths]
            self.pos = self.pos + T
        return layer[0, :B, :, :num_keys], layer[1, :B, :, :num_keys]

# -----------------------------------------------------------------------------
# Continuous batching. A BatchDecoder holds many unrelated sequences (prompts, lengths, sampling settings) in one
# RaggedKVCache; each step decodes one token for all of them in one forward. Rows join (after their own prefill) and
# leave (finished, stopped, cancelled) between steps. The chat server runs one per replica; Engine.generate_* wrap it.
@dataclass(eq=False)
class Row:
    request: object               # whatever the caller passed to BatchDecoder.add (the server's request)
    index: int                    # which of the request's num_samples this is
    params: SamplingParams
    rng: torch.Generator | None
    text: TextStream
    max_tokens: int
    prefill: _Prefill | None  # until the row joins the batch
    tokens: list = field(default_factory=list)  # generated ids, forced tool tokens included
    masks: list = field(default_factory=list)   # 1 = sampled, 0 = forced
    forced: deque = field(default_factory=deque)
    python_tokens: list | None = None  # the expression being written between python_start/end
    finish_reason: str | None = None   # "stop" (end token or stop string), "length", "cancelled", "error"
    error: str | None = None           # what went wrong, for finish_reason "error"

class BatchDecoder:
    """Continuous batching over one model: add() prompts at any time, step() until num_rows is 0."""
    def __init__(self, engine, max_batch_size=None):
        self.engine, self.max_batch_size, self.cache = engine, max_batch_size, RaggedKVCache()
        self.rows = []     # live rows, in cache order
        self.joining = []  # prefilled rows waiting for their first token
    @property
    def num_rows(self):
        return len(self.rows) + len(self.joining)
    def has_room(self, n=1):
        return self.max_batch_size is None or self.num_rows + n <= self.max_batch_size
    @torch.inference_mode()
    def add(self, tokens, params=None, num_samples=1, request=None):
        """Prefill `tokens` once and queue num_samples rows continuing it; returns the rows."""
        engine, params = self.engine, params or SamplingParams()
        room = engine.max_context - len(tokens)
        if not tokens or room < 1:  # a prompt holds at least <|bos|>
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context is {engine.max_context}")
        prefill = _Prefill()
        with autocast_ctx(engine.device.type):
            prefill.logits = engine.model(torch.tensor([tokens], device=engine.device), kv_cache=prefill)[0, -1]
        rows, max_tokens = [], room if params.max_tokens is None else min(params.max_tokens, room)
        for i in range(num_samples):
            rng = torch.Generator(engine.device).manual_seed(params.seed + i) if params.temperature > 0 else None
            text = TextStream(engine.tokenizer.enc.decode_single_token_bytes, params.stop, engine.display)
            rows.append(Row(request, i, params, rng, text, max_tokens, prefill))
        self.joining.extend(rows)
        return rows
    @torch.inference_mode()
    def cancel(self, row):
        """Stop a row now (e.g. its client went away); it leaves the batch at once."""
        row.finish_reason = row.finish_reason or "cancelled"
        if row in self.joining:
            self.joining.remove(row)
        elif row in self.rows:
            self._remove(self.rows.index(row))
    def _remove(self, i):
        self.cache.remove_row(i)
        self.rows[i] = self.rows[-1]  # as the cache did
        self.rows.pop()
    @torch.inference_mode()
    def step(self):
        """One token for every live row -> [(row, newly releasable text)]; the token is row.tokens[-1]."""
        outputs = []
        if self.rows:
            ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.engine.device)
            with autocast_ctx(self.engine.device.type):
                logits = self.engine.model(ids, kv_cache=self.cache)[:, -1]
            # greedy rows: one argmax and one device->host copy for all of them, not a sync per row
            greedy = logits.argmax(dim=-1).tolist() if any(r.params.temperature == 0 for r in self.rows) else None
            outputs = [self._advance(row, logits[i], greedy[i] if row.params.temperature == 0 else None)
                       for i, row in enumerate(self.rows)]
        # new rows draw their first token from their prefill's logits, then join the batch
        for row in self.joining:
            outputs.append(self._advance(row, row.prefill.logits))
            self.cache.add_row(row.prefill)  # one that has already finished leaves below, with the others
            row.prefill = None
        self.rows, self.joining = self.rows + self.joining, []
        for i in reversed(range(len(self.rows))):
            if self.rows[i].finish_reason:
                self._remove(i)
        return outputs
    def _advance(self, row, logits, argmax=None):
        engine = self.engine
        if row.forced:
            token, sampled = row.forced.popleft(), 0
        else:
            try:
                token, sampled = (sample_token(logits, row.params, row.rng) if argmax is None else argmax), 1
            except RuntimeError as e:  # this row's request fails; the other rows of the batch go on
                row.finish_reason, row.error = "error", f"sampling failed: {e}"
                return row, ""
        row.tokens.append(token)
        row.masks.append(sampled)
        text = row.text.push(token)
        if token in engine.end_tokens or row.text.stopped:
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.max_tokens:
            row.finish_reason = "length"
        elif token == engine.python_start and engine.use_tools:
            row.python_tokens = []
        elif token == engine.python_end and row.python_tokens is not None:
            result, row.python_tokens = use_calculator(engine.tokenizer.decode(row.python_tokens)), None
            if result is not None:  # forced in as the next tokens, marked not sampled
                row.forced.extend([engine.output_start, *engine.tokenizer.encode(result), engine.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)
        if row.finish_reason:
            text += row.text.flush()
        return row, text

# -----------------------------------------------------------------------------
# The engine
class Engine:
    """Generation on one model (**sampling: SamplingParams fields). Not thread-safe: one decoder() per thread."""
    def __init__(self, model, tokenizer, use_tools=True):
        self.model, self.tokenizer, self.device, self.use_tools = model, tokenizer, model.get_device(), use_tools
        # positions past the rotary table cannot be encoded: that is the hard context limit
        self.max_context = getattr(model, "rotary_seq_len", model.config.sequence_len)
        special = tokenizer.encode_special
        self.end_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        # special tokens read as nothing in text, except tool calls: <<expr=result>> (GSM8K's calculator notation)
        tool_calls = {self.python_start: "<<", self.python_end: "=", self.output_end: ">>"} if use_tools else {}
        self.display = {special(name): "" for name in tokenizer.get_special_tokens()} | tool_calls
    def decoder(self, max_batch_size=None):
        return BatchDecoder(self, max_batch_size)
    def generate_batch(self, tokens, num_samples=1, **sampling):
        """(results, masks), one per sample: the prompt + generated ids, masks 0 on prompt and forced tokens."""
        return self.generate_multi([tokens], num_samples=num_samples, **sampling)[0]
    def generate_multi(self, prompts, num_samples=1, max_batch_size=None, **sampling):
        """Prompts of any lengths decoded together; per prompt, (results, masks) as generate_batch."""
        if max_batch_size is not None and max_batch_size < num_samples:
            raise ValueError(f"max_batch_size={max_batch_size} cannot hold num_samples={num_samples} rows")
        decoder, waiting, rows = self.decoder(max_batch_size), deque(prompts), []
        while waiting or decoder.num_rows:
            # a prompt joins as soon as all its samples fit, without waiting for the batch to drain
            while waiting and decoder.has_room(num_samples):
                rows.append(decoder.add(waiting.popleft(), SamplingParams(**sampling), num_samples))
            decoder.step()
        # each sample: the prompt, then what was generated less a final end token
        end = {r: len(r.tokens) - bool(r.tokens and r.tokens[-1] in self.end_tokens) for rs in rows for r in rs}
        return [([list(prompt) + r.tokens[:end[r]] for r in rs], [[0] * len(prompt) + r.masks[:end[r]] for r in rs])
                for prompt, rs in zip(prompts, rows)]
