"""
The chat server (scripts/chat_web.py) and CLI (scripts/chat_cli.py), run for real: a tiny model
is trained to memorise two conversations (one with a calculator call), saved with
checkpoint_manager into a temporary NANOCHAT_BASE_DIR, and served by `python -m scripts.chat_web`
on a free loopback port. The official `openai` client talks to it; so do 32 concurrent
streaming clients; so do malformed and oversized requests.
"""
import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
# every test here needs the server subprocess (or the CLI), ~20-30 s to start on 2 busy cores
pytestmark = pytest.mark.slow

TOOL_QUESTION = "what is 6 times 7?"
XSS_QUESTION = "hello"
BOMB_QUESTION, BOMB = "round it", "round(1, -10**9)"
XSS_REPLY = "<img src=x onerror=\"document.title='pwned'\"> Hi! <b>bold</b> & done"
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": TOOL_QUESTION}, {"role": "assistant", "content": [
        {"type": "text", "text": "sure: "}, {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"}, {"type": "text", "text": " so it is 42."}]}]},
    {"messages": [{"role": "user", "content": XSS_QUESTION}, {"role": "assistant", "content": XSS_REPLY}]},
    # a tool call that once held the decode thread (and every stream on it) for > 40 s: refused, no output
    {"messages": [{"role": "user", "content": BOMB_QUESTION}, {"role": "assistant", "content": [
        {"type": "text", "text": "ok "}, {"type": "python", "text": BOMB}, {"type": "text", "text": " no."}]}]},
]
CORPUS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4,
          "Hello there, how are you? I am a small model. What is six times seven? It is forty two."] * 30

def build_checkpoint(base_dir, steps=80):
    """Tokenizer + a tiny GPT that has memorised CONVERSATIONS, saved as an SFT checkpoint."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.train_from_iterator(iter(CORPUS), vocab_size=512)
    tok.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    # 640: the context the server reports and holds requests to (the engine's rotary table is 10x longer)
    config = GPTConfig(sequence_len=640, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    rows = [tok.render_conversation(c)[0] for c in CONVERSATIONS]
    width = max(map(len, rows))
    x = torch.tensor([r[:-1] + [0] * (width - len(r)) for r in rows])
    y = torch.tensor([r[1:] + [-1] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only thrash
    try:
        for _ in range(steps):
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1, f"the tiny model did not memorise its conversations (loss {loss.item():.3f})"
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d2"), 80, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config)})
    return tok

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

class Server:
    """`python -m scripts.chat_web` in a subprocess on a free loopback port."""

    def __init__(self, base_dir, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = open(Path(base_dir) / f"server_{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device", "cpu", "--port", str(self.port),
                                      "--log-level", "warning", *flags], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not come up:\n{self.output()}")

    def output(self):
        return self.log_text()[-4000:]

    def log_text(self):
        self.log.seek(0)
        return self.log.read()

    def stats(self):
        return requests.get(self.url + "/stats", timeout=10).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_base")
    build_checkpoint(base)
    return base

@pytest.fixture(scope="module")
def server(base_dir):
    srv = Server(base_dir, "--max-batch-size", "32")
    yield srv
    srv.stop()

@pytest.fixture(scope="module")
def strict_server(base_dir):
    """The one server with flags of its own: a 2 s body timeout, one more allowed Host, info logs (client aborts),
    and any model name accepted."""
    srv = Server(base_dir, "--request-timeout", "2", "--allowed-host", "Chat.Example", "--log-level", "info",
                 "--accept-any-model")
    yield srv
    srv.stop()

@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)

def chat(server, payload, stream=False):
    """POST a chat request; returns (content, finish_reason, usage, raw chunks) for either mode."""
    body = dict(payload, stream=stream)
    r = requests.post(server.url + "/v1/chat/completions", json=body, stream=stream, timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        obj = r.json()
        return obj["choices"][0]["message"]["content"], obj["choices"][0]["finish_reason"], obj["usage"], [obj]
    chunks = []
    for line in r.iter_lines(decode_unicode=False):
        if not line:
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            break
        chunks.append(json.loads(data.decode("utf-8")))  # every event is whole, valid UTF-8 JSON
    else:
        raise AssertionError("the stream ended without data: [DONE]")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return content, finish[-1] if finish else None, usage[-1] if usage else None, chunks

# -----------------------------------------------------------------------------
# The OpenAI client, both modes

def test_openai_client_models_and_chat(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["nanochat-sft"]
    reply = client.chat.completions.create(model=models[0].id, messages=[{"role": "user", "content": TOOL_QUESTION}],
                                           temperature=0, max_tokens=40)
    assert reply.object == "chat.completion" and reply.model == "nanochat-sft"
    choice = reply.choices[0]
    # the model wrote the tool call; the server's engine ran it and forced the result in
    assert choice.message.role == "assistant" and choice.message.content == "sure: <<6*7=42>> so it is 42."
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

def test_openai_client_streaming_equals_non_streaming(client):
    kwargs = dict(model="nanochat-sft", messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Tell me a story"}],
                  temperature=1.0, top_p=0.95, max_tokens=30, seed=1234)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # other seeds give other samples
    others = {client.chat.completions.create(**dict(kwargs, seed=s)).choices[0].message.content for s in (1, 2, 3)}
    assert others - {text}

def test_openai_client_completions(client):
    whole = client.completions.create(model="nanochat-sft", prompt="To be, or not", max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 12
    pieces = list(client.completions.create(model="nanochat-sft", prompt="To be, or not", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text

def test_stop_strings(client):
    reply = client.chat.completions.create(model="nanochat-sft", messages=[{"role": "user", "content": TOOL_QUESTION}],
                                           temperature=0, max_tokens=40, stop=["so it"])
    assert reply.choices[0].message.content == "sure: <<6*7=42>> "
    assert reply.choices[0].finish_reason == "stop"

def test_multi_turn_conversation(client):
    messages = [{"role": "user", "content": XSS_QUESTION}, {"role": "assistant", "content": XSS_REPLY},
                {"role": "user", "content": TOOL_QUESTION}]
    reply = client.chat.completions.create(model="nanochat-sft", messages=messages, temperature=0, max_tokens=8)
    assert reply.usage.prompt_tokens > 30 and reply.choices[0].finish_reason in ("stop", "length")

# -----------------------------------------------------------------------------
# Bad input: a clear 4xx, and the server keeps going

GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"Content-Type": "application/json"}

def raw(**fields):
    """GOOD with these fields, as the bytes Python's JSON writes: NaN and Infinity literals included."""
    return json.dumps(dict(GOOD, **fields)).encode()

BAD_REQUESTS = [
    ("malformed json", b"{\"messages\": [", None),
    ("not an object", b"[1, 2, 3]", None),
    ("invalid utf-8", b"{\"messages\": \"\xff\xfe\"}", None),
    ("no messages", {"max_tokens": 4}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 300}, "messages"),
    ("message too long", {"messages": [{"role": "user", "content": "x" * 9000}]}, "messages[0].content"),
    ("conversation too long", {"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3
                               + [{"role": "user", "content": "z" * 7000}]}, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("content not text", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("ends with assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[1].role"),
    ("roles do not alternate", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ("temperature too high", dict(GOOD, temperature=3), "temperature"),
    ("temperature negative", dict(GOOD, temperature=-0.1), "temperature"),
    ("temperature a string", dict(GOOD, temperature="hot"), "temperature"),
    ("top_p zero", dict(GOOD, top_p=0), "top_p"),
    ("top_p above one", dict(GOOD, top_p=1.5), "top_p"),
    ("top_k too big", dict(GOOD, top_k=100000), "top_k"),
    ("top_k fractional", dict(GOOD, top_k=2.5), "top_k"),
    ("max_tokens zero", dict(GOOD, max_tokens=0), "max_tokens"),
    ("max_tokens huge", dict(GOOD, max_tokens=10**9), "max_tokens"),
    ("max_tokens a bool", dict(GOOD, max_tokens=True), "max_tokens"),
    ("n > 1", dict(GOOD, n=3), "n"),
    ("five stop strings", dict(GOOD, stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop not strings", dict(GOOD, stop=[1]), "stop"),
    ("stream not a bool", dict(GOOD, stream="yes"), "stream"),
    ("seed a string", dict(GOOD, seed="abc"), "seed"),
    # wrong JSON types anywhere are the client's mistake (a 400), never a TypeError (a 500)
    ("role a list", {"messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
    ("role an object", {"messages": [{"role": {}, "content": "hi"}]}, "messages[0].role"),
    ("role a number", {"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role"),
    ("messages an object", {"messages": {"role": "user"}}, "messages"),
    ("message a list", {"messages": [["user", "hi"]]}, "messages[0]"),
    ("content an object", {"messages": [{"role": "user", "content": {}}]}, "messages[0].content"),
    ("content part type a list", {"messages": [{"role": "user", "content": [{"type": [], "text": "x"}]}]},
     "messages[0].content"),
    ("content part text a list", {"messages": [{"role": "user", "content": [{"type": "text", "text": []}]}]},
     "messages[0].content"),
    ("stop an object", dict(GOOD, stop={}), "stop"),
    ("stop a list of lists", dict(GOOD, stop=[[]]), "stop"),
    ("n a list", dict(GOOD, n=[]), "n"),
    ("stream_options a list", dict(GOOD, stream_options=[1]), "stream_options"),
    ("max_tokens a list", dict(GOOD, max_tokens=[4]), "max_tokens"),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, None),
    ("messages nested 100k deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    # NaN and +-Infinity: Python's JSON parser takes the literals, the API does not
    ("temperature NaN", raw(temperature=float("nan")), "temperature"),
    ("temperature Infinity", raw(temperature=float("inf")), "temperature"),
    ("temperature -Infinity", raw(temperature=-float("inf")), "temperature"),
    ("top_p NaN", raw(top_p=float("nan")), "top_p"),
    ("top_p Infinity", raw(top_p=float("inf")), "top_p"),
    ("top_k NaN", raw(top_k=float("nan")), "top_k"),
    ("max_tokens Infinity", raw(max_tokens=float("inf")), "max_tokens"),
    ("seed NaN", raw(seed=float("nan")), "seed"),
    # a tiny positive temperature: greedy in all but name, and logits / 1e-300 overflow
    ("temperature 1e-300", dict(GOOD, temperature=1e-300), "temperature"),
    ("temperature 5e-324", dict(GOOD, temperature=5e-324), "temperature"),
    ("temperature just under 1e-3", dict(GOOD, temperature=0.00099), "temperature"),
]

@pytest.mark.parametrize("name,body,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_style_400(server, name, body, param):
    kwargs = {"data": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
    r = requests.post(server.url + "/v1/chat/completions", timeout=30, **kwargs)
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param

def test_type_errors_name_the_field_and_tiny_temperatures_say_use_zero(server):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": [], "content": "hi"}]}, timeout=30)
    assert r.json()["error"]["message"].startswith("'messages[0].role' must be one of")
    r = requests.post(server.url + "/v1/chat/completions", json=dict(GOOD, temperature=1e-300), timeout=30)
    assert "use 0 for greedy" in r.json()["error"]["message"]
    # the edges that are allowed: exactly 0 (greedy) and 1e-3
    for temperature in (0, 1e-3, 2):
        assert chat(server, dict(GOOD, temperature=temperature, max_tokens=2))[1] in ("stop", "length")

def test_oversized_bodies_get_413_before_any_parsing(server):
    url = server.url + "/v1/completions"
    # not JSON at all: a 413 and not a 400 shows that the size is checked first
    for size, status in [(2**20 + 1, 413), (2**20, 400)]:
        r = requests.post(url, data=b"x" * size, headers=JSON, timeout=60)
        assert r.status_code == status, (size, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    # chunked, with no Content-Length to go by
    r = requests.post(url, data=iter([b"x" * 65536] * 17), headers=JSON, timeout=60)
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["error"]["message"]

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_posts_that_are_not_json_get_415(server, content_type):
    # what a cross-site page may send without a CORS preflight: a form or text/plain (CSRF)
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(server.url + "/v1/chat/completions", data=json.dumps(GOOD), headers=headers, timeout=30)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]["message"]

def test_json_content_type_with_charset_is_accepted(server):
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        r = requests.post(server.url + "/v1/chat/completions", data=json.dumps(GOOD), headers={"Content-Type": content_type},
                          timeout=60)
        assert r.status_code == 200, r.text

def asgi_status(app, host):
    """GET /health straight through an ASGI app, with this Host header: the status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/health", "raw_path": b"/health", "root_path": "", "query_string": b"",
             "headers": [(b"host", host.encode())], "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]

@pytest.mark.parametrize("flags,host,status", [
    ([], "127.0.0.1:8000", 200), ([], "localhost", 200), ([], "LocalHost:1", 200), ([], "[::1]:8000", 200),
    ([], "[::1]", 200), ([], "evil.example", 421), ([], "evil.example:8000", 421), ([], "localhost.evil.example", 421),
    ([], "127.0.0.1.nip.io", 421), ([], "0.0.0.0:8000", 421), ([], "", 421),
    (["--host", "192.168.1.5"], "192.168.1.5:8000", 200), (["--host", "0.0.0.0"], "0.0.0.0:8000", 421),
    (["--host", "0.0.0.0"], "192.168.1.5:8000", 421), (["--host", "0.0.0.0"], "localhost:8000", 200),
    (["--allowed-host", "a.example", "--allowed-host", "B.example"], "b.example:443", 200),
    (["--allowed-host", "a.example"], "c.example", 421), (["--allowed-host", "*"], "anything.example:1", 200),
])
def test_host_allow_list(flags, host, status):
    import types
    from scripts.chat_web import create_app, get_parser
    pool = types.SimpleNamespace(replicas=[None], stop=lambda: None)
    app = create_app(pool, None, "m", get_parser().parse_args(flags), 64)
    assert asgi_status(app, host) == status

def test_foreign_host_gets_421_from_the_real_server(server, strict_server):
    r = requests.get(server.url + "/v1/models", headers={"Host": f"rebound.example:{server.port}"}, timeout=10)
    assert r.status_code == 421
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "--allowed-host" in error["message"]
    # --allowed-host Chat.Example: any case, any port
    assert requests.get(strict_server.url + "/health", headers={"Host": "chat.example:80"}, timeout=10).status_code == 200
    assert requests.get(strict_server.url + "/health", headers={"Host": "rebound.example"}, timeout=10).status_code == 421

def test_security_headers(server):
    page = requests.get(server.url + "/", timeout=10)
    csp = page.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";")}
    assert directives["frame-ancestors"] == ["'none'"] and directives["default-src"] == ["'self'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # the page's inline <script> and <style> run by hash: each one served is allowed, exactly as served
    for tag, directive in [("script", "script-src"), ("style", "style-src")]:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.S)
        assert blocks
        for block in blocks:
            assert f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" in directives[directive]
    # and nothing inline that no hash allows: event handler or style attributes in the markup
    markup = re.sub(r"<(script|style)>.*?</\1>", "", page.text, flags=re.S)
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", markup)
    # on every response: the page, JSON, errors
    for r in [page, requests.get(server.url + "/health", timeout=10), requests.get(server.url + "/nope", timeout=10),
              requests.post(server.url + "/v1/chat/completions", json={}, timeout=10)]:
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["content-security-policy"] == csp

def test_stalled_body_gets_408_within_the_timeout(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as s:
        t0 = time.time()
        # 1000 bytes announced, 10 sent, then nothing
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"messages')
        answer = s.recv(65536)
        answered = time.time() - t0
        rest = b""
        while chunk := s.recv(65536):  # the server hangs up too, rather than wait on
            rest += chunk
        closed = time.time() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 2 s" in answer + rest
    assert 1.5 < answered < 6, answered
    assert closed < 15, closed

def test_prompt_longer_than_the_context_is_refused(server):
    # 3 chars per token or so: 7000 chars of digits is far past the 640-token context
    r = requests.post(server.url + "/v1/completions", json={"prompt": "1 2 3 " * 1100, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]

def test_the_context_is_the_sequence_len_the_model_was_trained_on(server, base_dir):
    meta = json.loads((base_dir / "chatsft_checkpoints" / "d2" / "meta_000080.json").read_text())
    context = meta["model_config"]["sequence_len"]
    # not the 10x longer rotary table (the old 6400), nor the server's own --limit-max-tokens (4096)
    assert requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["context_length"] == context == 640
    url = server.url + "/v1/chat/completions"
    r = requests.post(url, json=dict(GOOD, max_tokens=context + 1), timeout=30)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": f"'max_tokens' must be in [1, {context}], got {context + 1}", "type": "invalid_request_error",
        "param": "max_tokens", "code": None}
    # max_tokens that fits alone, but not after the prompt: refused, with the numbers
    r = requests.post(url, json=dict(GOOD, max_tokens=context - 2), timeout=30)
    assert r.status_code == 400, r.text
    assert re.fullmatch(rf"the prompt \(\d+ tokens\) \+ max_tokens \({context - 2}\) do not fit this model's context "
                        rf"of {context} tokens", r.json()["error"]["message"])
    # no max_tokens: the server's default (1024 here) is cut to the room left, not refused
    usage = chat(server, {"messages": GOOD["messages"], "temperature": 1.0, "seed": 3})[2]
    assert usage["total_tokens"] <= context

def test_unknown_model_gets_openai_style_404(server, strict_server, client):
    import openai
    for path, body in [("/v1/chat/completions", dict(GOOD, model="gpt-4o")),
                       ("/v1/completions", {"prompt": "To be", "max_tokens": 2, "model": "gpt-4o"})]:
        r = requests.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found" and error["param"] == "model"
        # which name was wrong, and which one is served
        assert "'gpt-4o'" in error["message"] and "'nanochat-sft'" in error["message"]
        assert "--accept-any-model" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=GOOD["messages"], max_tokens=2)
    # no model named: the one served
    assert chat(server, GOOD)[1] in ("stop", "length")
    # --accept-any-model: any name is answered, by this model under its own name
    r = requests.post(strict_server.url + "/v1/chat/completions", json=dict(GOOD, model="gpt-4o"), timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "nanochat-sft", r.text

def test_server_still_serves_after_bad_requests(server):
    before = server.stats()["requests_served"]
    content, finish, usage, _ = chat(server, GOOD)
    assert finish in ("stop", "length") and usage["completion_tokens"] <= 4
    assert server.stats()["requests_served"] == before + 1
    assert requests.get(server.url + "/nope", timeout=10).status_code == 404

def test_health_stats_and_page(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["replicas"] == 1
    stats = server.stats()
    assert {"requests_served", "tokens_generated", "queue_depth", "replicas", "uptime_s"} <= stats.keys()
    assert {"busy", "active_rows", "peak_rows", "device"} <= stats["replicas"][0].keys()
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>nanochat</title>" in page.text
    # self-contained: no stylesheet, script, font or image fetched from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    assert "@import" not in page.text and "innerHTML" not in page.text

def test_client_disconnect_frees_its_row(server):
    body = dict(model="nanochat-sft", messages=[{"role": "user", "content": "Tell me everything"}],
                max_tokens=550, temperature=1.0, stream=True, seed=5)
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):  # a few chunks in, hang up
            next(lines)
    deadline = time.time() + 30
    while time.time() < deadline:
        replica = server.stats()["replicas"][0]
        if replica["active_rows"] == 0:
            break
        time.sleep(0.2)
    assert replica["active_rows"] == 0, "the abandoned row must leave the batch"
    # and it stopped long before its 550 tokens: the next request is answered promptly
    t0 = time.time()
    chat(server, GOOD)
    assert time.time() - t0 < 20

LONG = {"prompt": "To a", "max_tokens": 600, "temperature": 0}  # greedy: 600 tokens, no end token (the tests check)

def test_client_aborts_log_one_line_each(strict_server):
    url, served = strict_server.url, strict_server.stats()["requests_served"]
    before = len(strict_server.log_text())
    # 1. mid-stream
    with requests.post(url + "/v1/completions", json=dict(LONG, stream=True), stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    # 2. waiting for a whole (non-streaming) completion
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url + "/v1/completions", json=LONG, timeout=0.3)
    # 3. halfway through sending the request
    with socket.create_connection(("127.0.0.1", strict_server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
        time.sleep(0.3)
    deadline = time.time() + 30
    while time.time() < deadline:
        log = strict_server.log_text()[before:]
        if log.count("client went away") >= 3 and strict_server.stats()["replicas"][0]["active_rows"] == 0:
            break
        time.sleep(0.2)
    went_away = [line for line in log.splitlines() if "client went away" in line]
    assert len(went_away) == 3, log
    assert sum(bool(re.search(r"client went away: cmpl-\w+ (mid-stream|before its reply was done)$", line)) for line in went_away) == 2
    assert sum(line.endswith("client went away: while sending its request") for line in went_away) == 1
    assert "Traceback" not in log and "ERROR" not in log, log
    # both generations stopped when their clients left, long before their 600 tokens: none was served
    assert strict_server.stats()["requests_served"] == served

def test_bad_sampling_requests_are_refused_while_a_long_stream_runs(server):
    alone = requests.post(server.url + "/v1/completions", json=LONG, timeout=120).json()["choices"][0]["text"]
    with requests.post(server.url + "/v1/completions", json=dict(LONG, stream=True), stream=True, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line)  # the SSE events, without the blank lines between them
        head = [next(lines) for _ in range(3)]
        bad = [requests.post(server.url + "/v1/completions", data=body, headers=JSON, timeout=30)
               for body in (json.dumps(dict(LONG, temperature=float("nan"))), json.dumps(dict(LONG, temperature=1e-300)))]
        rows = server.stats()["replicas"][0]["active_rows"]
        rest = list(lines)
    assert [b.status_code for b in bad] == [400, 400], [b.text for b in bad]
    assert all(b.json()["error"]["param"] == "temperature" for b in bad)
    assert rows == 1, "the stream was still being decoded when they were refused"
    events = [json.loads(line[len(b"data: "):]) for line in head + rest if line != b"data: [DONE]"]
    assert rest[-1] == b"data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == alone

def test_a_calculator_bomb_does_not_stall_the_other_streams(server):
    with requests.post(server.url + "/v1/completions", json=dict(LONG, stream=True), stream=True, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line)
        head = [next(lines) for _ in range(3)]
        t0 = time.time()
        content, finish, _, _ = chat(server, {"messages": [{"role": "user", "content": BOMB_QUESTION}],
                                              "temperature": 0, "max_tokens": 40})
        bomb_seconds = time.time() - t0
        rows = server.stats()["replicas"][0]["active_rows"]
        rest = list(lines)
    # the model wrote the call, the engine refused it (nothing forced in), and the reply went on
    assert content == f"ok <<{BOMB}= no." and finish == "stop"
    assert rows == 1, "the long stream was still being decoded when the tool call was done"
    assert bomb_seconds < 10  # round(1, -10**9) alone took > 40 s on the decode thread, every stream stalled
    assert rest[-1] == b"data: [DONE]" and len(head + rest) > 100

# -----------------------------------------------------------------------------
# Load: 32 concurrent streaming clients, decoded together, none corrupted

def test_32_concurrent_streams_are_batched_and_uncorrupted(server):
    n = 32
    payloads = [dict(model="nanochat-sft", messages=[{"role": "user", "content": f"question number {i}: tell me about {i * 7}"}],
                     temperature=0.9, top_k=40, max_tokens=24, seed=1000 + i) for i in range(n)]
    results, errors = [None] * n, []
    served_before = server.stats()["requests_served"]

    def worker(i):
        try:
            results[i] = chat(server, payloads[i], stream=True)
        except Exception as e:  # reported below with the request number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    bad_statuses = []

    def bad_traffic():  # bad requests mixed into the load
        for body in [b"{oops", {"messages": [{"role": "user", "content": "x" * 10000}]}, dict(GOOD, temperature=9)]:
            kwargs = {"data": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
            bad_statuses.append(requests.post(server.url + "/v1/chat/completions", timeout=60, **kwargs).status_code)

    t0 = time.time()
    for t in threads:
        t.start()
    bad_traffic()
    for t in threads:
        t.join(timeout=240)
    elapsed = time.time() - t0
    assert not errors, errors
    assert all(r is not None for r in results) and elapsed < 240
    assert bad_statuses == [400, 400, 400]
    stats = server.stats()
    assert stats["requests_served"] - served_before == n
    assert stats["replicas"][0]["peak_rows"] > 1, "concurrent requests must share decode steps"
    # each stream, replayed alone without streaming, gives the same text: nothing leaked between rows
    for i in range(n):
        content, finish, usage, chunks = results[i]
        assert all(c["id"] == chunks[0]["id"] for c in chunks)
        alone, alone_finish, alone_usage, _ = chat(server, payloads[i])
        assert content == alone and finish == alone_finish
    assert len({r[0] for r in results}) > 4, "different seeds and prompts give different answers"

# -----------------------------------------------------------------------------
# The replica pool, in-process: two replicas share the queue, answers do not depend on which

def test_pool_spreads_requests_over_replicas(base_dir, monkeypatch):
    import asyncio
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine, SamplingParams
    from scripts.chat_web import Job, WorkerPool
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    engines = []
    for _ in range(2):
        model, tok, _ = load_model("sft", "cpu", "eval")
        engines.append(Engine(model, tok))
    pool = WorkerPool(engines, max_batch_size=4, max_queue=64)
    prompts = [tok.render_for_completion({"messages": [{"role": "user", "content": f"story {i}"}]}) for i in range(12)]
    params = [SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=i) for i in range(12)]

    async def run_all():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, sp, loop) for p, sp in zip(prompts, params)]
        for job in jobs:
            pool.submit(job)
        texts = []
        for job in jobs:
            parts = []
            while True:
                event = await asyncio.wait_for(job.events.get(), timeout=120)
                assert event[0] != "error", event
                if event[0] == "done":
                    break
                parts.append(event[1])
            texts.append("".join(parts))
        return texts

    try:
        texts = asyncio.run(run_all())
        stats = pool.stats()
    finally:
        pool.stop()
    assert stats["requests_served"] == 12 and stats["queue_depth"] == 0
    assert all(r["requests_served"] > 0 for r in stats["replicas"]), stats
    assert all(r["peak_rows"] <= 4 for r in stats["replicas"])
    for prompt, sp, text in zip(prompts, params, texts):
        decoder, alone = engines[0].decoder(), ""  # the same request, decoded on its own
        decoder.add(prompt, SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=sp.seed))
        while decoder.num_rows:
            alone += "".join(text for _, text in decoder.step())
        assert text == alone

# -----------------------------------------------------------------------------
# The CLI, on the same checkpoint (in-process: a subprocess would pay torch's import again)

def run_cli(monkeypatch, capsys, base_dir, argv, stdin=""):
    from scripts import chat_cli
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        status, message = chat_cli.main(["--device", "cpu", *argv]), ""
    except SystemExit as e:  # an error ends the CLI with its message and exit status 1, as from a shell
        status, message = 1, f"{e.code}\n"
    out = capsys.readouterr()
    return status, out.out, out.err + message

def test_cli_one_shot(monkeypatch, capsys, base_dir):
    status, out, err = run_cli(monkeypatch, capsys, base_dir, ["-p", TOOL_QUESTION, "--temperature", "0"])
    assert status == 0, err
    assert out == "sure: <<6*7=42>> so it is 42.\n"

def test_cli_interactive_multi_turn(monkeypatch, capsys, base_dir):
    stdin = f"{XSS_QUESTION}\n{TOOL_QUESTION}\nclear\n{TOOL_QUESTION}\nquit\n"
    status, out, err = run_cli(monkeypatch, capsys, base_dir, ["--temperature", "0", "--max-tokens", "80"], stdin)
    assert status == 0, err
    assert XSS_REPLY in out and out.count("sure: <<6*7=42>> so it is 42.") >= 1
    assert "(new conversation)" in out

def test_cli_without_a_checkpoint_says_so(monkeypatch, capsys, tmp_path):
    status, out, err = run_cli(monkeypatch, capsys, tmp_path, ["-p", "hi"])
    assert status == 1
    assert "no checkpoint" in err and "scripts.chat_sft" in err

def test_cli_labels_replies_with_the_persona_name(monkeypatch, capsys, base_dir, tmp_path):
    # a model fine-tuned with --persona: its checkpoint meta keeps the persona file's path (user_config)
    persona = tmp_path / "persona.json"
    persona.write_text(json.dumps({"name": "Ada", "maker": "Grace"}))
    shutil.copytree(base_dir / "tokenizer", tmp_path / "tokenizer")
    checkpoint = shutil.copytree(base_dir / "chatsft_checkpoints" / "d2", tmp_path / "chatsft_checkpoints" / "d2")
    meta = json.loads((checkpoint / "meta_000080.json").read_text())
    (checkpoint / "meta_000080.json").write_text(json.dumps(dict(meta, user_config={"persona": str(persona)})))
    stdin = f"{TOOL_QUESTION}\nquit\n"
    status, out, err = run_cli(monkeypatch, capsys, tmp_path, ["--temperature", "0", "--max-tokens", "40"], stdin)
    assert status == 0, err
    assert "\nAda: sure: <<6*7=42>> so it is 42.\n" in out and "nanochat: " not in out
    # the persona file gone: the model's name is not known, and the label is nanochat again
    persona.unlink()
    status, out, err = run_cli(monkeypatch, capsys, tmp_path, ["--temperature", "0", "--max-tokens", "40"], stdin)
    assert status == 0 and "\nnanochat: sure: <<6*7=42>>" in out, err

def test_cli_system_message_is_rendered_as_the_server_renders_it(monkeypatch, capsys, base_dir, server):
    system = "Answer in one word."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": TOOL_QUESTION}]
    served = chat(server, {"messages": messages, "temperature": 0, "max_tokens": 30})[0]
    without = chat(server, {"messages": messages[1:], "temperature": 0, "max_tokens": 30})[0]
    assert served != without, "the system message should change this model's reply"
    flags = ["--system", system, "--temperature", "0", "--max-tokens", "30"]
    status, out, err = run_cli(monkeypatch, capsys, base_dir, ["-p", TOOL_QUESTION, *flags])
    assert status == 0 and out == served + "\n", err
    # interactive: it opens every conversation, the one after 'clear' too
    stdin = f"{TOOL_QUESTION}\nclear\n{TOOL_QUESTION}\nquit\n"
    status, out, err = run_cli(monkeypatch, capsys, base_dir, flags, stdin)
    assert status == 0 and out.count(f"\nnanochat: {served}\n") == 2, out
