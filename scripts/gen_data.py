"""
Make training data with a language model behind any OpenAI-compatible endpoint
(OpenAI, vLLM, llama.cpp server, Ollama, our own scripts.chat_web, ...).

  generate  conversations for SFT/midtraining, from a prompt template and a list of topics
  judge     DPO preference pairs: sample answers to prompts, let a judge model pick the better one

    python -m scripts.gen_data generate --api-base http://localhost:8000/v1 --model qwen \
        --template tpl.txt --topics topics.txt --samples-per-topic 3 --out convs.jsonl
    python -m scripts.gen_data judge --prompts prompts.txt --source sft \
        --judge-api-base https://api.openai.com/v1 --judge-model gpt-4o-mini --out pairs.jsonl

The API key is read from the environment variable named by --api-key-env (OPENAI_API_KEY by
default); a local server usually needs none. Requests run in parallel (--concurrency); 429,
5xx and connection errors are retried with exponential backoff and jitter, honouring the
server's Retry-After. Output is jsonl, one record per line, each written with flush + fsync.

Resuming: every record carries a stable "id" (a hash of what produced it), and a re-run reads
the ids already in --out and skips them, so a killed run is simply started again. A line torn
by the kill is detected and cut off. Items that failed (after all retries, or with a reply that
is not a valid conversation) are not written, so the next run tries them again.

generate: the template contract
  --template is a text file with {name} placeholders. A --topics line is either plain text,
  filling {topic}, or a JSON object filling one placeholder per key ({"topic": .., "level": ..}).
  {sample} is the sample index (0..samples-per-topic-1). Only {identifier} is a placeholder;
  other braces (a JSON example in the template) are left as they are. The id of an item is a
  hash of the template text, the topics line and the sample index.
  The model's reply becomes a conversation:
    - a JSON reply (possibly in a ```json fence): {"messages": [...]}, a bare list of messages,
      or {"instruction", "input", "output"}; it must be a valid conversation (user first,
      alternating, ending with the assistant), else the item counts as failed;
    - a plain-text reply: one exchange, user = the rendered --question template (default: the
      rendered --template itself), assistant = the reply.
  --format json|plain forces one reading (auto: JSON when the reply looks like JSON).
  A conversation identical to one already in --out is skipped (counted as dup).

judge: preference pairs
  --prompts: .txt (one prompt per line) or .jsonl ({"prompt": str | messages}, or
  {"prompt_messages": [...]} or {"messages": [...]}; a final assistant turn is dropped).
  Answers come from our own checkpoint (--source sft, via the Engine) or from an endpoint
  (--answer-api-base). Every pair of the --num-answers answers is shown to the judge with the
  --rubric; the judge must end with a line "VERDICT: A", "VERDICT: B" or "VERDICT: TIE".
  Which answer is shown first is random (seeded per pair) against position bias; with
  --both-orders each pair is judged in both orders and kept only if the two verdicts agree.
  Kept pairs go to --out as {"id", "prompt", "chosen", "rejected", "reason", "judge_model",
  "answer_source"}; ties, unparseable verdicts, inconsistent orders and identical answers are
  never guessed: they go to <out>.dropped.jsonl with the judge's words, and are counted.
"""
import argparse
import email.utils
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests
from tqdm import tqdm

from tasks.common import RecordError, chat_record_to_conversation, check_messages
from tasks.preferences import preference_pair

# -----------------------------------------------------------------------------
# The OpenAI-compatible client: POST {api_base}/chat/completions, retried


STOP = threading.Event()  # set when the run is stopping: workers give up instead of retrying


class FatalAPIError(RuntimeError):
    """Retrying cannot help (bad key, unknown model or URL): stop the whole run."""


class APIError(RuntimeError):
    """This request failed (after retries, or with a reply we cannot use)."""


class Counters:
    """Thread-safe named counts, shown on the progress bar and in the final report."""

    def __init__(self, *names):
        self.lock = threading.Lock()
        self.counts = {name: 0 for name in names}

    def add(self, name, n=1):
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def __getitem__(self, name):
        return self.counts.get(name, 0)

    def summary(self):
        return " ".join(f"{k}={v}" for k, v in self.counts.items())


def retry_after_seconds(value):
    """Retry-After as seconds (a number, or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ChatClient:
    RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
    FATAL_STATUS = {401, 403, 404}
    MAX_RETRY_AFTER = 600.0  # never sleep longer than this, whatever the server asks

    def __init__(self, api_base, model, api_key=None, timeout=120.0, max_retries=6, backoff=1.0,
                 max_backoff=60.0, counters=None):
        if not api_base:
            raise ValueError("an API base URL is needed, e.g. http://localhost:8000/v1")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.counters = counters or Counters("retried")
        self.local = threading.local()  # one requests.Session per thread (Sessions are not thread-safe)

    def _session(self):
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def complete(self, messages, temperature=1.0, max_tokens=1024, seed=None):
        """The assistant's reply text to `messages`."""
        payload = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            payload["seed"] = seed
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(self.max_retries + 1):
            if STOP.is_set():
                raise APIError("the run is stopping")
            retry_after = None
            try:
                response = self._session().post(self.url, json=payload, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                status = response.status_code
                if status == 200:
                    return self._content(response)
                body = response.text[:300].strip()
                if status in self.FATAL_STATUS:
                    hint = {401: "check the API key (--api-key-env)", 403: "the key may lack access to this model",
                            404: "check --api-base (it usually ends in /v1) and --model"}[status]
                    raise FatalAPIError(f"{self.url} answered HTTP {status}: {body} ({hint})")
                if status not in self.RETRY_STATUS and status < 500:
                    raise APIError(f"HTTP {status}: {body}")
                problem = f"HTTP {status}: {body[:100]}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.max_retries:
                raise APIError(f"gave up after {attempt + 1} attempts; last error: {problem}")
            if retry_after is not None:
                # never earlier than asked; a little later at random, so workers do not return together
                delay = min(retry_after, self.MAX_RETRY_AFTER) * random.uniform(1.0, 1.25)
            else:  # exponential backoff with jitter, so parallel workers do not retry in lockstep
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)
            self.counters.add("retried")
            STOP.wait(delay)

    def _content(self, response):
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise APIError(f"unexpected response (not an OpenAI chat completion): {response.text[:200]!r}") from None
        if not isinstance(content, str):
            raise APIError(f"reply content is {type(content).__name__}, expected text")
        return content


def add_client_args(parser, prefix="", what="the generator"):
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}api-base", dest=f"{dest}api_base", default=None,
                        help=f"OpenAI-compatible base URL of {what}, e.g. http://localhost:8000/v1")
    parser.add_argument(f"--{prefix}model", dest=f"{dest}model", default=None, help=f"model name of {what}")
    parser.add_argument(f"--{prefix}api-key-env", dest=f"{dest}api_key_env", default="OPENAI_API_KEY",
                        help=f"environment variable holding the API key of {what} (unset = no key)")


def make_client(args, prefix, counters):
    api_base, model = getattr(args, f"{prefix}api_base"), getattr(args, f"{prefix}model")
    flag = prefix.replace("_", "-")
    if not api_base or not model:
        raise SystemExit(f"--{flag}api-base and --{flag}model are required")
    return ChatClient(api_base, model, api_key=os.environ.get(getattr(args, f"{prefix}api_key_env")) or None,
                      timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                      max_backoff=args.max_backoff, counters=counters)


# -----------------------------------------------------------------------------
# Resumable jsonl output


def stable_id(*parts):
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


def content_hash(messages):
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_records(path):
    """Records of an existing jsonl output. A last line without its newline is what a killed
    writer leaves behind: it is cut off the file (reported). Any other unreadable line is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if end < len(data):
        print(f"{path}: removing a torn last line ({len(data) - end} bytes) left by an interrupted run",
              file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({e}); this file was not written whole by "
                             "gen_data: fix or remove that line, or write to a new --out") from None
        if not isinstance(record, dict):
            raise SystemExit(f"{path}:{lineno}: expected a JSON object")
        records.append(record)
    return records


class JsonlAppender:
    """Appends one record per line; each line is flushed and fsynced before the next, so a kill
    loses at most the line being written (and read_records repairs that)."""

    def __init__(self, path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.f = open(path, "ab")

    def write(self, record):
        self.f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def run_parallel(jobs, work, on_result, concurrency, counters, desc, total):
    """Run work(job) for every job on `concurrency` threads; on_result(job, result) in this thread
    (the only writer). A FatalAPIError stops everything; other exceptions are counted as failed."""
    bar = tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)
    bar.set_postfix_str(counters.summary())
    failures = []
    STOP.clear()
    executor = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {executor.submit(work, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                on_result(job, future.result())
            except FatalAPIError:
                raise
            except (APIError, RecordError, ValueError) as e:
                counters.add("failed")
                failures.append((job, e))
                tqdm.write(f"failed: {describe(job)}: {e}")
            bar.update(1)
            bar.set_postfix_str(counters.summary())
    except BaseException:  # a fatal API error or Ctrl-C: waiting workers stop retrying at once
        STOP.set()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return failures


def describe(job):
    return job.get("label", job.get("id", "?")) if isinstance(job, dict) else str(job)


# -----------------------------------------------------------------------------
# generate

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SystemExit(f"{what} file not found: {path}") from None


def read_topics(path):
    """[(line text, placeholder values)]: a plain line fills {topic}; a JSON object line fills its keys."""
    topics = []
    for lineno, line in enumerate(read_text(path, "--topics").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: a line starting with '{{' must be a JSON object ({e})") from None
            if not isinstance(values, dict) or not all(isinstance(v, (str, int, float)) for v in values.values()):
                raise SystemExit(f"{path}:{lineno}: a JSON topic line maps placeholder names to strings")
            values = {k: str(v) for k, v in values.items()}
        else:
            values = {"topic": text}
        topics.append((lineno, text, values))
    if not topics:
        raise SystemExit(f"{path}: no topics (one per line)")
    return topics


def render(template, values):
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def check_placeholders(template, template_path, topics, topics_path):
    names = set(PLACEHOLDER.findall(template))
    for lineno, _, values in topics:
        missing = names - set(values) - {"sample"}
        if missing:
            raise SystemExit(f"{topics_path}:{lineno}: no value for the placeholder(s) "
                             f"{', '.join('{' + n + '}' for n in sorted(missing))} used in {template_path}")


FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```", re.DOTALL)
THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def reply_to_messages(reply, question, fmt="auto"):
    """The conversation a model reply stands for (see the module docstring); ValueError if it is not one."""
    reply = THINK.sub("", reply).strip()  # reasoning models' thoughts are not part of the data
    candidate = None
    if fmt != "plain":
        fenced = FENCE.search(reply)
        if fenced and fenced.group(1).strip()[:1] in ("{", "["):
            candidate = fenced.group(1).strip()
        elif reply[:1] in ("{", "["):
            candidate = reply
    if candidate is None:
        if fmt == "json":
            raise ValueError(f"reply is not JSON: {reply[:80]!r}")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return check_messages(messages, field="reply")
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as e:
        raise ValueError(f"reply looks like JSON but does not parse ({e}): {candidate[:80]!r}") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict):
        raise ValueError(f"reply JSON is a {type(data).__name__}, expected a conversation")
    try:
        return chat_record_to_conversation(data)["messages"]
    except RecordError as e:
        raise ValueError(f"reply is not a valid conversation: {e}") from None


def generate(args):
    template = read_text(args.template, "--template")
    question_template = read_text(args.question, "--question") if args.question else None
    topics = read_topics(args.topics)
    check_placeholders(template, args.template, topics, args.topics)
    if question_template:
        check_placeholders(question_template, args.question, topics, args.topics)

    existing = read_records(args.out)
    done = {r.get("id") for r in existing}
    seen = set()
    for r in existing:
        if isinstance(r.get("messages"), list):
            seen.add(content_hash(r["messages"]))
    jobs = []
    for lineno, text, values in topics:
        for sample in range(args.samples_per_topic):
            item_id = stable_id(template, text, str(sample))
            if item_id in done:
                continue
            done.add(item_id)  # a repeated topics line is one item, not two
            fields = dict(values, sample=str(sample))
            jobs.append({"id": item_id, "label": f"{args.topics}:{lineno} sample {sample}", "sample": sample,
                         "topic": values if set(values) != {"topic"} else values["topic"],
                         "prompt": render(template, fields).strip(),
                         "question": render(question_template, fields).strip() if question_template else None})
    skipped = len(topics) * args.samples_per_topic - len(jobs)
    print(f"{len(topics)} topics x {args.samples_per_topic} samples: {skipped} already in {args.out}, "
          f"{len(jobs)} to generate")

    counters = Counters("ok", "retried", "failed", "dup")
    client = make_client(args, "", counters)
    out = JsonlAppender(args.out)

    def work(job):
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": job["prompt"]}]
        seed = None if args.seed is None else args.seed + int(job["id"][:8], 16) % 1_000_000
        reply = client.complete(messages, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
        return reply_to_messages(reply, job["question"] or job["prompt"], args.format)

    def on_result(job, messages):
        record = {"id": job["id"], "messages": messages,
                  "meta": {"topic": job["topic"], "sample": job["sample"], "model": args.model}}
        chat_record_to_conversation(record)  # the same check the SFT loader runs
        key = content_hash(messages)
        if key in seen:
            counters.add("dup")
            return
        seen.add(key)
        out.write(record)
        counters.add("ok")

    try:
        failures = run_parallel(jobs, work, on_result, args.concurrency, counters, "generate", len(jobs))
    except FatalAPIError as e:
        raise SystemExit(f"stopped: {e}") from None
    finally:
        out.close()
    print(f"done: {counters.summary()} (skipped {skipped} already done) -> {args.out}")
    if failures:
        print(f"{len(failures)} items failed; run the same command again to retry them")
    return counters


# -----------------------------------------------------------------------------
# judge

DEFAULT_RUBRIC = """\
You are an impartial judge comparing two AI assistant answers to the same conversation.
Judge which answer better serves the user's last message:
- correctness: facts, reasoning and any arithmetic or code are right;
- helpfulness: it answers what was asked, completely, at a useful level of detail;
- honesty and safety: no made-up facts, no harmful help; a careful refusal beats a harmful answer;
- clarity: well organised and easy to read.
Do not prefer an answer for being longer, or for being shown first or second. If the two are
equally good (or equally bad), say TIE."""

VERDICT_LINE = re.compile(r"^[\s*_#>`]*verdict[\s*_`]*[:：][\s*_`]*(A|B|TIE)[\s*_`.!]*$", re.IGNORECASE)


def judge_prompt(rubric, prompt_messages, answer_a, answer_b):
    conversation = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt_messages)
    return (f"{rubric.strip()}\n\n[Conversation]\n{conversation}\n[End of conversation]\n\n"
            f"[Answer A]\n{answer_a}\n[End of Answer A]\n\n[Answer B]\n{answer_b}\n[End of Answer B]\n\n"
            "Explain your comparison briefly. Then end your reply with a final line that is exactly one of:\n"
            "VERDICT: A\nVERDICT: B\nVERDICT: TIE")


def parse_verdict(text):
    """("A" | "B" | "TIE", reason) from the judge's reply, or (None, text) when its last
    non-empty line is not a verdict line. Nothing is guessed from the rest of the text."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, text
    match = VERDICT_LINE.match(lines[-1])
    if not match:
        return None, text
    return match.group(1).upper(), "\n".join(lines[:-1]).strip()


def read_prompts(path):
    """[(where, prompt messages)] from a .txt (one prompt per line) or .jsonl file."""
    prompts = []
    text = read_text(path, "--prompts")
    if not path.endswith((".jsonl", ".json")):
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append((f"{path}:{lineno}", [{"role": "user", "content": line.strip()}]))
        return prompts
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise RecordError("record", "expected a JSON object")
            if "prompt_messages" in record:
                messages = check_messages(record["prompt_messages"], field="prompt_messages", final_role="user")
            elif isinstance(record.get("prompt"), list):
                messages = check_messages(record["prompt"], field="prompt", final_role="user")
            elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
                messages = [{"role": "user", "content": record["prompt"]}]
            elif "messages" in record:
                messages = record["messages"]
                if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                        and messages[-1].get("role") == "assistant":
                    messages = messages[:-1]  # a training conversation: its last question is the prompt
                messages = check_messages(messages, field="messages", final_role="user")
            else:
                raise RecordError("prompt", "missing (expected 'prompt', 'prompt_messages' or 'messages')")
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: not valid JSON ({e})") from None
        except RecordError as e:
            raise SystemExit(f"{where}: {e}") from None
        prompts.append((where, messages))
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


class LocalAnswerer:
    """Answers from one of our checkpoints, through the Engine (one model, so one call at a time)."""

    def __init__(self, args):
        import torch
        from nanochat.checkpoint_manager import load_model
        from nanochat.engine import Engine
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
        self.engine = Engine(model, self.tokenizer)
        self.lock = threading.Lock()
        self.name = f"{args.source}:{args.model_tag or 'default'}@{meta['step']}"

    def answers(self, prompt_messages, n, temperature, max_tokens, seed):
        ids = self.tokenizer.render_for_completion({"messages": prompt_messages})
        with self.lock:
            results, _ = self.engine.generate_batch(ids, num_samples=n, max_tokens=max_tokens,
                                                    temperature=temperature, seed=seed)
        return [self.tokenizer.decode(r[len(ids):]).strip() for r in results]


class EndpointAnswerer:
    def __init__(self, client):
        self.client = client
        self.name = client.model

    def answers(self, prompt_messages, n, temperature, max_tokens, seed):
        return [self.client.complete(prompt_messages, temperature=temperature, max_tokens=max_tokens,
                                     seed=seed + i).strip() for i in range(n)]


def judge(args):
    rubric = read_text(args.rubric, "--rubric") if args.rubric else DEFAULT_RUBRIC
    prompts = read_prompts(args.prompts)
    if args.num_answers < 2:
        raise SystemExit("--num-answers must be at least 2 (a pair needs two answers)")
    dropped_path = args.out + ".dropped.jsonl"
    done = {r.get("id") for r in read_records(args.out)} | {r.get("id") for r in read_records(dropped_path)}
    pairs = [(i, j) for i in range(args.num_answers) for j in range(i + 1, args.num_answers)]
    jobs = []
    for where, messages in prompts:
        prompt_id = stable_id(json.dumps(messages, sort_keys=True, ensure_ascii=False))
        todo = [(i, j) for i, j in pairs if f"{prompt_id}-{i}-{j}" not in done]
        if todo:
            jobs.append({"id": prompt_id, "label": where, "messages": messages, "pairs": todo})
        done.update(f"{prompt_id}-{i}-{j}" for i, j in pairs)  # a repeated prompt is judged once
    print(f"{len(prompts)} prompts: {len(jobs)} to judge ({len(pairs)} pair(s) each), the rest already done")

    counters = Counters("kept", "tie", "unparseable", "inconsistent", "identical", "retried", "failed")
    judge_client = make_client(args, "judge_", counters)
    if args.answer_api_base:
        answerer = EndpointAnswerer(make_client(args, "answer_", counters))
    elif args.source:
        answerer = LocalAnswerer(args)
    else:
        raise SystemExit("where do answers come from? give --source sft (our checkpoint) or --answer-api-base")

    def ask_judge(messages, first, second):
        reply = judge_client.complete([{"role": "user", "content": judge_prompt(rubric, messages, first, second)}],
                                      temperature=args.judge_temperature, max_tokens=args.judge_max_tokens)
        verdict, reason = parse_verdict(reply)
        return verdict, reason, reply

    def work(job):
        seed = int(job["id"][:8], 16) % 1_000_000
        answers = answerer.answers(job["messages"], args.num_answers, args.answer_temperature,
                                   args.answer_max_tokens, seed)
        results = []
        for i, j in job["pairs"]:
            pair_id = f"{job['id']}-{i}-{j}"
            x, y = answers[i], answers[j]
            if not x or not y or x == y:
                results.append({"id": pair_id, "dropped": "identical", "answers": [x, y]})
                continue
            # which answer the judge sees first: random per pair, or both orders
            swap = random.Random(pair_id).random() < 0.5
            orders = [(y, x), (x, y)] if swap else [(x, y), (y, x)]
            orders = orders if args.both_orders else orders[:1]
            winners, verdicts, replies, reason = [], [], [], ""
            for first, second in orders:
                verdict, why, reply = ask_judge(job["messages"], first, second)
                verdicts.append(verdict)
                replies.append(reply)
                reason = reason or why
                if verdict in ("A", "B"):
                    winners.append(first if verdict == "A" else second)
            if None in verdicts:
                why_dropped = "unparseable"
            elif "TIE" in verdicts:
                why_dropped = "tie"
            elif len(set(winners)) != 1:
                why_dropped = "inconsistent"
            else:
                chosen = winners[0]
                rejected = y if chosen == x else x
                messages = job["messages"]
                prompt = messages[0]["content"] if len(messages) == 1 else messages
                results.append({"id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                                "reason": reason, "judge_model": args.judge_model, "answer_source": answerer.name})
                continue
            results.append({"id": pair_id, "dropped": why_dropped, "verdicts": verdicts,
                            "answers": [x, y], "judge_replies": replies})
        return results

    out, dropped_out = JsonlAppender(args.out), JsonlAppender(dropped_path)

    def on_result(job, results):
        for record in results:
            if "dropped" in record:
                dropped_out.write(record)
                counters.add(record["dropped"])
            else:
                try:
                    preference_pair(record)  # the same check the DPO loader runs
                except RecordError as e:
                    raise ValueError(f"pair {record['id']} is not a valid preference record: {e}") from None
                out.write(record)
                counters.add("kept")

    try:
        failures = run_parallel(jobs, work, on_result, args.concurrency, counters, "judge", len(jobs))
    except FatalAPIError as e:
        raise SystemExit(f"stopped: {e}") from None
    finally:
        out.close()
        dropped_out.close()
    judged = sum(counters[k] for k in ("kept", "tie", "unparseable", "inconsistent"))
    print(f"done: {counters.summary()}")
    print(f"{judged} pairs judged: {counters['kept']} kept -> {args.out}; dropped (see {dropped_path}): "
          f"{counters['tie']} ties, {counters['unparseable']} unparseable verdicts, "
          f"{counters['inconsistent']} inconsistent across orders, {counters['identical']} identical answers")
    if failures:
        print(f"{len(failures)} prompts failed; run the same command again to retry them")
    return counters


# -----------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Details: see the docstring at the top of scripts/gen_data.py")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", required=True, help="output .jsonl (appended to; re-running resumes)")
        p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
        p.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/connection errors")
        p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
        p.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay (unless Retry-After asks more)")

    g = sub.add_parser("generate", help="conversations from a template and topics")
    add_client_args(g)
    g.add_argument("--template", required=True, help="prompt template file with {topic}-style placeholders")
    g.add_argument("--topics", required=True, help="one topic per line (or a JSON object of placeholder values)")
    g.add_argument("--samples-per-topic", type=int, default=1, help="how many items per topic ({sample} = 0..N-1)")
    g.add_argument("--question", default=None,
                   help="template of the user turn for plain-text replies (default: the rendered --template)")
    g.add_argument("--system", default=None, help="system message sent to the generator")
    g.add_argument("--format", choices=["auto", "json", "plain"], default="auto", help="how to read replies")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--max-tokens", type=int, default=1024, help="max tokens per reply")
    g.add_argument("--seed", type=int, default=None, help="send a per-item seed (seed + hash of the item) if set")
    common(g)

    j = sub.add_parser("judge", help="DPO pairs from judged answers")
    j.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl prompts")
    add_client_args(j, "judge-", "the judge")
    add_client_args(j, "answer-", "the answering model (instead of --source)")
    j.add_argument("--source", default=None, choices=["base", "mid", "sft", "dpo"], help="answer with our checkpoint")
    j.add_argument("--model-tag", default=None, help="checkpoint model tag (default: the largest)")
    j.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    j.add_argument("--device", default=None, help="device for our model (default: cuda if available, else cpu)")
    j.add_argument("--num-answers", type=int, default=2, help="answers per prompt; every pair of them is judged")
    j.add_argument("--answer-temperature", type=float, default=0.8, help="sampling temperature of the answers")
    j.add_argument("--answer-max-tokens", type=int, default=512, help="max tokens per answer")
    j.add_argument("--rubric", default=None, help="file with the judging instructions (default: a general rubric)")
    j.add_argument("--both-orders", action="store_true",
                   help="judge each pair twice (A/B swapped) and keep it only if the verdicts agree")
    j.add_argument("--judge-temperature", type=float, default=0.0, help="judge sampling temperature")
    j.add_argument("--judge-max-tokens", type=int, default=512, help="max tokens of the judge's reply")
    common(j)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be >= 1")
    counters = generate(args) if args.command == "generate" else judge(args)
    return 1 if counters["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
