"""Chat with your model in the browser (GET /), or from any OpenAI client (/v1/chat/completions, /v1/completions,
/v1/models); GET /health and /stats tell how it is doing.
Usage: python -m scripts.chat_web  # the latest SFT model, at http://127.0.0.1:8000 (--num-gpus 8: a replica per GPU)"""
import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import queue
import random
import re
import threading
import time
import uuid
from pathlib import Path

import torch

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import HelpFormatter, autodetect_device_type, exit_on, logger, setup_logging
from nanochat.engine import MIN_TEMPERATURE, Engine, SamplingParams, add_sampling_args, sampling_from_args

UI_PATH = Path(__file__).resolve().parents[1] / "nanochat" / "ui.html"
# OpenAI's newer "developer" role is its system role under another name
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

def get_parser():
    p = argparse.ArgumentParser(description="Serve a nanochat model: web chat UI + OpenAI-compatible API",
                                formatter_class=HelpFormatter)
    add_checkpoint_args(p, "sft")
    add_sampling_args(p, temperature=0.8, max_tokens=1024)  # the defaults of requests that set none
    p.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (on CPU: copies on the CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch-size", type=int, default=32, help="most sequences one replica decodes together")
    p.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait for a replica before new ones get 503")
    # what one request may ask for, and send
    p.add_argument("--limit-max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--limit-top-k", type=int, default=200, help="largest top_k a request may ask for")
    p.add_argument("--max-messages", type=int, default=500, help="most messages in one chat request")
    p.add_argument("--max-message-chars", type=int, default=8000, help="most characters in one message")
    p.add_argument("--max-total-chars", type=int, default=32000, help="most characters in all messages of a request")
    p.add_argument("--max-body-bytes", type=int, default=2**20, help="largest request body, in bytes (413 past it)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds a client has to send its body (408 past it)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also serve Host: NAME, any port ('*': any host); loopback names and --host always are")
    p.add_argument("--model-name", default=None, help="model id reported by the API (default: nanochat-<source>-<tag>)")
    p.add_argument("--accept-any-model", action="store_true", help="answer requests naming any model (default: 404)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="server log level")
    return p

# -----------------------------------------------------------------------------
# Request validation. Everything a client sends is checked here, on the event loop, before it
# reaches a replica; a bad request gets a 400 naming the field, as OpenAI's API does.
class ErrorResponse(Exception):
    """Answer the request with this HTTP status and an OpenAI-style error body naming the faulty field."""
    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        # OpenAI's SDKs read "type" to tell a client's mistake (4xx) from the server's own failure
        kind = "server_error" if status >= 500 else "invalid_request_error"
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}

def _check(ok, message, param=None, status=400, code=None):
    if not ok:
        raise ErrorResponse(message, param, status, code)

def _number(body, name, default, low, high, integer=False, low_inclusive=True):
    if (value := body.get(name)) is None:
        return default
    # bool is an int in Python, but "temperature": true is a client bug, not 1
    kind_ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    _check(kind_ok, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    _check(low <= value <= high and (value != low or low_inclusive),  # NaN and +-Infinity (valid JSON here) fail too
           f"'{name}' must be in {'[' if low_inclusive else '('}{low}, {high}], got {value}", name)
    return value

def sampling_params(body, defaults, args, max_context):
    """(SamplingParams, stream, include_usage) from the knobs both endpoints share."""
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    _check(temperature == 0 or temperature >= MIN_TEMPERATURE,  # logits / 1e-300 overflow: greedy in all but name
           f"'temperature' must be 0 or at least {MIN_TEMPERATURE}; use 0 for greedy decoding", "temperature")
    # top_p = 0 would keep no token at all: its range is open at 0
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, low_inclusive=False)
    top_k = _number(body, "top_k", defaults.top_k, 0, args.limit_top_k, integer=True) or None  # 0 = off
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"  # the newer name wins
    # None when the request sets none: its default depends on the room its prompt leaves, known once tokenized
    max_tokens = _number(body, name, None, 1, min(args.limit_max_tokens, max_context), integer=True)
    # any 64-bit integer, as OpenAI's API takes
    seed = _number(body, "seed", None, -2**63, 2**63 - 1, integer=True)
    # OpenAI's own limits: a string or up to 4 of them
    stop = [] if (stop := body.get("stop")) is None else [stop] if isinstance(stop, str) else stop
    _check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop),
           "'stop' must be a string or a list of at most 4 non-empty strings (200 chars max)", "stop")
    _check(body.get("n", 1) == 1, "only n=1 is supported", "n")
    _check(not body.get("logprobs"), "logprobs are not supported", "logprobs")
    _check(isinstance(body.get("stream", False), bool), "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    _check(isinstance(options, dict), "'stream_options' must be an object", "stream_options")
    # no seed: a fresh random one, so that repeated requests give different samples
    params = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                            seed=random.randrange(2**31) if seed is None else seed, stop=tuple(stop))
    return params, body.get("stream", False), bool(options.get("include_usage"))

def chat_conversation(body, args):
    """The OpenAI `messages` list -> nanochat conversation dict (validated, limited)."""
    messages = body.get("messages")
    _check(isinstance(messages, list) and messages, "'messages' must be a non-empty list", "messages")
    _check(len(messages) <= args.max_messages, f"too many messages: {len(messages)} (at most {args.max_messages})",
           "messages")
    # the model's one tool is its calculator, run by the engine; it cannot call functions a client defines
    _check(not body.get("tools") and not body.get("functions"), "client-side tools/functions are not supported", "tools")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        _check(isinstance(message, dict), f"{param} must be an object", param)
        role, content = message.get("role"), message.get("content")  # role: a str first, ROLES.get([]) is a TypeError
        _check(isinstance(role, str) and role in ROLES, f"'{param}.role' must be one of {sorted(ROLES)}, got {role!r:.40}",
               f"{param}.role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            _check(all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content), f"{param}.content: only text parts are supported", f"{param}.content")
            content = "".join(part["text"] for part in content)
        _check(isinstance(content, str), f"{param}.content must be a string", f"{param}.content")
        _check(len(content) <= args.max_message_chars,
               f"{param}.content is {len(content)} characters (at most {args.max_message_chars})", f"{param}.content")
        out.append({"role": ROLES[role], "content": content})
    # messages each within their own limit can still add up to too much for one prompt
    total = sum(len(m["content"]) for m in out)
    _check(total <= args.max_total_chars, f"the messages total {total} characters (at most {args.max_total_chars})",
           "messages")
    # the reply continues the conversation: with an assistant turn last there is nothing to answer
    _check(out[-1]["role"] == "user", "the last message must be from the user", f"messages[{len(out) - 1}].role")
    return {"messages": out}

def completion_prompt(body, args):
    """The `prompt` of a /v1/completions request: one string (a list holding one is accepted, as OpenAI does)."""
    prompt = prompt[0] if isinstance(prompt := body.get("prompt"), list) and len(prompt) == 1 else prompt
    _check(isinstance(prompt, str), "'prompt' must be a string (batches of prompts are not supported)", "prompt")
    _check(len(prompt) <= args.max_total_chars, f"'prompt' is {len(prompt)} characters (at most {args.max_total_chars})",
           "prompt")
    return prompt

# -----------------------------------------------------------------------------
# The replica pool. Every replica (one model copy per GPU) has a worker thread that owns a BatchDecoder. Validated,
# tokenized requests (Jobs) wait on one shared queue: an idle replica takes one at once, a busy one pulls waiting
# requests into its running batch between decode steps (up to --max-batch-size rows), so concurrent users are
# decoded together, not one after another.
class Job:
    def __init__(self, tokens, params, loop):
        self.tokens, self.params, self.loop = tokens, params, loop
        # what the worker reports: ("text", str)..., then ("done", finish_reason, completion_tokens) or ("error", message)
        self.events = asyncio.Queue()
        self.cancelled = False  # set on the event loop when the client went away, read by the worker
    def emit(self, *event):
        # asyncio queues are not thread-safe: the put runs on the event loop's own thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

class Replica:
    """A model copy and the thread that decodes all of its requests in one continuous batch."""
    def __init__(self, index, engine, pool):
        self.index, self.engine, self.pool = index, engine, pool
        self.decoder = engine.decoder(max_batch_size=pool.max_batch_size)
        # peak_rows: the largest batch this replica has decoded at once
        self.busy, self.peak_rows, self.requests_served, self.tokens_generated = False, 0, 0, 0
        self.thread = threading.Thread(target=self.run, name=f"replica-{index}", daemon=True)
    def admit(self, job):
        if job is None or job.cancelled:  # None: the pool is stopping
            return
        try:
            self.decoder.add(job.tokens, job.params, request=job)
        except Exception as e:  # e.g. a prompt that does not fit: fail this request only
            logger.exception("replica %d: could not start a request", self.index)
            job.emit("error", f"could not start generation: {e}")
    def run(self):
        pool = self.pool
        while not pool.stopping:
            # nothing to decode: wait on the queue (busy=False: the busy replicas leave new requests to this one)
            if self.decoder.num_rows == 0:
                self.busy = False
                job = pool.pending.get()
                self.busy = True
                self.admit(job)
            # join waiting requests into the running batch, unless an idle replica can take them
            while self.decoder.has_room() and not any(not r.busy for r in pool.replicas if r is not self):
                try:
                    self.admit(pool.pending.get_nowait())
                except queue.Empty:
                    break
            # a client that disconnected leaves the batch now, before it costs another step
            for row in [row for row in self.decoder.rows + self.decoder.joining if row.request.cancelled]:
                self.decoder.cancel(row)
            self.peak_rows = max(self.peak_rows, self.decoder.num_rows)
            try:
                outputs = self.decoder.step()
            except Exception as e:  # never let one bad step kill the replica: fail its batch, go on
                logger.exception("replica %d: decode step failed", self.index)
                for row in self.decoder.rows + self.decoder.joining:
                    row.request.emit("error", f"generation failed: {e}")
                self.decoder = self.engine.decoder(max_batch_size=pool.max_batch_size)
                continue
            # count first, then tell the clients: whoever reads /stats after a reply sees it counted
            self.tokens_generated += len(outputs)
            self.requests_served += sum(bool(row.finish_reason) for row, _ in outputs)
            for row, text in outputs:
                if text:
                    row.request.emit("text", text)
                if row.finish_reason == "error":  # this request only: the rest of the batch goes on
                    row.request.emit("error", row.error)
                elif row.finish_reason:
                    row.request.emit("done", row.finish_reason, len(row.tokens))

class WorkerPool:
    def __init__(self, engines, max_batch_size, max_queue):
        self.max_batch_size, self.pending = max_batch_size, queue.Queue(maxsize=max_queue)
        self.stopping, self.started = False, time.time()
        self.replicas = [Replica(i, engine, self) for i, engine in enumerate(engines)]
        for replica in self.replicas:
            replica.thread.start()
    def submit(self, job):
        # a bounded queue: past --max-queue a request fails fast, rather than wait ever longer
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise ErrorResponse("the server is overloaded: too many requests waiting, retry later", status=503) from None
    def stop(self):
        self.stopping = True
        # one None per replica: each worker blocked in get() wakes up and sees `stopping`
        for _ in self.replicas:
            with contextlib.suppress(queue.Full):
                self.pending.put_nowait(None)
    def stats(self):
        # read without a lock from the replicas' threads: a snapshot, as good as monitoring needs
        replicas = [{"index": r.index, "device": str(r.engine.device), "busy": r.busy, "active_rows": r.decoder.num_rows,
                     "peak_rows": r.peak_rows, "requests_served": r.requests_served,
                     "tokens_generated": r.tokens_generated} for r in self.replicas]
        return {"uptime_s": round(time.time() - self.started, 1), "queue_depth": self.pending.qsize(),
                "requests_served": sum(r["requests_served"] for r in replicas),
                "tokens_generated": sum(r["tokens_generated"] for r in replicas), "replicas": replicas}

# -----------------------------------------------------------------------------
# The app: tokens go from each request's Job to its client as they come, streamed (SSE) or whole
def create_app(pool, tokenizer, model_name, args, max_context):
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.requests import ClientDisconnect
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.stop()  # at shutdown: the replica threads stop taking requests
    async def internal_error(request, exc):
        # the traceback goes to the log; the client learns nothing of the server's internals
        logger.exception("unhandled error")
        return JSONResponse(ErrorResponse("internal server error", status=500).body, status_code=500)
    # against DNS rebinding (its pages send their own name as Host), served with any port: loopback, --host, --allowed-host
    hosts = {"127.0.0.1", "localhost", "[::1]", args.host.lower(), *(h.lower() for h in args.allowed_host)} - {"0.0.0.0", "::"}
    def check_host(request: Request):
        host = request.headers.get("host", "").lower()
        _check("*" in hosts or re.sub(r":\d*$", "", host) in hosts,
               f"Host {host!r:.80} is not served here (DNS rebinding?); see --allowed-host", status=421)
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, lifespan=lifespan, dependencies=[Depends(check_host)],
                  exception_handlers={ErrorResponse: lambda _, e: JSONResponse(e.body, e.status), Exception: internal_error})
    created, defaults = int(time.time()), sampling_from_args(args)
    def usage(prompt, completion):
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
    async def read_body(request):
        # JSON only: a cross-site page may POST text/plain or a form without asking first (CSRF), but not JSON
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        _check(kind == "application/json", "the request's Content-Type must be application/json", status=415)
        body = bytearray()
        async for part in request.stream():  # counted as it comes: a chunked body has no Content-Length
            body.extend(part)
            _check(len(body) <= args.max_body_bytes, f"the request body is over {args.max_body_bytes} bytes", status=413)
        return body
    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request):  # Request: FastAPI passes it to a parameter annotated so
        """Validate, run and answer one request, as OpenAI's chat.completion or text_completion objects."""
        chat = request.url.path.endswith("/chat/completions")
        try:  # a client that stalls mid-body would hold its connection forever
            body = json.loads(await asyncio.wait_for(read_body(request), args.request_timeout))
        except asyncio.TimeoutError:
            raise ErrorResponse(f"the request body did not arrive within {args.request_timeout:g} s", status=408) from None
        except ClientDisconnect:  # a client hanging up is routine: one line in the log, not a traceback
            logger.info("client went away: while sending its request")
            raise ErrorResponse("client disconnected", status=499) from None
        except (ValueError, RecursionError) as e:  # RecursionError: [[[[... nested 100k deep
            raise ErrorResponse(f"the request body is not valid JSON: {e}") from None
        _check(isinstance(body, dict), "the request body must be a JSON object")
        # a client that asks for another model must not take this one's replies for that model's (OpenAI: a 404)
        _check(body.get("model") in (None, model_name) or args.accept_any_model, f"the model {body.get('model')!r:.80} "
               f"does not exist: this server serves {model_name!r} (see --accept-any-model)", "model", 404, "model_not_found")
        # validated in this order: the prompt, then the sampling knobs, then the prompt's tokens
        prompt = chat_conversation(body, args) if chat else completion_prompt(body, args)
        params, streaming, include_usage = sampling_params(body, defaults, args, max_context)
        try:
            tokens = tokenizer.render_for_completion(prompt) if chat else tokenizer.encode(prompt, prepend="<|bos|>")
        except ValueError as e:  # e.g. roles that do not alternate
            raise ErrorResponse(str(e), "messages") from None
        # max_context: the sequence_len the model was trained on, not its 10x rotary table; prompt and reply must fit in it
        _check(len(tokens) + (params.max_tokens or 1) <= max_context, f"the prompt ({len(tokens)} tokens) + max_tokens "
               f"({params.max_tokens or 'not set'}) do not fit this model's context of {max_context} tokens", "messages")
        # no max_tokens: the server's default (16 on /v1/completions, as OpenAI's), cut to the room the prompt leaves
        params.max_tokens = params.max_tokens or min(args.max_tokens if chat else 16, max_context - len(tokens))
        pool.submit(job := Job(tokens, params, asyncio.get_running_loop()))
        # one id for the whole completion: every chunk of a stream carries it
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model_name}
        def choice(text, finish_reason):
            if chat and streaming:  # a chat stream opens with the role, then content deltas, then {} to finish
                out = {"delta": {} if text is None else {"content": text} if text else {"role": "assistant", "content": ""}}
            else:
                out = {"message": {"role": "assistant", "content": text}} if chat else {"text": text or ""}
            return {"index": 0, **out, "logprobs": None, "finish_reason": finish_reason}
        def chunk(text, finish_reason):
            return dict(head, object=head["object"] + ".chunk" if chat else head["object"],
                        choices=[choice(text, finish_reason)], **({"usage": None} if include_usage else {}))
        async def events():
            try:
                if chat:
                    yield sse(chunk("", None))
                while (event := await job.events.get())[0] == "text":
                    yield sse(chunk(event[1], None))
                if event[0] == "error":
                    yield sse(ErrorResponse(event[1], status=500).body)
                else:
                    yield sse(chunk(None, event[1]))
                    if include_usage:  # one last chunk with no choices, only the usage
                        yield sse(dict(chunk(None, None), choices=[], usage=usage(len(tokens), event[2])))
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):  # the client hung up mid-stream
                logger.info("client went away: %s mid-stream", head["id"])
                raise
            finally:
                job.cancelled = True  # a no-op when finished; when the client went away, its row leaves the batch
        # no-cache and X-Accel-Buffering: no, so that proxies (nginx) pass every chunk on at once
        if streaming:
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []  # the whole completion, cancelled if the client goes away meanwhile
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:  # nothing for a second: look at the client all the same
                event = ("text", "")
            if await request.is_disconnected():  # at every token: a reply nobody waits for stops at once
                job.cancelled = True
                logger.info("client went away: %s before its reply was done", head["id"])
                raise ErrorResponse("client disconnected", status=499)
            if event[0] == "error":
                raise ErrorResponse(event[1], status=500)
            if event[0] == "done":
                return dict(head, choices=[choice("".join(parts), event[1])], usage=usage(len(tokens), event[2]))
            parts.append(event[1])
    # The page is one file: its inline <script> and <style> run by hash, not 'unsafe-inline', so injected markup runs
    # nothing; it fetches from this origin only; no site may frame it. uvicorn sends these with every response, 500s too
    page = UI_PATH.read_text(encoding="utf-8")
    inline = {tag: " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
                            for block in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)) for tag in ("script", "style")}
    app.state.security_headers = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), (
        "Content-Security-Policy", f"default-src 'self'; script-src {inline['script']}; style-src {inline['style']}; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")]
    app.get("/")(lambda: HTMLResponse(page))
    app.get("/health")(lambda: {"status": "ok", "model": model_name, "replicas": len(pool.replicas)})
    app.get("/stats")(lambda: dict(pool.stats(), model=model_name))
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                               "owned_by": "nanochat", "context_length": max_context}]})
    return app

def load_engines(args):
    """One Engine per replica, each on its own GPU; also the tokenizer and the checkpoint's meta."""
    device_type = args.device or autodetect_device_type()
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise SystemExit(f"--num-gpus {args.num_gpus}, but only {torch.cuda.device_count()} CUDA devices are visible")
    # a whole model copy per device: replicas share nothing, so each decodes on its own
    devices = [torch.device("cuda", i) if device_type == "cuda" else torch.device(device_type) for i in range(args.num_gpus)]
    with exit_on(FileNotFoundError, ValueError):  # ValueError: e.g. a LoRA adapter that does not fit its base
        loaded = [load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step) for device in devices]
    return [Engine(model, tokenizer) for model, tokenizer, _ in loaded], loaded[0][1], loaded[0][2]

def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    sampling_from_args(args)  # checks the sampling flags
    # the server's own defaults must pass the limits it holds requests to
    if min(args.num_gpus, args.max_batch_size, args.max_queue) < 1 or args.top_k > args.limit_top_k:
        raise SystemExit(f"error: --num-gpus, --max-batch-size, --max-queue must be >= 1, --top-k <= {args.limit_top_k}")
    engines, tokenizer, meta = load_engines(args)
    model_name = args.model_name or f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    pool = WorkerPool(engines, args.max_batch_size, args.max_queue)
    app = create_app(pool, tokenizer, model_name, args, engines[0].model.config.sequence_len)
    logger.info("serving %s (step %s) on %d replica(s) at http://%s:%d", model_name, meta.get("step"),
                len(engines), args.host, args.port)
    import uvicorn  # only now: --help and bad flags do not pay for importing the server
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, headers=app.state.security_headers)

if __name__ == "__main__":
    main()
