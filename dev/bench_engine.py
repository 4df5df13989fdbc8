"""
Inference speed: what the KV cache and batching buy.

    python -m dev.bench_engine                       # a random d4 model on the default device
    python -m dev.bench_engine --depth 8 --max-tokens 256
    python -m dev.bench_engine --source sft          # a trained checkpoint instead
    python -m dev.bench_engine --url http://127.0.0.1:8000   # also through a running chat_web server

Prints decode tokens/s for (1) the naive reference (GPT.generate: the whole sequence is recomputed
for every new token), (2) the Engine with its KV cache, one sequence, and (3) aggregate tokens/s
when 1 vs N requests (different prompts) are decoded together by one BatchDecoder, the server's
batching path. Random weights are fine for speed; end tokens are ignored so every run decodes
exactly --max-tokens tokens.
"""
import argparse
import json
import threading
import time

import torch

from nanochat.common import autodetect_device_type, synchronize


def get_parser():
    p = argparse.ArgumentParser(description="Benchmark the inference engine (KV cache, batching)")
    p.add_argument("--source", default=None, choices=["base", "mid", "sft", "dpo"], help="benchmark a checkpoint (default: random weights)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder with --source (default: the largest)")
    p.add_argument("--depth", type=int, default=4, help="layers of the random model; width = 64 * depth")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the random model")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="device type (default: autodetect)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens decoded per sequence")
    p.add_argument("--concurrency", type=int, default=8, help="requests decoded together in the batched run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best is reported)")
    p.add_argument("--url", default=None, help="also measure a running chat_web server at this URL")
    return p


class BenchTokenizer:
    """Just enough tokenizer for the Engine on a random model: the special ids at the top of the
    vocabulary, raw bytes for the rest. Text quality is irrelevant for timing."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, vocab_size):
        self.specials = {name: vocab_size - len(self.SPECIALS) + i for i, name in enumerate(self.SPECIALS)}
        self.enc = self

    def encode_special(self, name):
        return self.specials[name]

    def get_bos_token_id(self):
        return self.specials["<|bos|>"]

    def get_special_tokens(self):
        return set(self.specials)

    def decode_single_token_bytes(self, token_id):
        return bytes([token_id % 256])

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def timed(fn, device_type, repeats):
    best = float("inf")
    for _ in range(repeats):
        synchronize(device_type)
        t0 = time.perf_counter()
        fn()
        synchronize(device_type)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_server(url, prompts_text, max_tokens, concurrency):
    import requests

    def one(i, out):
        body = {"messages": [{"role": "user", "content": prompts_text[i % len(prompts_text)]}], "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        out[i] = r.json()["usage"]["completion_tokens"]

    results = {}
    for n in (1, concurrency):
        out = {}
        threads = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        results[n] = (sum(out.values()), dt)
    return results


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = args.device or autodetect_device_type()
    device = torch.device(device_type)
    from nanochat.engine import Engine, SamplingParams
    from nanochat.gpt import GPT, GPTConfig
    if args.source:
        from nanochat.checkpoint_manager import load_model
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag)
    else:
        n_embd = 64 * args.depth
        config = GPTConfig(sequence_len=1024, vocab_size=args.vocab_size, n_layer=args.depth,
                           n_head=max(1, n_embd // 128), n_kv_head=max(1, n_embd // 128), n_embd=n_embd)
        torch.manual_seed(0)
        model = GPT(config).to(device).eval()
        tokenizer = BenchTokenizer(args.vocab_size)
    engine = Engine(model, tokenizer)
    engine.end_tokens = set()  # decode exactly --max-tokens every time
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {n_params / 1e6:.1f}M params, vocab {cfg.vocab_size}, "
          f"device {device_type}, torch threads {torch.get_num_threads()}")
    print(f"prompt {args.prompt_len} tokens, {args.max_tokens} new tokens per sequence, best of {args.repeats}")

    g = torch.Generator().manual_seed(0)
    low = 256 if not args.source else 0  # stay clear of the random model's special ids
    prompts = [torch.randint(low, cfg.vocab_size - 16, (args.prompt_len + 7 * i,), generator=g).tolist()
               for i in range(args.concurrency)]
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=args.max_tokens, seed=1)

    # (1) naive: full recompute per token (greedy keeps it deterministic; the cost is the forward)
    def naive():
        for _ in model.generate(prompts[0], max_tokens=args.max_tokens, temperature=0.0):
            pass
    t_naive = timed(naive, device_type, args.repeats)

    # (2) + (3): the engine, N different prompts in one batch
    def batched(n):
        decoder = engine.decoder()
        for prompt in prompts[:n]:
            decoder.add(prompt, params)
        while decoder.num_rows:
            decoder.step()
    t_one = timed(lambda: batched(1), device_type, args.repeats)
    t_many = timed(lambda: batched(args.concurrency), device_type, args.repeats)

    tokens = args.max_tokens
    print(f"naive recompute      : {tokens / t_naive:8.1f} tok/s  ({t_naive:.2f}s for {tokens} tokens)")
    print(f"KV cache, 1 sequence : {tokens / t_one:8.1f} tok/s  ({t_one:.2f}s)  -> {t_naive / t_one:.1f}x the naive speed")
    print(f"KV cache, {args.concurrency} requests : {args.concurrency * tokens / t_many:8.1f} tok/s aggregate "
          f"({t_many:.2f}s)  -> {args.concurrency * t_one / t_many:.1f}x the throughput of 1 request")

    if args.url:
        texts = ["Tell me a story about a dragon.", "Why is the sky blue?", "What is 12 times 13?", "Write a poem."]
        res = bench_server(args.url.rstrip("/"), texts, args.max_tokens, args.concurrency)
        for n, (toks, dt) in res.items():
            print(f"server, {n:2d} concurrent : {toks / dt:8.1f} tok/s aggregate ({toks} tokens in {dt:.2f}s)")
    print(json.dumps({"naive_tok_s": tokens / t_naive, "kv_tok_s": tokens / t_one,
                      f"batched_{args.concurrency}_tok_s": args.concurrency * tokens / t_many}))


if __name__ == "__main__":
    main()
