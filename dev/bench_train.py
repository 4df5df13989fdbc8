"""Training-step throughput (tokens/s, peak memory, GPU MFU) of one optimizer step (forward, backward, Muon + AdamW)
of our GPT on its "fused" and "plain" paths (nanochat/fused.py or stock ops), and of a classic GPT-2 of the same shape.
    python -m dev.bench_train                      # CPU-sized default
    python -m dev.bench_train --depth 12 --seq-len 2048 --batch-size 16 --device cuda --compile 1"""
import argparse
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import HelpFormatter, autocast_ctx, get_peak_flops, synchronize
from nanochat.gpt import GPT, GPTConfig

NAMES = {"fused": "nanochat GPT, fused path", "plain": "same GPT, plain path", "classic": "classic GPT-2 style"}

class ClassicGPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks of fused-QKV attention and a 4x GELU MLP, biases."""
    def __init__(self, vocab, seq_len, depth, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(
            ln1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
            ln2=nn.LayerNorm(dim), fc=nn.Linear(dim, 4 * dim), fc_out=nn.Linear(4 * dim, dim))) for _ in range(depth)])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        B, T, C = x.shape
        for b in self.blocks:
            # one matmul for q, k and v, split afterwards; no rotary, no QK-norm
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in b.qkv(b.ln1(x)).split(C, dim=2))
            x = x + b.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
            x = x + b.fc_out(F.gelu(b.fc(b.ln2(x))))
        # the full logits and a plain cross-entropy
        logits = self.head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

def rss_mib(field="VmRSS"):
    # current (VmRSS) or peak (VmHWM) resident memory of this process, MiB (Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

def time_steps(model, opt, args, device):
    """Median seconds of one optimizer step (args.grad_accum micro-batches)."""
    # one fixed random batch: the data does not change a step's cost, and every contender sees the same
    x = torch.randint(args.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)
    times = []
    for i in range(args.warmup + args.steps):
        # GPU work is asynchronous: without waiting for it the clock would stop before the step ends
        synchronize(device.type)
        t0 = time.time()
        for _ in range(args.grad_accum):
            with autocast_ctx(device.type):
                loss = model(inputs, targets) / args.grad_accum
            loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device.type)
        if i >= args.warmup:  # the first steps pay for lazy allocations (and compilation)
            times.append(time.time() - t0)
    return sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour

def build_contenders(args, device, dim, n_head):
    """[(key, module to call, optimizer, FLOPs per token or None)] (just args.only if set)."""
    wanted = [args.only] if args.only else ["fused"] + ([] if args.no_baseline else ["plain", "classic"])
    config = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=dim)
    for key in wanted:
        torch.manual_seed(0)
        if key == "classic":
            # torch's fused AdamW only on CUDA, as the classic trainers run it
            model = ClassicGPT(args.vocab_size, args.seq_len, args.depth, dim, n_head).to(device)
            opt, flops = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda"), None
        else:
            # one model class on both paths: only the switch differs, weights and optimizer are alike
            model = GPT(config).to(device)
            model.fused = key == "fused"
            opt, flops = model.setup_optimizer(), model.estimate_flops()
        yield key, torch.compile(model) if args.compile else model, opt, flops

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # --grad-accum: training uses many micro-batches, which share the optimizer's fixed cost (large for Muon)
    for flag, default, text in [
            ("--depth", 4, None), ("--aspect-ratio", 64, None), ("--head-dim", 64, None), ("--vocab-size", 8192, None),
            ("--seq-len", 512, None), ("--batch-size", 8, None), ("--warmup", 2, None),
            ("--grad-accum", 1, "micro-batches per optimizer step"),
            ("--threads", 0, "torch CPU threads (0 = torch's default)"),
            ("--steps", 6, "timed steps per round (median kept)"),
            ("--rounds", 3, "alternating rounds per model (best kept)"), ("--compile", 0, "torch.compile every model")]:
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-baseline", action="store_true", help="time only our model (no comparisons)")
    # internal: the CPU memory probe's child process times this one contender alone
    parser.add_argument("--only", choices=list(NAMES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # width grows with depth (the aspect ratio), heads with width (a fixed head_dim)
    dim = args.depth * args.aspect_ratio
    n_head = dim // args.head_dim
    tokens = args.batch_size * args.seq_len * args.grad_accum
    print(f"config: depth {args.depth}, width {dim}, {n_head} heads, vocab {args.vocab_size}, seq {args.seq_len}, "
          f"batch {args.batch_size} x {args.grad_accum} micro-batches ({tokens:,} tokens/step), device {device}, "
          f"threads {torch.get_num_threads()}, compile {bool(args.compile)}")
    # built up front and kept alive together, so no contender's setup lands inside another's timing
    contenders = list(build_contenders(args, device, dim, n_head))
    if args.only:  # the memory probe below: this contender's steps alone, in a process of its own
        # a child process inherits its parent's peak RSS through fork; "5" resets it (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base_rss = rss_mib()
        time_steps(*contenders[0][1:3], args, device)
        print(f"STEP_PEAK_MIB {rss_mib('VmHWM') - base_rss:.1f}")
        return
    # all models stay alive and are timed in alternating rounds (best round kept): whichever ran
    # first would otherwise pay for the allocator's and caches' warm-up alone
    best, memory = {key: float("inf") for key, *_ in contenders}, {}
    for _ in range(args.rounds):
        for key, fwd, opt, _ in contenders:
            # CUDA counts its allocator's peak itself; the CPU peak RSS is measured apart, below
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            best[key] = min(best[key], time_steps(fwd, opt, args, device))
            if device.type == "cuda":
                memory[key] = max(memory.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if device.type == "cpu":
        # the peak RSS a step adds, measured in a fresh process running only one contender: in this one,
        # memory the others freed (but the allocator kept) would hide the growth
        probe = [sys.executable, "-m", "dev.bench_train", *sys.argv[1:], "--rounds", "1", "--steps", "1", "--only"]
        for key, *_ in contenders:
            out = subprocess.run([*probe, key], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(__file__)))
            found = re.findall(r"^STEP_PEAK_MIB ([\d.]+)$", out.stdout, re.M)
            memory[key] = float(found[-1]) if found else None
    peak = get_peak_flops(device.type)  # None off GPU: no MFU there
    print(f"{'model':<28} {'params':>12} {'step ms':>9} {'tok/s':>10} {'MFU':>6} {'step MiB':>9}")
    for key, fwd, _, flops_per_token in contenders:
        dt, mem = best[key], memory.get(key)
        # MFU of our model only: the classic one has no FLOPs count
        mfu_txt = f"{100 * flops_per_token * tokens / dt / peak:.1f}%" if (peak and flops_per_token) else "-"
        mem_txt = f"{mem:.0f}" if mem is not None else "-"
        params = sum(p.numel() for p in fwd.parameters())
        print(f"{NAMES[key]:<28} {params:>12,} {dt * 1000:>9.1f} {tokens / dt:>10,.0f} {mfu_txt:>6} {mem_txt:>9}")
    for key, *_ in contenders[1:]:  # the fused path is the first row
        print(f"fused path step vs {NAMES[key]}: {best[key] / best['fused']:.2f}x its speed")
    how = ("peak RSS growth, each model alone in a fresh process" if device.type == "cpu"
           else "max allocated, parameters and optimizer state included")
    print(f"step MiB: peak memory of a step over the model and optimizer state ({how})")

if __name__ == "__main__":
    main()
