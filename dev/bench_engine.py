"""Inference speed: decode tokens/s of the naive reference, the KV-cached Engine, and 1 vs N requests batched.
Usage: python -m dev.bench_engine [--source sft (a checkpoint, not a random d4 model)] [--url http://127.0.0.1:8000]"""
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import autodetect_device_type, synchronize
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS

def bench_tokenizer(vocab_size):
    """Just enough tokenizer for the Engine on a random model: special ids at the top of the vocabulary, bytes below."""
    # text quality is irrelevant for timing; the Engine only needs these calls to work
    ids = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return SimpleNamespace(encode_special=ids.__getitem__, get_bos_token_id=lambda: ids["<|bos|>"],
                           get_special_tokens=lambda: set(ids), encode=lambda text: list(text.encode("utf-8")),
                           decode=lambda seq: bytes(i % 256 for i in seq).decode("utf-8", errors="replace"),
                           enc=SimpleNamespace(decode_single_token_bytes=lambda i: bytes([i % 256])))

def timed(fn, device_type, repeats):
    """The best wall time of `repeats` calls of fn (the device synchronized around each)."""
    def once():
        synchronize(device_type)  # a GPU runs ahead of Python: wait for the work queued so far
        t0 = time.perf_counter()
        fn()
        synchronize(device_type)
        return time.perf_counter() - t0
    # the best, not the mean: noise (other processes, a first call's warm-up) only ever adds time
    return min(once() for _ in range(repeats))

def bench_server(url, texts, max_tokens, concurrency):
    """{n: (tokens generated, seconds)} for 1 and `concurrency` simultaneous chat requests."""
    import requests  # only here: the in-process benchmark needs no HTTP

    def one(i):
        # a seed of its own per request, so that n requests are not n copies of one sequence
        body = {"messages": [{"role": "user", "content": texts[i % len(texts)]}], "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    def run(n):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            return sum(pool.map(one, range(n))), time.perf_counter() - t0
    return {n: run(n) for n in (1, concurrency)}

def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the inference engine (KV cache, batching)")
    # no --source by default: random weights, which are as fast as trained ones
    add_checkpoint_args(p, None)
    p.add_argument("--depth", type=int, default=4, help="layers of the random model; width = 64 * depth")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the random model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens decoded per sequence")
    p.add_argument("--concurrency", type=int, default=8, help="requests decoded together in the batched run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best is reported)")
    p.add_argument("--url", default=None, help="also measure a running chat_web server at this URL")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())  # unset: torch's own choice stays
    device = torch.device(args.device or autodetect_device_type())
    if args.source:
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    else:
        # 64 wide per layer, in heads of 128 (d4: 256 wide, 2 heads)
        config = GPTConfig(sequence_len=1024, vocab_size=args.vocab_size, n_layer=args.depth, n_embd=64 * args.depth,
                           n_head=max(1, args.depth // 2), n_kv_head=max(1, args.depth // 2))
        torch.manual_seed(0)
        model, tokenizer = GPT(config).to(device).eval(), bench_tokenizer(args.vocab_size)
    # tools on, as chat_web runs it: their bookkeeping is part of the cost measured
    engine = Engine(model, tokenizer)
    # no end tokens: every run decodes exactly --max-tokens, whatever the (random) model samples
    engine.end_tokens = set()
    cfg, tokens, n = model.config, args.max_tokens, args.concurrency
    print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, vocab {cfg.vocab_size}, device {device.type}, torch threads {torch.get_num_threads()}")
    print(f"prompt {args.prompt_len} tokens, {tokens} new tokens per sequence, best of {args.repeats}")
    # prompts of different lengths, as real requests are: the batch is ragged (ids from `low` on: clear of the
    # random model's special ids)
    g, low = torch.Generator().manual_seed(0), 0 if args.source else 256
    prompts = [torch.randint(low, cfg.vocab_size - 16, (args.prompt_len + 7 * i,), generator=g).tolist()
               for i in range(n)]
    # the naive reference recomputes the whole sequence for every token (greedy keeps it deterministic; the
    # cost is the forward alone); the engine decodes 1 or n different prompts in one batch, as the server does
    sampling, reps = dict(temperature=1.0, top_k=50, max_tokens=tokens, seed=1), (device.type, args.repeats)
    t_naive = timed(lambda: list(model.generate(prompts[0], max_tokens=tokens, temperature=0.0)), *reps)
    t_one = timed(lambda: engine.generate_multi(prompts[:1], **sampling), *reps)
    t_many = timed(lambda: engine.generate_multi(prompts, **sampling), *reps)
    print(f"naive recompute      : {tokens / t_naive:8.1f} tok/s  ({t_naive:.2f}s for {tokens} tokens)")
    print(f"KV cache, 1 sequence : {tokens / t_one:8.1f} tok/s  ({t_one:.2f}s)  -> {t_naive / t_one:.1f}x the naive speed")
    print(f"KV cache, {n} requests : {n * tokens / t_many:8.1f} tok/s aggregate "
          f"({t_many:.2f}s)  -> {n * t_one / t_many:.1f}x the throughput of 1 request")
    if args.url:
        texts = ["Tell me a story about a dragon.", "Why is the sky blue?", "What is 12 times 13?", "Write a poem."]
        for clients, (toks, dt) in bench_server(args.url.rstrip("/"), texts, tokens, n).items():
            print(f"server, {clients:2d} concurrent : {toks / dt:8.1f} tok/s aggregate ({toks} tokens in {dt:.2f}s)")
    # and all of it again as one JSON line, for a machine to read
    print(json.dumps({"naive_tok_s": tokens / t_naive, "kv_tok_s": tokens / t_one,
                      f"batched_{n}_tok_s": n * tokens / t_many}))

if __name__ == "__main__":
    main()
