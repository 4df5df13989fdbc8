"""
Chat with your model in the browser, or from any OpenAI client.

    python -m scripts.chat_web                     # the latest SFT model; open http://127.0.0.1:8000
    python -m scripts.chat_web --source base       # a base model: use /v1/completions
    python -m scripts.chat_web --num-gpus 8        # one replica per GPU

Endpoints:
    GET  /                      the chat page (nanochat/ui.html; it talks to the API below)
    POST /v1/chat/completions   OpenAI-compatible chat (stream with SSE or not; usage counts)
    POST /v1/completions        raw text continuation (base models)
    GET  /v1/models             the model being served
    GET  /health, GET /stats    liveness; requests served, tokens generated, queue, replicas

How requests are served: every replica (one model copy per GPU) has a worker thread that owns a
BatchDecoder (nanochat/engine.py). A request is validated and tokenized on the event loop, then
put on one shared queue; an idle replica takes it at once, a busy one pulls waiting requests into
its running batch between decode steps (up to --max-batch-size rows), so concurrent users are
decoded together rather than one after another. Tokens go back to each request's asyncio queue
and out to its client as they come. A client that disconnects is cancelled: its row leaves the
batch at the next step.
"""
import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
import uuid

import torch

from nanochat.common import autodetect_device_type, logger, setup_logging
from nanochat.engine import Engine, SamplingParams

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def get_parser():
    p = argparse.ArgumentParser(description="Serve a nanochat model: web chat UI + OpenAI-compatible API")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "dpo"], help="which training stage's checkpoints to serve")
    p.add_argument("--model-tag", default=None, help="checkpoint folder, e.g. d20, or d20_lora for a LoRA adapter "
                                                     "(merged into its base on load) (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="device type (default: autodetect)")
    p.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (on CPU: copies on the CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch-size", type=int, default=32, help="most sequences one replica decodes together")
    p.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait for a replica before new ones get 503")
    p.add_argument("--temperature", type=float, default=0.8, help="default temperature when a request sets none")
    p.add_argument("--top-k", type=int, default=50, help="default top-k when a request sets none (0 = off)")
    p.add_argument("--max-tokens", type=int, default=1024, help="default max_tokens for chat when a request sets none")
    p.add_argument("--limit-max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--limit-top-k", type=int, default=200, help="largest top_k a request may ask for")
    p.add_argument("--max-messages", type=int, default=500, help="most messages in one chat request")
    p.add_argument("--max-message-chars", type=int, default=8000, help="most characters in one message")
    p.add_argument("--max-total-chars", type=int, default=32000, help="most characters in all messages of a request")
    p.add_argument("--model-name", default=None, help="model id reported by the API (default: nanochat-<source>-<tag>)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="server log level")
    return p


# -----------------------------------------------------------------------------
# Errors and request validation. Everything a client sends is checked here, on the event loop,
# before it reaches a replica; a bad request gets a 400 naming the field, OpenAI-style.

class APIError(Exception):
    def __init__(self, status, message, param=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def _number(body, name, default, low, high, low_inclusive=True):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number", name)
    if value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise APIError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return value


def _integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def sampling_params(body, args, default_max_tokens):
    """The sampling knobs shared by both endpoints -> SamplingParams."""
    temperature = _number(body, "temperature", args.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", None, 0.0, 1.0, low_inclusive=False)
    top_k = _integer(body, "top_k", args.top_k or None, 0, args.limit_top_k) or None  # 0 = off
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer({name: max_tokens}, name, default_max_tokens, 1, args.limit_max_tokens)
    seed = _integer(body, "seed", None, -2**63, 2**63 - 1)
    seed = random.randrange(2**31) if seed is None else seed
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop):
        raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings (200 chars max)", "stop")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported", "logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    params = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                            seed=seed, stop=tuple(stop))
    return params, stream, bool(options.get("include_usage"))


def chat_conversation(body, args):
    """The OpenAI `messages` list -> nanochat conversation dict (validated, limited)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > args.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} (at most {args.max_messages})", "messages")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "client-side tools/functions are not supported", "tools")
    out, total = [], 0
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object", param)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise APIError(400, f"{param}.role must be one of {sorted(ROLES)}, got {message.get('role')!r}", f"{param}.role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise APIError(400, f"{param}.content: only text parts are supported", f"{param}.content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"{param}.content must be a string", f"{param}.content")
        if len(content) > args.max_message_chars:
            raise APIError(400, f"{param}.content is {len(content)} characters (at most {args.max_message_chars})",
                           f"{param}.content")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > args.max_total_chars:
        raise APIError(400, f"the messages total {total} characters (at most {args.max_total_chars})", "messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", f"messages[{len(out) - 1}].role")
    return {"messages": out}


# -----------------------------------------------------------------------------
# Work units and the replica pool

class Job:
    """One request on its way through a replica. The worker thread reports back through
    the asyncio queue `events` (thread-safe via call_soon_threadsafe):
    ("text", str), then ("done", finish_reason, completion_tokens) or ("error", message)."""

    def __init__(self, tokens, params, loop):
        self.tokens, self.params, self.loop = tokens, params, loop
        self.events = asyncio.Queue()
        self.cancelled = False
        self.created = time.time()

    def emit(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def cancel(self):
        self.cancelled = True


class Replica:
    """A model copy and the thread that decodes all of its requests in one continuous batch."""

    def __init__(self, index, engine, pool):
        self.index, self.engine, self.pool = index, engine, pool
        self.decoder = engine.decoder(max_batch_size=pool.max_batch_size)
        self.busy = False
        self.peak_rows = 0  # the largest batch this replica has decoded at once
        self.requests_served = 0
        self.tokens_generated = 0
        self.thread = threading.Thread(target=self.run, name=f"replica-{index}", daemon=True)

    @property
    def active_rows(self):
        return self.decoder.num_rows

    def admit(self, job):
        if job is None or job.cancelled:
            return
        try:
            self.decoder.add(job.tokens, job.params, request=job)
        except Exception as e:  # e.g. a prompt that does not fit: fail this request only
            logger.exception("replica %d: could not start a request", self.index)
            job.emit("error", f"could not start generation: {e}")

    def run(self):
        pool = self.pool
        while not pool.stopping:
            if self.decoder.num_rows == 0:
                self.busy = False
                job = pool.pending.get()
                self.busy = True
                self.admit(job)
            # join waiting requests into the running batch, unless an idle replica can take them
            while self.decoder.has_room() and not pool.idle_replica_exists(self):
                try:
                    self.admit(pool.pending.get_nowait())
                except queue.Empty:
                    break
            for row in self.decoder.rows + self.decoder.joining:
                if row.request.cancelled:
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
            self.requests_served += sum(out.finished for out in outputs)
            for out in outputs:
                job = out.row.request
                if out.text:
                    job.emit("text", out.text)
                if out.finished:
                    job.emit("done", out.row.finish_reason, len(out.row.tokens))


class WorkerPool:
    def __init__(self, engines, max_batch_size, max_queue):
        self.max_batch_size = max_batch_size
        self.pending = queue.Queue(maxsize=max_queue)
        self.stopping = False
        self.replicas = [Replica(i, engine, self) for i, engine in enumerate(engines)]
        self.started = time.time()
        for replica in self.replicas:
            replica.thread.start()

    def idle_replica_exists(self, asking):
        return any(not r.busy for r in self.replicas if r is not asking)

    def submit(self, job):
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is overloaded: too many requests waiting, retry later",
                           type_="server_error") from None

    def stop(self):
        self.stopping = True
        for _ in self.replicas:
            try:
                self.pending.put_nowait(None)  # wake blocked workers
            except queue.Full:
                pass

    def stats(self):
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests_served": sum(r.requests_served for r in self.replicas),
            "tokens_generated": sum(r.tokens_generated for r in self.replicas),
            "queue_depth": self.pending.qsize(),
            "replicas": [{"index": r.index, "device": str(r.engine.device), "busy": r.busy,
                          "active_rows": r.active_rows, "peak_rows": r.peak_rows, "requests_served": r.requests_served,
                          "tokens_generated": r.tokens_generated} for r in self.replicas],
        }


# -----------------------------------------------------------------------------
# The app

def create_app(pool, tokenizer, model_name, args, max_context):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.stop()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, lifespan=lifespan)
    created = int(time.time())
    bos = tokenizer.get_bos_token_id()

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error", type_="server_error").body(), status_code=500)

    async def read_json(request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_length(tokens):
        if len(tokens) >= max_context:
            raise APIError(400, f"the prompt is {len(tokens)} tokens; this model's context is {max_context}", "messages")

    def start(tokens, params):
        job = Job(tokens, params, asyncio.get_running_loop())
        pool.submit(job)
        return job

    async def collect(job, request):
        """Wait for a whole completion; cancel it if the client goes away meanwhile."""
        parts = []
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise APIError(499, "client disconnected")
                continue
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise APIError(500, event[1], type_="server_error")
            else:
                return "".join(parts), event[1], event[2]

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream(job, make_chunk, include_usage, prompt_tokens, first_delta=None):
        async def events():
            try:
                if first_delta is not None:
                    yield sse(make_chunk(first_delta, None))
                while True:
                    event = await job.events.get()
                    if event[0] == "text":
                        yield sse(make_chunk(event[1], None))
                    elif event[0] == "error":
                        yield sse(APIError(500, event[1], type_="server_error").body())
                        break
                    else:
                        _, finish_reason, completion_tokens = event
                        yield sse(make_chunk(None, finish_reason))
                        if include_usage:
                            final = make_chunk(None, None)
                            final["choices"] = []
                            final["usage"] = usage(prompt_tokens, completion_tokens)
                            yield sse(final)
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a no-op when finished; frees the row when the client went away
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(prompt_tokens, completion_tokens):
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.get("/")
    async def ui():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "replicas": len(pool.replicas)}

    @app.get("/stats")
    async def stats():
        return dict(pool.stats(), model=model_name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanochat", "context_length": max_context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        conversation = chat_conversation(body, args)
        params, streaming, include_usage = sampling_params(body, args, args.max_tokens)
        try:
            tokens = tokenizer.render_for_completion(conversation)
        except ValueError as e:  # e.g. roles that do not alternate
            raise APIError(400, str(e), "messages") from None
        check_length(tokens)
        job = start(tokens, params)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if streaming:
            def chunk(content, finish_reason):
                delta = {} if content is None else ({"role": "assistant", "content": ""} if content == "" else {"content": content})
                obj = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
                if include_usage:
                    obj["usage"] = None
                return obj
            return stream(job, chunk, include_usage, len(tokens), first_delta="")

        text, finish_reason, completion_tokens = await collect(job, request)
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage(len(tokens), completion_tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (batches of prompts are not supported)", "prompt")
        if len(prompt) > args.max_total_chars:
            raise APIError(400, f"'prompt' is {len(prompt)} characters (at most {args.max_total_chars})", "prompt")
        params, streaming, include_usage = sampling_params(body, args, 16)  # 16: OpenAI's default
        tokens = [bos] + tokenizer.encode(prompt)
        check_length(tokens)
        job = start(tokens, params)
        completion_id, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if streaming:
            def chunk(text, finish_reason):
                obj = {"id": completion_id, "object": "text_completion", "created": now, "model": model_name,
                       "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
                if include_usage:
                    obj["usage"] = None
                return obj
            return stream(job, chunk, include_usage, len(tokens))

        text, finish_reason, completion_tokens = await collect(job, request)
        return {"id": completion_id, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage(len(tokens), completion_tokens)}

    return app


def load_engines(args):
    """One (model, Engine) per replica; each replica on its own GPU."""
    from nanochat.checkpoint_manager import load_model
    device_type = args.device or autodetect_device_type()
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise SystemExit(f"--num-gpus {args.num_gpus}, but only {torch.cuda.device_count()} CUDA devices are visible")
    engines, tokenizer, meta = [], None, None
    for i in range(args.num_gpus):
        device = torch.device("cuda", i) if device_type == "cuda" else torch.device(device_type)
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        except (FileNotFoundError, ValueError) as e:  # ValueError: e.g. a LoRA adapter that does not fit its base
            raise SystemExit(f"error: {e}") from None
        engines.append(Engine(model, tokenizer))
    return engines, tokenizer, meta


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logging(getattr(logging, args.log_level.upper()))
    if args.num_gpus < 1 or args.max_batch_size < 1 or args.max_queue < 1:
        raise SystemExit("error: --num-gpus, --max-batch-size and --max-queue must be at least 1")
    if args.top_k < 0 or args.top_k > args.limit_top_k:
        raise SystemExit(f"error: --top-k must be in [0, {args.limit_top_k}]")
    engines, tokenizer, meta = load_engines(args)
    model_name = args.model_name or f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    pool = WorkerPool(engines, args.max_batch_size, args.max_queue)
    app = create_app(pool, tokenizer, model_name, args, engines[0].max_context)
    logger.info("serving %s (step %s) on %d replica(s) at http://%s:%d", model_name, meta.get("step"),
                len(engines), args.host, args.port)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
