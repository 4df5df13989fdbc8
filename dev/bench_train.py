"""
Training-step throughput: tokens/s and peak memory of one full optimizer step (forward,
backward, Muon + AdamW) of our GPT at a given config, and MFU on GPU. For scale, the same
step of a classic GPT-2-style model (learned positions, LayerNorm, GELU, fused QKV, SDPA,
AdamW) with the same width, depth, sequence and batch — the architecture of the well-known
small-GPT trainers — is timed in the same process.

    python -m dev.bench_train                      # CPU-sized default
    python -m dev.bench_train --depth 12 --seq-len 2048 --batch-size 16 --device cuda --compile 1
"""
import argparse
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autocast_ctx, get_peak_flops, synchronize
from nanochat.gpt import GPT, GPTConfig


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


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB (process peak)


def time_steps(model, optimizers, args, device, vocab):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device.type)
        t0 = time.time()
        with autocast_ctx(device.type):
            loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device.type)
        if i >= args.warmup:
            times.append(time.time() - t0)
    return sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (median kept)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (best kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", type=int, default=0, help="torch.compile both models")
    parser.add_argument("--no-baseline", action="store_true", help="skip the classic GPT-2-style comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dim = args.depth * args.aspect_ratio
    n_head = dim // args.head_dim
    tokens = args.batch_size * args.seq_len
    print(f"config: depth {args.depth}, width {dim}, {n_head} heads, vocab {args.vocab_size}, "
          f"seq {args.seq_len}, batch {args.batch_size} ({tokens:,} tokens/step), device {device}, "
          f"threads {torch.get_num_threads()}, compile {bool(args.compile)}")

    # both models stay alive and are timed in alternating rounds (best round kept): whichever ran
    # first would otherwise pay for the allocator's and caches' warm-up alone
    torch.manual_seed(0)
    ours = GPT(GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                         n_head=n_head, n_kv_head=n_head, n_embd=dim)).to(device)
    contenders = [("nanochat GPT (Muon+AdamW)", ours, torch.compile(ours) if args.compile else ours,
                   ours.setup_optimizers(), ours.estimate_flops())]
    if not args.no_baseline:
        torch.manual_seed(0)
        classic = ClassicGPT(args.vocab_size, args.seq_len, args.depth, dim, n_head).to(device)
        opt = torch.optim.AdamW(classic.parameters(), lr=1e-4, fused=device.type == "cuda")
        contenders.append(("classic GPT-2 style (AdamW)", classic, torch.compile(classic) if args.compile else classic,
                           [opt], None))
    best = {name: float("inf") for name, *_ in contenders}
    for _ in range(args.rounds):
        for name, _, fwd, opts, _ in contenders:
            best[name] = min(best[name], time_steps(fwd, opts, args, device, args.vocab_size))
    peak = get_peak_flops(device.type)
    rows = []
    for name, module, _, _, flops_per_token in contenders:
        dt = best[name]
        mfu = 100 * flops_per_token * tokens / dt / peak if (peak and flops_per_token) else None
        rows.append((name, sum(p.numel() for p in module.parameters()), dt, mfu, peak_memory_mib(device)))

    print(f"{'model':<28} {'params':>12} {'step ms':>9} {'tok/s':>10} {'MFU':>6} {'peak MiB':>9}")
    for name, params, dt, mfu, mem in rows:
        mfu_txt = f"{mfu:.1f}%" if mfu is not None else "-"
        print(f"{name:<28} {params:>12,} {dt * 1000:>9.1f} {tokens / dt:>10,.0f} {mfu_txt:>6} {mem:>9.0f}")
    if device.type == "cpu":
        print("note: peak MiB on CPU is the whole process's peak RSS (both models alive)")


if __name__ == "__main__":
    main()
