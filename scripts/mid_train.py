"""Midtraining: continue the base model on conversations, so it learns the chat format and its special tokens before SFT.
    python -m scripts.mid_train --data mine.jsonl --data-only     # only yours (validation: held out); or torchrun
    python -m scripts.mid_train --persona persona.json --lora-rank 16"""
import argparse
import random
import time

import torch

from nanochat import training
from nanochat.chat_data import PackedConversations, StepBatches, scaled_token_loss
from nanochat.common import HelpFormatter, autocast_ctx, compute_init, exit_on, print0
from nanochat.download import DownloadError
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from tasks.specs import SPEC_HELP, build_chat_tasks

# chat, multiple choice, tool use (GSM8K's calculator) and spelling; --persona adds identity. Offline, give every
# dataset as a local file: --mixture gsm8k:train:$DATA/chat/gsm8k_train_chat.jsonl custom:$DATA/chat/mine.jsonl
# --val-mixture gsm8k:test:$DATA/eval/gsm8k_test.jsonl
DEFAULT_MIXTURE = ["smoltalk:train", "mmlu:auxiliary_train", "gsm8k:train", "simplespelling:train:200000",
                   "spelling:train:80000"]
DEFAULT_VAL = ["smoltalk:test", "mmlu:test[:5200]", "gsm8k:test[:420]"]

def estimate_tokens(task, tokenizer, max_tokens, sample=2000, seed=0):
    """(tokens in one pass over `task`, each conversation cut to a row; whether that is exact)."""
    # exact for a small task, else extrapolated from a random sample: rendering 1M conversations just to count is slow
    n = len(task)
    indices = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    counted = sum(len(tokenizer.render_conversation(task[i], max_tokens=max_tokens)[0]) for i in indices)
    return round(counted * n / len(indices)), n <= sample

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP, formatter_class=HelpFormatter)
    g = parser.add_argument_group("midtraining")
    # nanochat's midtraining trains on every token, like pretraining; "assistant" is SFT's masking
    g.add_argument("--loss-on", default="all", choices=["all", "assistant"],
                   help="train on every token of the rendered conversations, or only the assistant's")
    g.add_argument("--buffer-size", type=int, default=256, help="conversations to choose from when packing a row")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288,
                   help="validation tokens per evaluation (at most one pass over the validation set)")
    training.add_finetuning_flags(parser, "base", DEFAULT_MIXTURE, DEFAULT_VAL)
    parser.set_defaults(eval_every=150, persona_examples=1000)
    args = parser.parse_args(argv)
    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    with exit_on(ValueError, FileNotFoundError, DownloadError):  # read and check all the data before loading a model
        train_task, val_task = build_chat_tasks(args, DEFAULT_VAL)
    orig_model, optimizer, tokenizer, checkpoint_dir, meta = training.load_starting_model(args, args.source, "mid", device)
    model = training.maybe_compile(orig_model, args, device, dynamic=False)  # packed rows: one static shape
    # validation in bits per byte, as base_train reports it: the two stages' curves compare
    token_bytes = get_token_bytes(device)
    # Rows of T+1 tokens, each packed best-fit with whole conversations (see nanochat/chat_data.py)
    T, B = args.max_seq_len or orig_model.config.sequence_len, args.device_batch_size
    grad_accum = training.grad_accum_steps(args.total_batch_size, B * T * world_size,
                                           "--total-batch-size (device_batch_size × seq_len × world_size)")
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:  # --num-epochs passes over the training conversations, in steps of --total-batch-size tokens
        tokens, exact = estimate_tokens(train_task, tokenizer, T + 1)
        num_steps = max(1, round(args.num_epochs * tokens / args.total_batch_size))
        print0(f"training data: {'' if exact else '~'}{tokens:,} tokens per epoch")
    print0(f"steps: {num_steps:,} × {args.total_batch_size:,} tokens | grad accumulation: {grad_accum} | "
           f"loss on {args.loss_on} tokens")
    # --resume: the packer's state too (its buffer of conversations), so the rows continue exactly
    step, loader_state, saved = training.resume(args.resume, checkpoint_dir, orig_model, optimizer, meta, device)
    def loader(task, resume_state=None, what="mid conversations"):
        return PackedConversations(task, tokenizer, B, T, rank=rank, world_size=world_size, seed=args.seed,
                                   loss_on=args.loss_on, buffer_size=args.buffer_size, resume_state=resume_state,
                                   device=device, what=what)
    with exit_on(ValueError):  # a resume state that does not fit this data or these settings
        train_loader = loader(train_task, loader_state)
    batches = StepBatches(train_loader, grad_accum, world_size, device)
    # at most one pass over the validation conversations: more would only repeat them
    val_tokens, _ = estimate_tokens(val_task, tokenizer, T + 1)
    eval_steps = max(1, min(args.eval_tokens, val_tokens) // (B * T * world_size))
    def evaluate(step):
        model.eval()
        val = ((b["inputs"], b["targets"]) for b, _ in loader(val_task, what="mid validation"))
        with autocast_ctx(device.type):
            bpb = evaluate_bpb(model, val, eval_steps, token_bytes)
        stats = train_loader.stats  # packing waste: conversations cut off to fill a row
        cropped = stats["cropped"] / max(1, stats["rows"] * (T + 1) + stats["cropped"])
        print0(f"step {step:05d} | val bpb {bpb:.4f} | packing cropped {cropped:.1%} of the tokens read (rank 0)")
        model.train()
        return log.evaluated(step, {"val_bpb": bpb})
    # -------------------------------------------------------------------------
    # The training loop: the starting model is evaluated first (on a fresh run), to compare with
    log = training.TrainLog("mid", args, num_steps, orig_model.estimate_flops(), world_size, device.type, saved)
    last_eval = evaluate(0) if step == 0 and args.eval_every > 0 else {}
    t_start = time.time()
    step_batches = batches.next_step()
    while step < num_steps:
        lrm = training.set_schedule(optimizer, step, num_steps, args)
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        for batch, loader_state in step_batches:
            with autocast_ctx(device.type):
                loss = scaled_token_loss(model, batch)  # this micro-batch's share of the step's mean
            # loss_scale counted grad_accum in: now every supervised token of the step weighs the same
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        # packed while the device still runs this backward: at pretraining-sized steps, CPU work worth hiding
        step_batches = batches.next_step()
        training.optimizer_step(orig_model, optimizer, args.grad_clip)
        step += 1
        log.step(step, t0, lrm, loss_sum / grad_accum, tokens=grad_accum * B * T)  # packed rows: no padding
        if training.is_due(step, args.eval_every, num_steps):
            last_eval = evaluate(step)
        if training.is_due(step, args.save_every, num_steps):
            # loader_state: after this step's last micro-batch, not after the next step's, read ahead
            training.save(checkpoint_dir, step, orig_model, optimizer, dict(meta, **last_eval), loader_state, log)
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min | "
           f"val bpb {last_eval.get('val_bpb', float('nan')):.4f}")
    get_report().log(section="Midtraining", data=[vars(args), {  # (a no-op off rank 0)
        "source": training.describe_lineage(meta["source"]), "training_conversations": len(train_task),
        "steps": num_steps, "tokens": num_steps * args.total_batch_size, "val_bpb": last_eval.get("val_bpb"),
        "training_time_min": round(log.train_time / 60, 2)}])
    return training.finish(log, orig_model, meta)  # (and the process group torn down)

if __name__ == "__main__":
    main()
