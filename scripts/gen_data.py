"""Make training data with a model behind any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama, chat_web):
`generate` SFT conversations from a prompt template and topics, `judge` DPO pairs by letting a judge model pick.

    python -m scripts.gen_data generate --api-base URL --model M --template tpl.txt --topics topics.txt --out convs.jsonl
    python -m scripts.gen_data judge --prompts p.txt --source sft --judge-api-base URL --judge-model M --out p.jsonl"""
import argparse
import hashlib
import json
import os
import random
import re
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from nanochat.api_client import STOP, APIError, ChatClient, FatalAPIError
from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import HelpFormatter, autodetect_device_type
from nanochat.engine import Engine
from tasks.common import RecordError, chat_record_to_conversation, check_messages, nonempty_str
from tasks.preferences import preference_pair

def make_client(args, prefix, counters):
    """The ChatClient of the --{prefix}api-base/--{prefix}model/--{prefix}api-key-env flags."""
    api_base, model, flag = getattr(args, f"{prefix}api_base"), getattr(args, f"{prefix}model"), prefix.replace("_", "-")
    if not api_base or not model:
        raise SystemExit(f"--{flag}api-base and --{flag}model are required")
    return ChatClient(api_base, model, api_key=os.environ.get(getattr(args, f"{prefix}api_key_env")) or None,
                      timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                      max_backoff=args.max_backoff, counters=counters)

# -----------------------------------------------------------------------------
# Resumable jsonl output: every record carries a stable "id" (a hash of what produced it); a re-run skips the ids
# already in --out, so a killed run is simply started again, and the items that failed (never written) are retried.
def stable_id(*parts):
    # 64 bits: a collision would take billions of items
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]

def read_records(path):
    """Records of an existing jsonl output; a torn last line (what a killed writer leaves) is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            print(f"{path}: removing a torn last line ({len(data) - end} bytes) left by an interrupted run", file=sys.stderr)
            f.truncate(end)
            os.fsync(f.fileno())
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:  # not a torn write: a line we did not write, which we do not guess at
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({e}); this file was not written whole by "
                             "gen_data: fix or remove that line, or write to a new --out") from None
        if not isinstance(records[-1], dict):
            raise SystemExit(f"{path}:{lineno}: expected a JSON object")
    return records

def append(path, record):
    # one line, on disk before the next is written: a kill loses at most this one (read_records repairs that)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

def run_parallel(jobs, work, on_result, args, counters, desc):
    """work(job) on --concurrency threads, on_result(job, result) in this thread (the only writer)."""
    # a FatalAPIError stops the run; any other failure is counted, and retried by the next run
    def summary():
        return " ".join(f"{k}={v}" for k, v in counters.items())
    bar = tqdm(total=len(jobs), desc=desc, unit="item", dynamic_ncols=True, postfix=summary())
    STOP.clear()  # a new run: main() may be called again in one process (the tests do)
    executor = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = {executor.submit(work, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                on_result(futures[future], future.result())
            except (APIError, ValueError) as e:  # ValueError: a reply or record that is no use, RecordError too
                counters["failed"] += 1
                tqdm.write(f"failed: {futures[future]['label']}: {e}")
            bar.update(1)
            bar.set_postfix_str(summary())
    except BaseException as e:  # a fatal API error or Ctrl-C: waiting workers stop retrying at once
        STOP.set()
        if isinstance(e, FatalAPIError):
            raise SystemExit(f"stopped: {e}") from None
        raise
    finally:
        # not `with ThreadPoolExecutor`: that would run every queued job to the end after a Ctrl-C
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    print(f"done: {summary()}")
    if counters["failed"]:
        print(f"{counters['failed']} of {len(jobs)} failed; run the same command again to retry them")

def read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SystemExit(f"{what} file not found: {path}") from None

# -----------------------------------------------------------------------------
# generate. --template is a text file with {name} placeholders (other braces, say a JSON example,
# stay as they are). A --topics line is plain text, filling {topic}, or a JSON object filling one
# placeholder per key; {sample} is the sample index. An item's id hashes template, line and sample.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```", re.DOTALL)
THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)

def read_topics(path):
    """[(line number, line text, placeholder values)] of a --topics file."""
    topics = []
    for lineno, line in enumerate(read_text(path, "--topics").splitlines(), 1):
        if not (text := line.strip()):
            continue
        values = {"topic": text}
        if text.startswith("{"):
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: a line starting with '{{' must be a JSON object ({e})") from None
            if not isinstance(values, dict) or not all(isinstance(v, (str, int, float)) for v in values.values()):
                raise SystemExit(f"{path}:{lineno}: a JSON topic line maps placeholder names to strings")
        # numbers fill placeholders as the text they are
        topics.append((lineno, text, {k: str(v) for k, v in values.items()}))
    if not topics:
        raise SystemExit(f"{path}: no topics (one per line)")
    return topics

def render(template, values):
    # an unknown {name} stays as written: generate() has already refused templates whose names lack a value
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)

def reply_to_messages(reply, question, fmt="auto"):
    """The conversation a model's reply stands for; ValueError if it is not a valid one."""
    # JSON (maybe in a ```json fence): {"messages": [...]}, a bare list of messages, or Alpaca's
    # {"instruction", "input", "output"}. Plain text: one exchange, `question` -> the reply.
    reply = THINK.sub("", reply).strip()  # reasoning models' thoughts are not part of the data
    # a fence counts only when it holds JSON: prose around a code sample stays one plain-text reply
    fenced = FENCE.search(reply)
    candidate = fenced.group(1).strip() if fenced and fenced.group(1).strip()[:1] in ("{", "[") else reply
    if fmt == "plain" or candidate[:1] not in ("{", "["):
        if fmt == "json":
            raise ValueError(f"reply is not JSON: {reply[:80]!r}")
        return check_messages([{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                              field="reply")
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as e:
        raise ValueError(f"reply looks like JSON but does not parse ({e}): {candidate[:80]!r}") from None
    data = {"messages": data} if isinstance(data, list) else data  # "{" or "[" parses to nothing else
    try:
        return chat_record_to_conversation(data)["messages"]  # user first, alternating, ending with the assistant
    except RecordError as e:
        raise ValueError(f"reply is not a valid conversation: {e}") from None

def generate(args):
    template = read_text(args.template, "--template")
    question = read_text(args.question, "--question") if args.question else None
    topics = read_topics(args.topics)
    # a placeholder without a value is caught here, before any request is paid for
    for text, path in [(template, args.template), (question, args.question)]:
        for lineno, _, values in topics if text else []:
            if missing := set(PLACEHOLDER.findall(text)) - set(values) - {"sample"}:
                raise SystemExit(f"{args.topics}:{lineno}: no value for the placeholder(s) "
                                 f"{', '.join('{' + n + '}' for n in sorted(missing))} used in {path}")
    existing = read_records(args.out)
    done = {r.get("id") for r in existing}
    # a conversation identical to one already written is skipped (counted as dup)
    seen = {stable_id(json.dumps(r["messages"], sort_keys=True)) for r in existing if isinstance(r.get("messages"), list)}
    jobs = []
    for lineno, text, values in topics:
        for sample in range(args.samples_per_topic):
            item_id, fields = stable_id(template, text, str(sample)), dict(values, sample=str(sample))
            if item_id not in done:
                # meta.topic is the line's text for a plain topic, and all its values for a JSON one
                jobs.append({"id": item_id, "label": f"{args.topics}:{lineno} sample {sample}", "sample": sample,
                             "topic": values if set(values) != {"topic"} else values["topic"],
                             "prompt": render(template, fields).strip(),
                             "question": render(question, fields).strip() if question else None})
            done.add(item_id)  # a repeated topics line is one item, not two
    skipped = len(topics) * args.samples_per_topic - len(jobs)
    print(f"{len(topics)} topics x {args.samples_per_topic} samples: {skipped} already in {args.out}, "
          f"{len(jobs)} to generate")
    counters = Counter(dict.fromkeys(["ok", "retried", "failed", "dup"], 0))
    client = make_client(args, "", counters)
    system = [{"role": "system", "content": args.system}] if args.system else []
    def work(job):
        # a seed of each item's own, the same in every run: a re-run asks for the same sample
        seed = None if args.seed is None else args.seed + int(job["id"][:8], 16) % 1_000_000
        reply = client.complete(system + [{"role": "user", "content": job["prompt"]}],
                                temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
        # a plain-text reply answers the rendered --question, by default the rendered --template itself
        return reply_to_messages(reply, job["question"] or job["prompt"], args.format)
    def on_result(job, messages):
        if (key := stable_id(json.dumps(messages, sort_keys=True))) in seen:
            counters["dup"] += 1
            return
        seen.add(key)
        append(args.out, {"id": job["id"], "messages": messages,
                          "meta": {"topic": job["topic"], "sample": job["sample"], "model": args.model}})
        counters["ok"] += 1
    run_parallel(jobs, work, on_result, args, counters, "generate")
    print(f"skipped {skipped} already done; output in {args.out}")
    return counters

# -----------------------------------------------------------------------------
# judge. Every pair of the --num-answers answers to a prompt is shown to the judge with the --rubric;
# the judge must end with a line "VERDICT: A", "VERDICT: B" or "VERDICT: TIE". Ties, unparseable
# verdicts, orders that disagree (--both-orders) and identical answers are never guessed at: they go
# to <out>.dropped.jsonl with the judge's words, and are counted.
DEFAULT_RUBRIC = """\
You are an impartial judge comparing two AI assistant answers to the same conversation.
Judge which answer better serves the user's last message:
- correctness: facts, reasoning and any arithmetic or code are right;
- helpfulness: it answers what was asked, completely, at a useful level of detail;
- honesty and safety: no made-up facts, no harmful help; a careful refusal beats a harmful answer;
- clarity: well organised and easy to read.
Do not prefer an answer for being longer, or for being shown first or second. If the two are
equally good (or equally bad), say TIE."""

# markdown around the verdict ("**Verdict:** B.") is common, and harmless; anything else on the line is not
VERDICT_LINE = re.compile(r"^[\s*_#>`]*verdict[\s*_`]*[:：][\s*_`]*(A|B|TIE)[\s*_`.!]*$", re.IGNORECASE)

def parse_verdict(text):
    """("A" | "B" | "TIE", reason) from the judge's reply, or (None, text) when its last line is no verdict."""
    # only the last line counts: a verdict quoted in the reasoning ("not VERDICT: A because") is not the verdict
    lines = [line for line in text.strip().splitlines() if line.strip()]
    match = VERDICT_LINE.match(lines[-1]) if lines else None
    return (match.group(1).upper(), "\n".join(lines[:-1]).strip()) if match else (None, text)

def prompt_messages(record):
    if not isinstance(record, dict):
        raise RecordError("record", "expected a JSON object")
    if "prompt" in record or "prompt_messages" in record:
        # the prompt forms of a DPO pair, read by the DPO loader's own parser (the replies are stand-ins): the
        # pairs we write give the prompt back in the same form
        return preference_pair(dict(record, chosen="a", rejected="b"))["prompt_messages"]
    if "instruction" in record:  # Alpaca: the instruction, then its input if any (its output is the answer)
        instruction, extra = nonempty_str(record, "instruction"), nonempty_str(record, "input", optional=True)
        return [{"role": "user", "content": instruction + ("\n\n" + extra if extra.strip() else "")}]
    if "messages" not in record:
        raise RecordError("prompt", "missing (expected 'prompt', 'prompt_messages', 'messages' or 'instruction')")
    # a conversation: the prompt is all of it but a final reply
    messages = record["messages"]
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return check_messages(messages, field="messages", final_role="user")

def read_prompts(path):
    """[(where, prompt messages)] from a .txt (one prompt per line) or .jsonl file."""
    jsonl, prompts = path.endswith((".jsonl", ".json")), []
    for lineno, line in enumerate(read_text(path, "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = prompt_messages(json.loads(line)) if jsonl else [{"role": "user", "content": line.strip()}]
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({e})") from None
        except RecordError as e:
            raise SystemExit(f"{path}:{lineno}: {e}") from None
        prompts.append((f"{path}:{lineno}", messages))
    if not prompts and jsonl:
        raise SystemExit(f"{path}: no prompts")
    return prompts

def make_answerer(args, counters):
    """(name, answers(prompt messages, seed) -> --num-answers texts), from an endpoint or from our checkpoint."""
    n, temperature, max_tokens = args.num_answers, args.answer_temperature, args.answer_max_tokens
    if args.answer_api_base:
        client = make_client(args, "answer_", counters)
        # seed + i: the n answers must differ, even from a server that honours seeds
        return client.model, lambda messages, seed: [client.complete(
            messages, temperature=temperature, max_tokens=max_tokens, seed=seed + i).strip() for i in range(n)]
    if not args.source:
        raise SystemExit("where do answers come from? give --source sft (our checkpoint) or --answer-api-base")
    device = args.device or autodetect_device_type()
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
    engine, lock = Engine(model, tokenizer), threading.Lock()  # one model: one call at a time
    def answers(messages, seed):
        ids = tokenizer.render_for_completion({"messages": messages})
        with lock:
            results, _ = engine.generate_batch(ids, num_samples=n, max_tokens=max_tokens, temperature=temperature,
                                               seed=seed)
        # each result holds the prompt too: only what follows it is the answer
        return [tokenizer.decode(r[len(ids):]).strip() for r in results]
    return f"{args.source}:{args.model_tag or 'default'}@{meta['step']}", answers

def judge_pair(args, ask_judge, answer_source, messages, pair_id, x, y):
    """The output record of one pair of answers: a kept pair, or a dropped one that says why."""
    if not x or not y or x == y:  # nothing to choose between: the judge is not asked
        return {"id": pair_id, "dropped": "identical", "answers": [x, y]}
    # which answer the judge sees first is random (seeded per pair), against position bias;
    # --both-orders asks in both orders and keeps the pair only when the verdicts agree
    orders = [(y, x), (x, y)] if random.Random(pair_id).random() < 0.5 else [(x, y), (y, x)]
    replies = [ask_judge(messages, first, second) for first, second in orders[:2 if args.both_orders else 1]]
    verdicts, reasons = map(list, zip(*map(parse_verdict, replies)))
    # the answer each verdict picks (a tie or an unreadable verdict picks none)
    winners = [order["AB".index(verdict)] for verdict, order in zip(verdicts, orders) if verdict in ("A", "B")]
    why = ("unparseable" if None in verdicts else "tie" if "TIE" in verdicts
           else "inconsistent" if len(set(winners)) != 1 else None)
    if why:
        return {"id": pair_id, "dropped": why, "verdicts": verdicts, "answers": [x, y], "judge_replies": replies}
    return {"id": pair_id, "prompt": messages[0]["content"] if len(messages) == 1 else messages, "chosen": winners[0],
            "rejected": y if winners[0] == x else x, "reason": next((r for r in reasons if r), ""),
            "judge_model": args.judge_model, "answer_source": answer_source}

def judge(args):
    rubric = read_text(args.rubric, "--rubric") if args.rubric else DEFAULT_RUBRIC
    prompts = read_prompts(args.prompts)
    if args.num_answers < 2:
        raise SystemExit("--num-answers must be at least 2 (a pair needs two answers)")
    dropped_path = args.out + ".dropped.jsonl"
    # a dropped pair counts as done too: a re-run does not pay to have it judged again
    done = {r.get("id") for r in read_records(args.out) + read_records(dropped_path)}
    pairs, jobs = [(i, j) for i in range(args.num_answers) for j in range(i + 1, args.num_answers)], []
    # a pair's id is its prompt's hash and its answers' indices: what is done is known without the answers' text
    for where, messages in prompts:
        prompt_id = stable_id(json.dumps(messages, sort_keys=True, ensure_ascii=False))
        if todo := [(i, j) for i, j in pairs if f"{prompt_id}-{i}-{j}" not in done]:
            jobs.append({"id": prompt_id, "label": where, "messages": messages, "pairs": todo})
        done.update(f"{prompt_id}-{i}-{j}" for i, j in pairs)  # a repeated prompt is judged once
    print(f"{len(prompts)} prompts: {len(jobs)} to judge ({len(pairs)} pair(s) each), the rest already done")
    counters = Counter(dict.fromkeys(["kept", "tie", "unparseable", "inconsistent", "identical", "retried", "failed"], 0))
    judge_client, (answer_source, answers_to) = make_client(args, "judge_", counters), make_answerer(args, counters)
    def ask_judge(messages, first, second):
        conversation = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
        prompt = (f"{rubric.strip()}\n\n[Conversation]\n{conversation}\n[End of conversation]\n\n"
                  f"[Answer A]\n{first}\n[End of Answer A]\n\n[Answer B]\n{second}\n[End of Answer B]\n\n"
                  "Explain your comparison briefly. Then end your reply with a final line that is exactly one of:\n"
                  "VERDICT: A\nVERDICT: B\nVERDICT: TIE")
        return judge_client.complete([{"role": "user", "content": prompt}], temperature=args.judge_temperature,
                                     max_tokens=args.judge_max_tokens)
    def work(job):
        # seeded by the prompt: a re-run asks for the same answers (from a sampler that honours seeds)
        answers = answers_to(job["messages"], int(job["id"][:8], 16) % 1_000_000)
        return [judge_pair(args, ask_judge, answer_source, job["messages"], f"{job['id']}-{i}-{j}", answers[i], answers[j])
                for i, j in job["pairs"]]
    def on_result(job, records):
        for record in records:
            if "dropped" not in record:
                preference_pair(record)  # the same check the DPO loader runs
            append(dropped_path if "dropped" in record else args.out, record)
            counters[record.get("dropped", "kept")] += 1
    run_parallel(jobs, work, on_result, args, counters, "judge")
    judged = sum(counters[k] for k in ("kept", "tie", "unparseable", "inconsistent"))
    print(f"{judged} pairs judged: {counters['kept']} kept -> {args.out}; dropped (see {dropped_path}): {counters['tie']} "
          f"ties, {counters['unparseable']} unparseable verdicts, {counters['inconsistent']} inconsistent across orders, "
          f"{counters['identical']} identical answers")
    return counters

# -----------------------------------------------------------------------------
# The command line: the two commands share the output and the HTTP client's flags
def add_client_args(parser, prefix, what, temp, max_tokens):
    # argparse names them args.{prefix}api_base etc. (dashes as underscores), which make_client reads
    parser.add_argument(f"--{prefix}api-base", help=f"OpenAI-compatible base URL of {what}, e.g. http://localhost:8000/v1")
    parser.add_argument(f"--{prefix}model", help=f"model name of {what}")
    parser.add_argument(f"--{prefix}api-key-env", default="OPENAI_API_KEY",
                        help=f"environment variable holding the API key of {what} (unset = no key)")
    parser.add_argument(f"--{prefix}temperature", type=float, default=temp, help=f"sampling temperature of {what}")
    parser.add_argument(f"--{prefix}max-tokens", type=int, default=max_tokens, help=f"max tokens per reply of {what}")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog="Details: the comments "
                                     "in scripts/gen_data.py", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="conversations from a template and topics", formatter_class=HelpFormatter)
    add_client_args(g, "", "the generator", temp=1.0, max_tokens=1024)
    g.add_argument("--template", required=True, help="prompt template file with {topic}-style placeholders")
    g.add_argument("--topics", required=True, help="one topic per line (or a JSON object of placeholder values)")
    g.add_argument("--samples-per-topic", type=int, default=1, help="how many items per topic ({sample} = 0..N-1)")
    g.add_argument("--question", default=None, help="template of the user turn of plain-text replies (default: --template)")
    g.add_argument("--system", default=None, help="system message sent to the generator")
    g.add_argument("--format", choices=["auto", "json", "plain"], default="auto", help="how to read replies (auto: by the look)")
    g.add_argument("--seed", type=int, default=None, help="send a per-item seed (seed + hash of the item) if set")
    j = sub.add_parser("judge", help="DPO pairs from judged answers", formatter_class=HelpFormatter)
    j.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl prompts")
    add_client_args(j, "judge-", "the judge", temp=0.0, max_tokens=512)
    # answers come from an endpoint (--answer-api-base), or from our checkpoint: --source sft
    add_client_args(j, "answer-", "the answering model", temp=0.8, max_tokens=512)
    add_checkpoint_args(j, default_source=None)
    j.add_argument("--num-answers", type=int, default=2, help="answers per prompt; every pair of them is judged")
    j.add_argument("--rubric", default=None, help="file with the judging instructions (default: a general rubric)")
    j.add_argument("--both-orders", action="store_true", help="judge each pair in both orders; keep it if the verdicts agree")
    for p in (g, j):  # what both share: the output, and the HTTP client's patience
        p.add_argument("--out", required=True, help="output .jsonl (appended to; re-running resumes)")
        p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
        p.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/connection errors")
        p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
        p.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay (unless Retry-After asks more)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be >= 1")
    counters = generate(args) if args.command == "generate" else judge(args)
    return 1 if counters["failed"] else 0

if __name__ == "__main__":
    sys.exit(main())
