"""Tests for scripts/gen_data.py against a live loopback OpenAI-compatible server that fails
every third request (429 or 500) and answers from canned rules: every item written exactly
once, failures retried, Retry-After honoured, kill + re-run without duplicates (SIGKILL of the
real CLI, and a torn last line), judged pairs only from parseable verdicts, counts."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat.api_client import ChatClient, retry_after_seconds
from scripts.gen_data import main, parse_verdict, read_records, reply_to_messages
from tasks.preferences import Preferences

REPO = Path(__file__).resolve().parents[1]

class FakeOpenAI:
    """
    POST /v1/chat/completions on 127.0.0.1. `respond(messages) -> str` makes the reply.
    Every `fail_every`-th request fails instead, alternating 429 (Retry-After: 0) and 500.
    `delay` seconds of thinking per request; `requests` logs (user content, status).
    """

    def __init__(self, respond, fail_every=3, delay=0.0):
        self.respond, self.fail_every, self.delay = respond, fail_every, delay
        self.lock = threading.Lock()
        self.count = 0
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server._handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        with self.lock:
            self.count += 1
            n = self.count
        if self.delay:
            time.sleep(self.delay)
        if handler.path != "/v1/chat/completions":
            status, payload, headers = 404, {"error": "not found"}, {}
        elif self.fail_every and n % self.fail_every == 0:
            status = 429 if (n // self.fail_every) % 2 else 500
            payload, headers = {"error": "busy"}, ({"Retry-After": "0"} if status == 429 else {})
        else:
            status, headers = 200, {}
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.respond(body["messages"])}}]}
        with self.lock:
            self.requests.append((user, status))
        data = json.dumps(payload).encode()
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

@pytest.fixture
def fake_server():
    servers = []

    def start(respond, **kwargs):
        servers.append(FakeOpenAI(respond, **kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.close()

def generator_reply(messages):
    """Canned generator: the topic (after 'Topic: ') decides the reply's shape."""
    topic = re.search(r"Topic: (\S+)", messages[-1]["content"]).group(1)
    convo = [{"role": "user", "content": f"Tell me about {topic}"}, {"role": "assistant", "content": f"{topic} is great."}]
    if topic.startswith("json"):
        return json.dumps({"messages": convo})
    if topic.startswith("fenced"):
        return "Sure! Here it is:\n```json\n" + json.dumps(convo) + "\n```\n"
    if topic.startswith("dup"):  # two topics, one identical conversation
        return json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    if topic.startswith("bad"):  # not a conversation: must fail, never be written
        return json.dumps({"messages": [{"role": "assistant", "content": "I start, which is wrong"}]})
    return f"<think>plan it</think>A plain explanation of {topic}."

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)

def gen_args(tmp_path, server, topics, out, *extra):
    template = write(tmp_path / "template.txt", 'Topic: {topic}\nReply as JSON like {"messages": [...]} or in prose.')
    return ["generate", "--api-base", server.url, "--model", "fake", "--template", template,
            "--topics", write(tmp_path / "topics.txt", "\n".join(topics) + "\n"), "--out", str(out),
            "--backoff", "0.01", "--concurrency", "4", *extra]

def test_reply_contract():
    assert reply_to_messages("Just prose.", "the question") == [
        {"role": "user", "content": "the question"}, {"role": "assistant", "content": "Just prose."}]
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert reply_to_messages(json.dumps(convo), "x") == convo
    assert reply_to_messages("ok:\n```json\n" + json.dumps({"messages": convo}) + "\n```", "x") == convo
    assert reply_to_messages(json.dumps({"instruction": "q", "output": "a"}), "x") == convo
    with pytest.raises(ValueError, match="does not parse"):
        reply_to_messages('{"messages": [', "x")
    with pytest.raises(ValueError, match="not a valid conversation"):
        reply_to_messages(json.dumps([{"role": "user", "content": "q"}]), "x")
    with pytest.raises(ValueError, match="not JSON"):
        reply_to_messages("prose", "x", fmt="json")
    assert reply_to_messages(json.dumps(convo), "x", fmt="plain")[1]["content"] == json.dumps(convo)

def test_generate_all_items_once_with_retries(tmp_path, fake_server, capsys):
    server = fake_server(generator_reply, fail_every=3)
    topics = [f"plain{i}" for i in range(5)] + [f"json{i}" for i in range(4)] + ["fenced0", "dup0", "dup1", "bad0"]
    out = tmp_path / "out.jsonl"
    assert main(gen_args(tmp_path, server, topics, out)) == 1  # one item failed (bad0) -> exit status 1
    report = capsys.readouterr().out
    records = read_records(str(out))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(topics) - 2  # bad0 failed, one of dup0/dup1 skipped
    assert {r["meta"]["topic"] for r in records} >= {f"plain{i}" for i in range(5)} | {f"json{i}" for i in range(4)} | {"fenced0"}
    assert "bad0" not in {r["meta"]["topic"] for r in records}
    assert len({r["meta"]["topic"] for r in records} & {"dup0", "dup1"}) == 1
    plain = next(r for r in records if r["meta"]["topic"] == "plain0")
    assert plain["messages"][0]["content"].startswith("Topic: plain0")  # user = the rendered template
    assert plain["messages"][1]["content"] == "A plain explanation of plain0."  # <think> stripped
    # every third request failed, and every failure was retried
    failures = sum(1 for _, status in server.requests if status != 200)
    assert failures >= 4 and {s for _, s in server.requests} == {200, 429, 500}
    assert f"retried={failures}" in report and "ok=11" in report and "dup=1" in report and "failed=1" in report
    # the output is what the SFT loader reads
    from tasks.customjson import CustomJSON
    assert len(CustomJSON(str(out))) == len(records)

    # a re-run only retries the failed item; finished ones are not requested again
    before = len(server.requests)
    assert main(gen_args(tmp_path, server, topics, out)) == 1
    rerun_topics = [re.search(r"Topic: (\S+)", u).group(1) for u, _ in server.requests[before:]]
    assert set(rerun_topics) == {"bad0", "dup0" if "dup1" in {r["meta"]["topic"] for r in records} else "dup1"}
    assert [r["id"] for r in read_records(str(out))] == ids

def test_generate_kill_and_resume(tmp_path, fake_server, base_dir):
    server = fake_server(generator_reply, fail_every=3, delay=0.05)
    topics = [f"plain{i}" for i in range(40)]
    out = tmp_path / "out.jsonl"
    args = gen_args(tmp_path, server, topics, out)
    args[args.index("--concurrency") + 1] = "2"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "scripts.gen_data", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 5):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = out.read_bytes().count(b"\n")
    assert 5 <= written < 40, f"the kill should land mid-way ({written} lines written)"
    with open(out, "ab") as f:  # and a torn line, as a kill in the middle of a write leaves
        f.write(b'{"id": "0123456789abcdef", "messages": [{"role": "us')

    assert main(gen_args(tmp_path, server, topics, out)) == 0
    records = read_records(str(out))
    assert sorted(r["meta"]["topic"] for r in records) == sorted(topics)
    assert len({r["id"] for r in records}) == 40
    assert out.read_bytes().endswith(b"\n") and b'"role": "us\n' not in out.read_bytes()
    # the items finished before the kill were not asked for again
    requested_ok = [u for u, status in server.requests if status == 200]
    assert len(requested_ok) <= 40 + 2, "only the items in flight at the kill may be generated twice"
    # finished: a third run asks nothing
    before = len(server.requests)
    assert main(gen_args(tmp_path, server, topics, out)) == 0
    assert len(server.requests) == before

def test_retry_after_is_honoured_and_fatal_errors_stop(tmp_path, fake_server):
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(None) is None
    assert 0 <= retry_after_seconds(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))) <= 3.5

    class Once429:
        n = 0

    def handler_factory():
        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                Once429.n += 1
                if Once429.n == 1:
                    self.send_response(429)
                    self.send_header("Retry-After", "0.3")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "secret" not in self.headers.get("Authorization", ""):
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass
        return H

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_factory())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        client = ChatClient(url, "m", api_key="secret", backoff=30.0)  # backoff alone would wait ~30 s
        t0 = time.time()
        assert client.complete([{"role": "user", "content": "x"}]) == "hi"
        assert 0.3 <= time.time() - t0 < 3 and client.counters["retried"] == 1
        # a wrong key is fatal for the whole run, with a hint
        topics = write(tmp_path / "t.txt", "a\nb\n")
        template = write(tmp_path / "tpl.txt", "about {topic}")
        os.environ.pop("NO_SUCH_KEY_VAR", None)
        with pytest.raises(SystemExit, match="401.*API key"):
            main(["generate", "--api-base", url, "--model", "m", "--template", template, "--topics", topics,
                  "--out", str(tmp_path / "o.jsonl"), "--api-key-env", "NO_SUCH_KEY_VAR"])
        # a placeholder without a value is caught before any request
        with pytest.raises(SystemExit, match=r"t.txt:1: no value for the placeholder\(s\) \{level\}"):
            main(["generate", "--api-base", url, "--model", "m", "--template", write(tmp_path / "t2.txt", "{topic} {level}"),
                  "--topics", topics, "--out", str(tmp_path / "o.jsonl")])
    finally:
        httpd.shutdown()
        httpd.server_close()

# -----------------------------------------------------------------------------
# judge

def answer_or_judge(messages):
    """Answers grow longer with each request for a prompt; the judge's behaviour is set by the
    prompt's keyword: long -> prefers the longer answer; tie; garbage (no verdict line);
    first -> always 'A' (position bias); bold -> markdown verdict for the longer answer."""
    text = messages[-1]["content"]
    if "[Answer A]" not in text:
        prompt = text
        if "same" in prompt:
            return "The same answer."
        answer_or_judge.count[prompt] = answer_or_judge.count.get(prompt, 0) + 1
        return f"Answer to {prompt}" + " indeed" * answer_or_judge.count[prompt]
    a = re.search(r"\[Answer A\]\n(.*?)\n\[End of Answer A\]", text, re.DOTALL).group(1)
    b = re.search(r"\[Answer B\]\n(.*?)\n\[End of Answer B\]", text, re.DOTALL).group(1)
    longer = "A" if len(a) > len(b) else "B"
    if "tie" in a:
        return "Both are equally fine.\nVERDICT: TIE"
    if "garbage" in a:
        return f"I think {longer} is better, overall."
    if "first" in a:
        return "The first one.\nVERDICT: A"
    if "bold" in a:
        return f"More complete.\n\n**Verdict: {longer}**"
    return f"The longer answer is more complete.\nVERDICT: {longer}"

def judge_args(tmp_path, server, prompts_file, out, *extra):
    return ["judge", "--prompts", prompts_file, "--out", str(out),
            "--judge-api-base", server.url, "--judge-model", "fake-judge", "--backoff", "0.01", "--concurrency", "3", *extra]

def test_parse_verdict():
    assert parse_verdict("reasons\nVERDICT: A") == ("A", "reasons")
    assert parse_verdict("reasons\n\n**Verdict:** tie.\n") == ("TIE", "reasons")
    assert parse_verdict("VERDICT: B is better")[0] is None
    assert parse_verdict("VERDICT: A\nbut maybe B")[0] is None  # the verdict must be the last line
    assert parse_verdict("")[0] is None

def test_judge_pairs_only_from_parseable_verdicts(tmp_path, fake_server, capsys):
    answer_or_judge.count = {}
    server = fake_server(answer_or_judge, fail_every=3)
    prompts = write(tmp_path / "prompts.txt", "long one\nlong two\nbold three\ntie four\ngarbage five\nfirst six\nsame seven\n")
    out = tmp_path / "pairs.jsonl"
    args = judge_args(tmp_path, server, prompts, out, "--answer-api-base", server.url, "--answer-model", "fake-answerer",
                      "--both-orders")
    assert main(args) == 0
    report = capsys.readouterr().out
    pairs = read_records(str(out))
    assert sorted(p["prompt"] for p in pairs) == ["bold three", "long one", "long two"]
    for p in pairs:
        assert len(p["chosen"]) > len(p["rejected"]) and p["judge_model"] == "fake-judge"
        assert p["answer_source"] == "fake-answerer" and p["reason"]
    dropped = {r["answers"][0].split(" indeed")[0].removeprefix("Answer to "): r["dropped"]
               for r in read_records(str(out) + ".dropped.jsonl") if r["dropped"] != "identical"}
    assert dropped == {"tie four": "tie", "garbage five": "unparseable", "first six": "inconsistent"}
    assert "kept=3 tie=1 unparseable=1 inconsistent=1 identical=1" in report
    assert "6 pairs judged: 3 kept" in report
    assert len(Preferences(str(out))) == 3  # the DPO loader accepts the pairs as they are

    # resumable: nothing left to do, nothing asked
    before = len(server.requests)
    assert main(args) == 0
    assert len(server.requests) == before

    # one order only: the position-biased judge is no longer caught, but answers are shown
    # in a random order per pair, so "always A" does not always favour the same answer
    out2 = tmp_path / "pairs_one_order.jsonl"
    answer_or_judge.count = {}
    prompts2 = write(tmp_path / "prompts2.txt", "\n".join(f"first {i}" for i in range(12)) + "\n")
    args2 = judge_args(tmp_path, server, prompts2, out2, "--answer-api-base", server.url, "--answer-model", "fake-answerer")
    assert main(args2) == 0
    winners_longer = [len(p["chosen"]) > len(p["rejected"]) for p in read_records(str(out2))]
    assert len(winners_longer) == 12 and 0 < sum(winners_longer) < 12

def test_judge_with_our_own_model(tmp_path, fake_server, base_dir, tiny_tokenizer, capsys):
    import torch
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    config = dict(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # a spread-out distribution, so samples differ
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, {"model_config": config})

    server = fake_server(lambda m: "Looks fine.\nVERDICT: B", fail_every=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is two plus two?"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "(dropped)"}]},
        {"prompt_messages": [{"role": "user", "content": "Name a colour"}]},
    ]) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(judge_args(tmp_path, server, str(prompts), out, "--source", "sft", "--device", "cpu",
                           "--answer-max-tokens", "12", "--answer-temperature", "1.0")) == 0
    pairs = read_records(str(out))
    assert len(pairs) == 3 and all(p["answer_source"] == "sft:default@5" for p in pairs)
    multi = next(p for p in pairs if isinstance(p["prompt"], list))
    assert [m["content"] for m in multi["prompt"]] == ["Hi", "Hello", "Tell me a story"]
    assert len(Preferences(str(out))) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: messages"):
        main(judge_args(tmp_path, server, str(bad), tmp_path / "x.jsonl", "--source", "sft"))
