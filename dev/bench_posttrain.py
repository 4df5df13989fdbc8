"""
Throughput of the post-training steps on a fixed small config: an SFT step, a DPO step and the DPO reference pass.
    python -m dev.bench_posttrain                       # CPU, depth 4, width 256, rows up to 256 tokens
    python -m dev.bench_posttrain --device cuda --depth 12 --max-seq-len 1024 --batch-size 16
"""
import argparse
import random
import time

import torch

from nanochat.chat_data import StepBatches, collate_padded, scaled_token_loss
from nanochat.common import autocast_ctx, synchronize
from nanochat.dpo import collate_pairs, pair_losses, reference_logps, tokenize_pairs
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.training import optimizer_step

# Random sentences of common English words: text a tokenizer trained on them splits realistically,
# with no dataset to download. The steps below go through chat_sft's and chat_dpo's own code
# (collation, loss scaling, the model's optimizer), and nothing is written to disk.
WORDS = ("the a of and to in is that it for on with as was he she they be at by this have from or one had not "
         "but what all were when we there can an your which their said if do will each about how up out them then "
         "many some so these would other into has more her two like him see time could no make than first been "
         "its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too any "
         "day same right look think also around another came come work three word must because does part").split()

def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu|cuda|mps")
    parser.add_argument("--depth", type=int, default=4, help="transformer layers")
    parser.add_argument("--width", type=int, default=256, help="model dimension (heads of 64)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (trained here)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="row length cap")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations (SFT) or pairs (DPO) per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per benchmark")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:  # a fixed thread count: CPU numbers that compare between runs on a shared machine
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(0)  # the same conversations and pairs on every run, so runs compare
    tok = Tokenizer.train_from_iterator(iter([sentence(rng, 40) for _ in range(2000)]), args.vocab_size)
    torch.manual_seed(0)  # the same initial weights too
    model = GPT(GPTConfig(sequence_len=args.max_seq_len, vocab_size=tok.get_vocab_size(), n_layer=args.depth,
                          n_head=args.width // 64, n_kv_head=args.width // 64, n_embd=args.width)).to(device)
    optimizer = model.setup_optimizer()  # the model's own optimizer (Muon + AdamW), as the stages build it
    print(f"model: depth {args.depth}, width {args.width}, {model.num_params():,} parameters | device {device} | "
          f"threads {torch.get_num_threads()} | batch {args.batch_size} | rows up to {args.max_seq_len} tokens")

    def conversation():  # a user turn and an assistant answer of varied lengths: padding, as in real SFT
        return {"messages": [{"role": "user", "content": sentence(rng, rng.randint(5, 60))},
                             {"role": "assistant", "content": " ".join(sentence(rng, 12) for _ in range(rng.randint(1, 10)))}]}

    def timed(fn, warmup, steps):  # (seconds, [what fn returned]) of `steps` calls after `warmup` untimed ones
        # the first steps pay for allocation and kernel selection: not timed
        for _ in range(warmup):
            fn()
        synchronize(device.type)  # GPU work is asynchronous: time what was done, not what was queued
        t0 = time.time()
        results = [fn() for _ in range(steps)]
        synchronize(device.type)
        return time.time() - t0, results

    def sft_step():  # padded conversations, the mean loss over the assistant tokens
        rows = [tok.render_conversation(conversation(), max_tokens=args.max_seq_len + 1) for _ in range(args.batch_size)]
        inputs, targets = collate_padded(rows, tok.get_bos_token_id(), device)
        batch = {"inputs": inputs, "targets": targets, "count": int((targets >= 0).sum()), "tokens": inputs.numel()}
        # one micro-batch per step; StepBatches still sets its loss_scale, as in chat_sft
        (batch, _), = StepBatches(iter([(batch, None)]), grad_accum=1).next_step()
        with autocast_ctx(device.type):
            loss = scaled_token_loss(model, batch)
        loss.backward()
        optimizer_step(model, optimizer, grad_clip=0)
        return inputs.numel(), batch["count"]
    # tok/s counts every position the model processes (padding included, as MFU does); the
    # "useful" rate only the supervised tokens (SFT) or the answer tokens (DPO)
    dt, counts = timed(sft_step, args.warmup, args.steps)
    tokens, useful = map(sum, zip(*counts))
    print(f"SFT step:        {dt / args.steps * 1000:7.0f} ms | {tokens / dt:9,.0f} tok/s | "
          f"{useful / dt:9,.0f} supervised tok/s ({useful / tokens:.0%} of the positions)")
    # DPO: the same user turn, its answer as the chosen one and a random answer as the rejected one
    def pair_item():
        c = conversation()
        return {"prompt_messages": c["messages"][:1], "chosen": c["messages"][1]["content"],
                "rejected": " ".join(sentence(rng, 12) for _ in range(rng.randint(1, 10)))}
    # the pairs go through chat_dpo's tokenize_pairs: the prompt rendered once, answers cut to fit
    pairs, _ = tokenize_pairs([pair_item() for _ in range(args.batch_size * (args.steps + args.warmup))], tok,
                              args.max_seq_len)
    pad = tok.get_bos_token_id()
    # the reference pass: once per run in chat_dpo, forward only (it leaves the model in train mode)
    ref_dt, (ref,) = timed(lambda: reference_logps(model, pairs, args.batch_size, pad, device), 0, 1)
    # the positions the pass really scores: two rows per pair, each as long as its ids minus one, no padding
    ref_tokens = sum(len(p) + len(c) + len(p) + len(r) - 2 for p, c, r in pairs)
    print(f"DPO reference:   {ref_dt / len(pairs) * 1000:7.1f} ms/pair | {ref_tokens / ref_dt:9,.0f} tok/s (forward only, "
          f"unpadded count)")
    cursor = {"i": 0}
    # the policy steps take the pairs in order, round again when the timed steps outnumber them
    def dpo_step():
        i = cursor["i"] % len(pairs)
        index = list(range(i, min(i + args.batch_size, len(pairs))))
        cursor["i"] += args.batch_size
        inputs, targets = collate_pairs([pairs[j] for j in index], pad, device)
        with autocast_ctx(device.type):
            losses, _ = pair_losses(model, {"inputs": inputs, "targets": targets, "ref": ref[index]}, beta=0.1)
        # each pair weighs the same, as chat_dpo's StepBatches makes it (one micro-batch per step here)
        losses.mean().backward()
        optimizer_step(model, optimizer, grad_clip=0)
        return inputs.numel(), int((targets >= 0).sum())
    dt, counts = timed(dpo_step, args.warmup, args.steps)
    tokens, useful = map(sum, zip(*counts))
    print(f"DPO step:        {dt / args.steps * 1000:7.0f} ms | {tokens / dt:9,.0f} tok/s | "
          f"{useful / dt:9,.0f} answer tok/s | {args.batch_size * args.steps / dt:6.1f} pairs/s")

if __name__ == "__main__":
    main()
