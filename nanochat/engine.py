"""
Inference: turn a trained GPT into a stream of tokens and text, fast.

- KV cache: the prompt is run through the model once (batch 1), then each new token costs one
  forward of length 1 that reads the cached keys/values instead of recomputing the prefix.
  num_samples continuations of one prompt share that single prefill.
- Continuous batching: a BatchDecoder holds many unrelated sequences (different prompts,
  lengths, sampling settings) in one RaggedKVCache where every row sits at its own position;
  each step decodes one token for all of them in a single forward. Rows join (after their own
  prefill) and leave (finished, stopped, cancelled) between steps. The chat server runs one per
  model replica; Engine.generate* are thin wrappers around it.
- Sampling: temperature / top-k / top-p, each row with its own seeded torch.Generator, so a
  request's output does not depend on what else happens to be in the batch.
- Tool use: when the model writes <|python_start|>expr<|python_end|>, the calculator
  evaluates expr and <|output_start|>result<|output_end|> is forced into the stream (those
  tokens are marked not-sampled, mask 0), then generation continues.
- Text: TextStream turns tokens into text chunks that never split a UTF-8 character and end
  cleanly at user stop strings.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=2, max_tokens=64): ...
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8)
    for chunk in engine.generate_text(prompt_ids, max_tokens=64): print(chunk, end="")
"""
import ast
import codecs
import math
import operator
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import autocast_ctx
from nanochat.gpt import KVCache

# -----------------------------------------------------------------------------
# The calculator tool: a tiny evaluator over a whitelisted subset of Python expressions
# (arithmetic on numbers, a few string methods). It walks the AST itself, never calls eval(),
# so nothing outside the whitelist can run; sizes are capped so "9**9**9" cannot hang it.

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
               ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "len": len, "int": int, "float": float}
_STRING_METHODS = {"count", "find", "index", "rfind", "startswith", "endswith", "upper", "lower",
                   "strip", "lstrip", "rstrip", "replace", "split", "join", "isdigit", "isalpha"}
MAX_CALC_EXPR_CHARS = 200
MAX_CALC_VALUE_CHARS = 1000


class _CalculatorError(Exception):
    pass


def _check_size(value):
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * MAX_CALC_VALUE_CHARS:
        raise _CalculatorError("number too large")
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_CALC_VALUE_CHARS:
        raise _CalculatorError("value too large")
    return value


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return _check_size(node.value)
    if isinstance(node, (ast.List, ast.Tuple)):
        return _check_size([_evaluate(elt) for elt in node.elts])
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 1000:
            raise _CalculatorError("exponent too large")
        if isinstance(node.op, ast.Mod) and isinstance(left, str):  # '%0999999999d' % 1 formats a huge string
            raise _CalculatorError("string formatting is not allowed")
        if isinstance(node.op, ast.Mult):  # "ab" * 10**9 would be built before any size check
            seq, count = (left, right) if isinstance(left, (str, list)) else (right, left)
            if isinstance(seq, (str, list)) and isinstance(count, int) and count * len(seq) > MAX_CALC_VALUE_CHARS:
                raise _CalculatorError("value too large")
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_evaluate(arg) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _check_size(_FUNCTIONS[node.func.id](*args))
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_METHODS:
            target = _evaluate(node.func.value)
            if isinstance(target, str):
                return _check_size(getattr(target, node.func.attr)(*args))
    raise _CalculatorError(f"not allowed: {ast.dump(node)[:60]}")


def format_calculator_value(value):
    """How a result is written back into the stream: 48/2 -> "24" (GSM8K style), 1/3 -> "0.3333333333"."""
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def use_calculator(expr):
    """Evaluate a tool-call expression; the result as text, or None if it is not allowed/fails."""
    expr = expr.strip()
    if not expr or len(expr) > MAX_CALC_EXPR_CHARS:
        return None
    try:
        value = _evaluate(ast.parse(expr, mode="eval"))
    except (_CalculatorError, SyntaxError, ArithmeticError, ValueError, TypeError, IndexError, RecursionError):
        return None
    return format_calculator_value(value)


# -----------------------------------------------------------------------------
# Sampling

@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_k: int | None = None      # keep the k most likely tokens (None = all)
    top_p: float | None = None    # keep the smallest set of tokens with this much probability mass
    max_tokens: int | None = None  # per row, counting forced tool tokens; None = up to the context limit
    seed: int = 42                # row i of a request samples with its own generator seeded seed + i
    stop: tuple = ()              # stop strings: generation ends when the text contains one (not included)


def sample_token(logits, params, rng):
    """One token id from a (V,) row of logits. The order of operations (top-k on raw logits,
    then softmax(logits / T), then multinomial) matches GPT.generate, the naive reference."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.clone()
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits / params.temperature, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs[None], num_samples=1, generator=rng))


# -----------------------------------------------------------------------------
# Tokens -> text, safely chunked

class TextStream:
    """
    Feed token ids one at a time, get back the text that is safe to show:
    - bytes of an incomplete UTF-8 character are held back until it completes (tokens are
      byte sequences and often cut a character in two);
    - text that might be the beginning of a stop string is held back until it is clearly not;
      once a stop string appears, it and everything after it are dropped and `stopped` is set;
    - special tokens show as `display[id]` ("" when absent), e.g. tool calls as <<expr=result>>.
    The chunks concatenate to exactly the decoded text (cut at the first stop string).
    """

    def __init__(self, token_bytes, stop=(), display=None):
        self.token_bytes = token_bytes  # id -> bytes
        self.stop = tuple(s for s in stop if s)
        self.display = display or {}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet released (could be the start of a stop string)
        self.stopped = False

    def push(self, token_id):
        if self.stopped:
            return ""
        if token_id in self.display:
            piece = self.decoder.decode(self.display[token_id].encode("utf-8"))
        else:
            piece = self.decoder.decode(self.token_bytes(token_id))
        self.pending += piece
        return self._release()

    def _release(self):
        if self.stop:
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i != -1]
            if hits:
                text, self.pending, self.stopped = self.pending[:min(hits)], "", True
                return text
            hold = 0  # the longest tail of pending that is a proper prefix of some stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                    if self.pending.endswith(s[:k]):
                        hold = k
                        break
            cut = len(self.pending) - hold
            text, self.pending = self.pending[:cut], self.pending[cut:]
            return text
        text, self.pending = self.pending, ""
        return text

    def flush(self):
        """The rest, at the end of generation (a dangling partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        text = self._release()
        if not self.stopped:
            text, self.pending = text + self.pending, ""
        return text


# -----------------------------------------------------------------------------
# A KV cache for a batch of unrelated sequences

class RaggedKVCache:
    """
    Keys/values of a batch where row b holds its own sequence of lengths[b] tokens (a different
    prompt, started at a different time). Storage (layers, 2, rows, kv_heads, time, head_dim),
    row b at time 0..lengths[b]-1. get_pos() is a (rows,) tensor: GPT.forward then places row b's
    new tokens at its own positions (rotary) and masks every key past them, so the padding
    between a short row's end and the longest row's end is never attended to.
    Rows are appended from a prefilled batch-1 KVCache and removed by moving the last row into
    the hole, so the live rows are always 0..n-1 and the forward never carries dead rows.
    Storage starts zeroed, never torch.empty: masked keys get attention weight 0, but 0 * NaN
    garbage in a padding value would still be NaN.
    """

    TIME_CHUNK = 256

    def __init__(self, num_layers, num_heads, head_dim):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.kv = None
        self.lengths = []  # host copy, for sizes without a device sync
        self.pos = None    # device copy, for GPT.forward

    def __len__(self):
        return len(self.lengths)

    def get_pos(self):
        return self.pos

    def _reserve(self, rows, time, like):
        if self.kv is None:
            shape = (self.num_layers, 2, max(rows, 1), self.num_heads, -(-time // self.TIME_CHUNK) * self.TIME_CHUNK, self.head_dim)
            self.kv = torch.zeros(shape, device=like.device, dtype=like.dtype)
            return
        _, _, have_rows, _, have_time, _ = self.kv.shape
        if rows <= have_rows and time <= have_time:
            return
        new_rows = max(rows, have_rows if rows <= have_rows else 2 * have_rows)
        new_time = max(have_time, -(-time // self.TIME_CHUNK) * self.TIME_CHUNK)
        bigger = torch.zeros((self.num_layers, 2, new_rows, self.num_heads, new_time, self.head_dim),
                             device=self.kv.device, dtype=self.kv.dtype)
        n, t = len(self.lengths), max(self.lengths, default=0)
        bigger[:, :, :n, :, :t] = self.kv[:, :, :n, :, :t]
        self.kv = bigger

    def _sync_pos(self, device):
        self.pos = torch.tensor(self.lengths, dtype=torch.long, device=device)

    def add_row(self, source, source_row=0):
        """Append a copy of row `source_row` of a (prefilled) KVCache or RaggedKVCache."""
        if isinstance(source, RaggedKVCache):
            length, src = source.lengths[source_row], source.kv
        else:
            length, src = source.get_pos(), source.kv
        if src.size(0) != self.num_layers or src.size(3) != self.num_heads or src.size(5) != self.head_dim:
            raise ValueError(f"RaggedKVCache.add_row: source cache has shape {tuple(src.shape)}, expected "
                             f"{self.num_layers} layers, {self.num_heads} heads, head_dim {self.head_dim}")
        n = len(self.lengths)
        self._reserve(n + 1, length, src)
        self.kv[:, :, n, :, :length] = src[:, :, source_row, :, :length]
        self.lengths.append(length)
        self._sync_pos(self.kv.device)

    def remove_row(self, i):
        """Drop row i; the last row moves into its place (callers mirror this in their lists)."""
        last = len(self.lengths) - 1
        if i != last:
            length = self.lengths[last]
            self.kv[:, :, i, :, :length] = self.kv[:, :, last, :, :length]
            self.lengths[i] = length
        self.lengths.pop()
        self._sync_pos(self.kv.device)

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (rows, heads, T, head_dim) at each row's own position; return all keys/values
        up to the longest row (GPT.forward's mask hides each row's padding)."""
        B, _, T, _ = k.shape
        num_keys = max(self.lengths) + T
        self._reserve(B, num_keys, k)
        rows = torch.arange(B, device=k.device)[:, None]
        times = self.pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
        layer = self.kv[layer_idx]
        layer[0][rows, :, times] = k.transpose(1, 2).to(layer.dtype)  # advanced indices first: (B, T, H, D)
        layer[1][rows, :, times] = v.transpose(1, 2).to(layer.dtype)
        if layer_idx == self.num_layers - 1:
            self.lengths = [n + T for n in self.lengths]
            self.pos = self.pos + T
        return layer[0, :B, :, :num_keys], layer[1, :B, :, :num_keys]


# -----------------------------------------------------------------------------
# One sequence being generated

@dataclass(eq=False)
class Row:
    request: object               # whatever the caller passed to BatchDecoder.add (the server's request)
    index: int                    # which of the request's num_samples this is
    prompt_len: int
    params: SamplingParams
    rng: torch.Generator | None
    text: TextStream
    max_tokens: int
    tokens: list = field(default_factory=list)  # generated ids, forced tool tokens included
    masks: list = field(default_factory=list)   # 1 = sampled, 0 = forced
    forced: deque = field(default_factory=deque)
    python_tokens: list | None = None  # collecting an expression between python_start/end
    last_token: int | None = None      # the newest token, fed to the model at the next step
    finish_reason: str | None = None   # "stop" (end token or stop string), "length", "cancelled"
    first_logits: torch.Tensor | None = None  # from the prefill, until the first token is drawn
    prefill_cache: KVCache | None = None

    @property
    def finished(self):
        return self.finish_reason is not None


@dataclass
class StepOutput:
    row: Row
    token: int
    sampled: bool   # False for tool output forced in by the engine
    text: str       # newly releasable text (may be "")
    finished: bool  # this was the row's last token


class BatchDecoder:
    """
    Continuous batching over one model. add() prefills a prompt and queues its rows; each step()
    produces exactly one token for every live row (the first token of a new row comes from its
    prefill logits, the others from one batched forward), then drops the rows that finished.
    """

    def __init__(self, engine, max_batch_size=None):
        self.engine = engine
        self.max_batch_size = max_batch_size
        cfg = engine.model.config
        self.cache = RaggedKVCache(cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head)
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
        engine = self.engine
        params = params or SamplingParams()
        if not tokens:
            raise ValueError("the prompt is empty (it should at least start with <|bos|>)")
        room = engine.max_context - len(tokens)
        if room < 1:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context is {engine.max_context}")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        cfg = engine.model.config
        cache = KVCache(1, cfg.n_kv_head, len(tokens), cfg.n_embd // cfg.n_head, cfg.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=engine.device)
        with autocast_ctx(engine.device.type):
            logits = engine.model(ids, kv_cache=cache)[0, -1]
        rows = []
        for i in range(num_samples):
            rng = None
            if params.temperature > 0:
                rng = torch.Generator(device=engine.device)
                rng.manual_seed(params.seed + i)
            row = Row(request=request, index=i, prompt_len=len(tokens), params=params, rng=rng,
                      text=engine.text_stream(params.stop), max_tokens=max_tokens,
                      first_logits=logits, prefill_cache=cache)
            rows.append(row)
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
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last

    @torch.inference_mode()
    def step(self):
        """One token for every live row -> list of StepOutput (empty when nothing is live)."""
        engine = self.engine
        logits = None
        if self.rows:
            ids = torch.tensor([[row.last_token] for row in self.rows], dtype=torch.long, device=engine.device)
            with autocast_ctx(engine.device.type):
                logits = engine.model(ids, kv_cache=self.cache)[:, -1]
        outputs = []
        # greedy rows: one argmax and one device->host copy for all of them, not one per row
        greedy = None
        if any(row.params.temperature == 0.0 for row in self.rows):
            greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(self.rows):
            outputs.append(self._advance(row, logits[i], None if greedy is None else greedy[i]))
        for row in self.joining:
            outputs.append(self._advance(row, row.first_logits))
            if not row.finished:
                self.cache.add_row(row.prefill_cache)
                self.rows.append(row)
            row.first_logits = row.prefill_cache = None
        self.joining = []
        for i in reversed(range(len(self.rows))):
            if self.rows[i].finished:
                self._remove(i)
        return outputs

    def _advance(self, row, logits, argmax=None):
        engine = self.engine
        if row.forced:
            token, sampled = row.forced.popleft(), False
        elif row.params.temperature == 0.0 and argmax is not None:
            token, sampled = argmax, True
        else:
            token, sampled = sample_token(logits, row.params, row.rng), True
        row.tokens.append(token)
        row.masks.append(int(sampled))
        row.last_token = token
        text = row.text.push(token)
        if token in engine.end_tokens:
            row.finish_reason = "stop"
        elif engine.use_tools:
            self._tool_state(row, token)
        if row.text.stopped:
            row.finish_reason = "stop"
        elif not row.finished and len(row.tokens) >= row.max_tokens:
            row.finish_reason = "length"
        if row.finished:
            text += row.text.flush()
        return StepOutput(row, token, sampled, text, row.finished)

    def _tool_state(self, row, token):
        engine = self.engine
        if token == engine.python_start:
            row.python_tokens = []
        elif token == engine.python_end and row.python_tokens is not None:
            result = use_calculator(engine.tokenizer.decode(row.python_tokens))
            row.python_tokens = None
            if result is not None:
                row.forced.extend([engine.output_start, *engine.tokenizer.encode(result), engine.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)


# -----------------------------------------------------------------------------
# The engine

class Engine:
    """Generation on one model. Not thread-safe: give each worker thread its own BatchDecoder."""

    def __init__(self, model, tokenizer, use_tools=True):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        # positions past the rotary table cannot be encoded; that is the hard context limit
        self.max_context = getattr(model, "rotary_seq_len", model.config.sequence_len)

        def special(name):
            try:
                return tokenizer.encode_special(name)
            except (ValueError, KeyError):
                return None
        self.end_tokens = {t for t in (special("<|assistant_end|>"), tokenizer.get_bos_token_id()) if t is not None}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.use_tools = use_tools and None not in (self.python_start, self.python_end, self.output_start, self.output_end)
        # how special tokens read in text: tool calls as <<expr=result>> (GSM8K's calculator notation)
        self.display = {tokenizer.encode_special(name): "" for name in tokenizer.get_special_tokens()}
        if self.use_tools:
            self.display.update({self.python_start: "<<", self.python_end: "=", self.output_start: "", self.output_end: ">>"})

    def text_stream(self, stop=()):
        return TextStream(self.tokenizer.enc.decode_single_token_bytes, stop=stop, display=self.display)

    def decoder(self, max_batch_size=None):
        return BatchDecoder(self, max_batch_size)

    @staticmethod
    def _params(max_tokens, temperature, top_k, top_p, seed, stop):
        if isinstance(stop, str):
            stop = (stop,)
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                              seed=seed, stop=tuple(stop or ()))

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 seed=42, stop=None):
        """
        Stream num_samples continuations of `tokens` (a list of ids). Yields, per step,
        (token_column, token_masks): one id per sample and 1 if it was sampled, 0 if forced
        (tool output). A sample that has finished yields None (mask 0) while others continue.
        A sample ends after <|assistant_end|> or <|bos|> (which is yielded), a stop string,
        or max_tokens.
        """
        decoder = self.decoder()
        rows = decoder.add(tokens, self._params(max_tokens, temperature, top_k, top_p, seed, stop), num_samples)
        while decoder.num_rows:
            emitted = {out.row.index: out for out in decoder.step()}
            yield ([emitted[i].token if i in emitted else None for i in range(len(rows))],
                   [int(emitted[i].sampled) if i in emitted else 0 for i in range(len(rows))])

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: (results, masks), each a list of num_samples lists: the prompt followed by
        the generated ids, without the final <|assistant_end|>/<|bos|>; masks 0 on the prompt and
        on forced tool output, 1 on sampled tokens."""
        (results, masks), = self.generate_multi([tokens], num_samples=num_samples, **kwargs)
        return results, masks

    def generate_multi(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                       seed=42, stop=None, max_batch_size=None):
        """Several prompts (of any lengths) decoded together in one batch. Returns, per prompt,
        (results, masks) as generate_batch does."""
        params = self._params(max_tokens, temperature, top_k, top_p, seed, stop)
        if max_batch_size is not None and max_batch_size < num_samples:
            raise ValueError(f"max_batch_size={max_batch_size} cannot hold num_samples={num_samples} rows")
        decoder = self.decoder(max_batch_size)
        all_rows, waiting = [], list(enumerate(prompts))
        while waiting or decoder.num_rows:
            while waiting and decoder.has_room(num_samples):
                j, prompt = waiting.pop(0)
                all_rows.append(decoder.add(prompt, params, num_samples, request=j))
            decoder.step()
        out = []
        for prompt, rows in zip(prompts, all_rows):
            results, masks = [], []
            for row in rows:
                ids, mask = row.tokens, row.masks
                if ids and ids[-1] in self.end_tokens:
                    ids, mask = ids[:-1], mask[:-1]
                results.append(list(prompt) + ids)
                masks.append([0] * len(prompt) + mask)
            out.append((results, masks))
        return out

    def generate_text(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42, stop=None):
        """Stream one continuation as text chunks (each a whole number of characters; tool calls
        shown as <<expr=result>>; cut before the first stop string)."""
        decoder = self.decoder()
        decoder.add(tokens, self._params(max_tokens, temperature, top_k, top_p, seed, stop))
        while decoder.num_rows:
            for out in decoder.step():
                if out.text:
                    yield out.text
