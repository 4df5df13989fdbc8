"""
Training-step throughput: tokens/s and peak memory of one full optimizer step (forward,
backward, Muon + AdamW) of our GPT at a given config, and MFU on GPU. For scale, two other
steps with the same width, depth, heads, vocab, sequence and batch are timed in the same process:
  - the same architecture and optimizers written the plain way (dev/reference_gpt.py: stock ops,
    autograd backwards, full logits), as the well-known modern small-GPT trainers write it;
  - a classic GPT-2-style model (learned positions, LayerNorm, GELU, fused QKV, SDPA, AdamW),
    the architecture of the well-known classic small-GPT trainers.

    python -m dev.bench_train                      # CPU-sized default
    python -m dev.bench_train --depth 12 --seq-len 2048 --batch-size 16 --device cuda --compile 1
"""
import argparse
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autocast_ctx, get_peak_flops, synchronize
from nanochat.gpt import GPT, GPTConfig
from dev.reference_gpt import reference_loss


class ClassicBlock(nn.Module):
    """GPT-2 block: pre-LayerNorm, fused QKV attention, 4x GELU MLP, biases."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.fc_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class ClassicGPT(nn.Module):
    def __init__(self, vocab, seq_len, depth, dim, n_head):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList([ClassicBlock(dim, n_head) for _ in range(depth)])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class ReferenceGPT(nn.Module):
    """Our architecture through dev/reference_gpt.py (its own copy of the weights)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return reference_loss(self.model, idx, targets)


def rss_mib(field="VmRSS"):
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss():
    # a child process inherits its parent's peak RSS through fork; "5" resets it (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step_memory_mib_cpu(key):
    """Peak RSS a training step adds on top of its model and optimizers, on CPU: measured in a
    fresh process running only that contender (in this process the others' memory would mix in)."""
    cmd = [sys.executable, "-m", "dev.bench_train", *sys.argv[1:], "--only", key, "--rounds", "1", "--steps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    found = re.findall(r"^STEP_PEAK_MIB ([\d.]+)$", out.stdout, re.M)
    return float(found[-1]) if found else None


def time_steps(model, optimizers, args, device, vocab):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device.type)
        t0 = time.time()
        for _ in range(args.grad_accum):
            with autocast_ctx(device.type):
                loss = model(inputs, targets) / args.grad_accum
            loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device.type)
        if i >= args.warmup:
            times.append(time.time() - t0)
    return sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour


def build_contenders(args, device, dim, n_head):
    """[(key, name, module to call, optimizers, FLOPs per token or None)] (just args.only if set)."""
    wanted = [args.only] if args.only else ["nanochat"] + ([] if args.no_baseline else ["reference", "classic"])
    config = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=dim)
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    contenders = []
    for key in wanted:
        torch.manual_seed(0)
        if key == "nanochat":
            model = GPT(config).to(device)
            contenders.append((key, "nanochat GPT (Muon+AdamW)", maybe_compile(model), model.setup_optimizers(),
                               model.estimate_flops()))
        elif key == "reference":
            model = GPT(config).to(device)
            contenders.append((key, "same arch, plain autograd", maybe_compile(ReferenceGPT(model)),
                               model.setup_optimizers(), model.estimate_flops()))
        else:
            model = ClassicGPT(args.vocab_size, args.seq_len, args.depth, dim, n_head).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            contenders.append((key, "classic GPT-2 style (AdamW)", maybe_compile(model), [opt], None))
    return contenders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (training uses many: the optimizer's fixed "
                             "cost per step, large for Muon, is then shared)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (median kept)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (best kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", type=int, default=0, help="torch.compile both models")
    parser.add_argument("--no-baseline", action="store_true", help="time only our model (no comparisons)")
    parser.add_argument("--only", choices=["nanochat", "reference", "classic"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dim = args.depth * args.aspect_ratio
    n_head = dim // args.head_dim
    tokens = args.batch_size * args.seq_len * args.grad_accum
    print(f"config: depth {args.depth}, width {dim}, {n_head} heads, vocab {args.vocab_size}, "
          f"seq {args.seq_len}, batch {args.batch_size} x {args.grad_accum} micro-batches ({tokens:,} tokens/step), "
          f"device {device}, "
          f"threads {torch.get_num_threads()}, compile {bool(args.compile)}")

    contenders = build_contenders(args, device, dim, n_head)
    if args.only:
        # memory probe (see step_memory_mib_cpu): one contender, its step's peak RSS over its setup
        _, _, fwd, opts, _ = contenders[0]
        reset_peak_rss()
        base_rss = rss_mib()
        time_steps(fwd, opts, args, device, args.vocab_size)
        print(f"STEP_PEAK_MIB {rss_mib('VmHWM') - base_rss:.1f}")
        return
    # all models stay alive and are timed in alternating rounds (best round kept): whichever ran
    # first would otherwise pay for the allocator's and caches' warm-up alone
    best = {name: float("inf") for _, name, *_ in contenders}
    memory = {}
    for _ in range(args.rounds):
        for key, name, fwd, opts, _ in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], time_steps(fwd, opts, args, device, args.vocab_size))
            if device.type == "cuda":
                memory[name] = max(memory.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if device.type == "cpu":
        memory = {name: step_memory_mib_cpu(key) for key, name, *_ in contenders}
    peak = get_peak_flops(device.type)
    rows = []
    for _, name, fwd, _, flops_per_token in contenders:
        dt = best[name]
        mfu = 100 * flops_per_token * tokens / dt / peak if (peak and flops_per_token) else None
        rows.append((name, sum(p.numel() for p in fwd.parameters()), dt, mfu, memory.get(name)))

    print(f"{'model':<28} {'params':>12} {'step ms':>9} {'tok/s':>10} {'MFU':>6} {'step MiB':>9}")
    for name, params, dt, mfu, mem in rows:
        mfu_txt = f"{mfu:.1f}%" if mfu is not None else "-"
        mem_txt = f"{mem:.0f}" if mem is not None else "-"
        print(f"{name:<28} {params:>12,} {dt * 1000:>9.1f} {tokens / dt:>10,.0f} {mfu_txt:>6} {mem_txt:>9}")
    ours_dt = rows[0][2]
    for name, _, dt, _, _ in rows[1:]:
        print(f"nanochat step vs {name}: {dt / ours_dt:.2f}x its speed")
    print("step MiB: peak memory of a step over the model and optimizer state "
          + ("(peak RSS growth, each model alone in a fresh process)" if device.type == "cpu"
             else "(max allocated, parameters and optimizer state included)"))


if __name__ == "__main__":
    main()
