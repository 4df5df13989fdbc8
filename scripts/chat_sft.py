"""Supervised fine-tuning (SFT): teach the model to answer like an assistant, the loss only on what the assistant says.
    python -m scripts.chat_sft --data mine.jsonl --data-only     # only yours (validation: held out); or torchrun
    python -m scripts.chat_sft --persona persona.json --lora-rank 16"""
import argparse
import time

import torch

from nanochat import training
from nanochat.chat_data import StepBatches, collate_padded, padded_batches, scaled_token_loss
from nanochat.common import HelpFormatter, autocast_ctx, compute_init, exit_on, print0
from nanochat.download import DownloadError
from nanochat.report import get_report
from nanochat.task_eval import all_reduce_sum, assistant_nll, engine_generate_fn, run_categorical, run_generative
from tasks.specs import SPEC_HELP, build_chat_tasks, build_tasks

# Offline, give every dataset as a local file, e.g. --mixture gsm8k:train:$DATA/chat/gsm8k_train_chat.jsonl
# --val-mixture gsm8k:test:$DATA/eval/gsm8k_test.jsonl --eval-tasks arc:easy:test:$DATA/eval/arc_easy.jsonl
DEFAULT_MIXTURE = ["arc:easy:train", "arc:challenge:train", "gsm8k:train", "smoltalk:train[:10000]",
                   "simplespelling:train:300", "spelling:train:300"]
DEFAULT_VAL = ["smoltalk:test"]
DEFAULT_EVAL_TASKS = ["mmlu:test", "arc:easy:test"]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP, formatter_class=HelpFormatter)
    g = parser.add_argument_group("SFT")
    g.add_argument("--examples-per-step", type=int, default=32,
                   help="conversations per optimizer step over all ranks (gradient accumulation fills the gap)")
    g.add_argument("--eval-examples", type=int, default=1000, help="validation conversations per evaluation")
    g.add_argument("--eval-tasks", nargs="*", default=None, help="task specs to score: multiple choice by letter logits, "
                   f"others by greedy generation (default: {' '.join(DEFAULT_EVAL_TASKS)}; none with --data-only or no specs)")
    g.add_argument("--eval-items", type=int, default=256, help="items per --eval-tasks task")
    g.add_argument("--eval-max-tokens", type=int, default=128, help="generation budget for generative tasks")
    training.add_finetuning_flags(parser, "mid", DEFAULT_MIXTURE, DEFAULT_VAL)
    # fine-tuning: LRs at 0.2 of pretraining's, decaying linearly to 0 (at 0.02, 50 steps left a CPU-preset model
    # ignorant of its --persona: tests/test_chat_sft.py); padded rows vary in length, so no compile
    parser.set_defaults(device_batch_size=4, init_lr_frac=0.2, warmdown_ratio=1.0, eval_every=100,
                        compile="0", total_batch_size=None)
    args = parser.parse_args(argv)
    # None by default here, so that a --total-batch-size given out of habit (it counts tokens) is refused, not ignored
    if args.total_batch_size is not None:
        raise SystemExit("--total-batch-size counts tokens; SFT steps are counted in conversations: "
                         "use --examples-per-step")
    if args.eval_tasks is None:  # not given: --data-only means only your data, so no default downloads either
        args.eval_tasks = [] if args.data_only else DEFAULT_EVAL_TASKS
    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    with exit_on(ValueError, FileNotFoundError, DownloadError):  # read and check all the data before loading a model
        train_task, val_task = build_chat_tasks(args, DEFAULT_VAL)
        eval_tasks = dict(zip(args.eval_tasks, build_tasks(args.eval_tasks, "test", "--eval-tasks", scored=True)))
    orig_model, optimizer, tokenizer, checkpoint_dir, meta = training.load_starting_model(args, args.source, "sft", device)
    # dynamic shapes: the padded rows change length from one micro-batch to the next
    model = training.maybe_compile(orig_model, args, device, dynamic=True)
    # How long: --num-epochs passes over the training conversations, in steps of --examples-per-step
    T, B = args.max_seq_len or orig_model.config.sequence_len, args.device_batch_size
    grad_accum = training.grad_accum_steps(args.examples_per_step, B * world_size,
                                           "--examples-per-step (device_batch_size × world_size)")
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, round(args.num_epochs * len(train_task) / args.examples_per_step))
    print0(f"steps: {num_steps:,} × {args.examples_per_step} conversations | grad accumulation: {grad_accum} | "
           f"max {T} tokens per conversation")
    # --resume: the sampler's position too, so the same conversations follow in the same order
    step, loader_state, saved = training.resume(args.resume, checkpoint_dir, orig_model, optimizer, meta, device)
    # One conversation per row, padded to the longest of the micro-batch; targets are -1 on the padding and
    # on everything the assistant does not say: its text, tool calls and <|assistant_end|> are what it learns
    pad_id = tokenizer.get_bos_token_id()  # any id: padded positions have target -1
    truncated = dict((saved or {}).get("truncated", {"rows": 0, "truncated": 0}))  # kept across resumes
    def render(conversation):
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**9)
        truncated["rows"] += 1
        truncated["truncated"] += len(ids) > T + 1  # too long: cut to a row, and counted (printed at every evaluation)
        return ids[:T + 1], mask[:T + 1]
    def micro_batches(conversations):
        for items, state in conversations:
            rows = [row for _, row in items]
            inputs, targets = collate_padded(rows, pad_id, device)
            # the supervised count from the host-side masks: reading it off the device would sync
            count = sum(sum(mask[1:]) for _, mask in rows)
            yield {"inputs": inputs, "targets": targets, "count": count, "tokens": inputs.numel()}, state
    with exit_on(ValueError):  # a resume state that does not fit this data or these settings
        conversations = padded_batches(train_task, render, B, rank=rank, world_size=world_size, seed=args.seed,
                                       resume_state=loader_state, what="sft conversations")
    batches = StepBatches(micro_batches(conversations), grad_accum, world_size, device)
    # the same validation conversations at every evaluation, so that the val_loss curve compares
    val_conversations = [val_task[i] for i in range(min(args.eval_examples, len(val_task)))]
    generate = engine_generate_fn(orig_model, tokenizer, max_new_tokens=args.eval_max_tokens)  # greedy
    def evaluate(step):
        """Validation loss per supervised token, and the accuracy on each --eval-tasks task."""
        model.eval()
        with autocast_ctx(device.type):
            nll, count, _, _ = assistant_nll(orig_model, tokenizer, val_conversations, device, B, T)
            out = {"val_loss": nll / max(count, 1)}
            for spec, task in eval_tasks.items():
                # this rank's share of the first --eval-items; the counts are summed over ranks below
                mine = list(range(rank, min(args.eval_items, len(task)), world_size))
                if task.eval_type == "categorical":
                    right, asked = run_categorical(orig_model, tokenizer, task, mine, device, B, T)
                else:  # all of this rank's prompts decoded in one batch
                    right, asked = run_generative(generate, tokenizer, task, mine, max(1, len(mine)), T)
                right, asked = all_reduce_sum([right, asked], device)
                out[f"acc/{spec}"] = right / max(asked, 1)
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items())
               + f" | truncated conversations so far: {truncated['truncated']} of {truncated['rows']}")
        model.train()
        return log.evaluated(step, out)
    # -------------------------------------------------------------------------
    # The training loop, after a look at the starting model (on a fresh run)
    log = training.TrainLog("sft", args, num_steps, orig_model.estimate_flops(), world_size, device.type, saved)
    if step == 0 and args.eval_every > 0:
        evaluate(0)
    last_eval, t_start = {}, time.time()
    # a whole step is read at once: its supervised count (summed over micro-batches and ranks) sets loss_scale
    step_batches = batches.next_step()
    while step < num_steps:
        lrm = training.set_schedule(optimizer, step, num_steps, args)
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        for batch, loader_state in step_batches:
            with autocast_ctx(device.type):
                loss = scaled_token_loss(model, batch)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        step_batches = batches.next_step()  # collated while the device still runs this backward
        training.optimizer_step(orig_model, optimizer, args.grad_clip)
        step += 1
        # tokens: every position of the padded rows, padding included (what the device computed, as MFU counts)
        log.step(step, t0, lrm, loss_sum / grad_accum, tokens=batches.step_tokens)
        if training.is_due(step, args.eval_every, num_steps):
            last_eval = evaluate(step)
        if training.is_due(step, args.save_every, num_steps):
            # the truncation counts go in the meta: a resumed run keeps counting from them
            training.save(checkpoint_dir, step, orig_model, optimizer, dict(meta, **last_eval, truncated=truncated),
                          loader_state, log)
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min | "
           + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
    get_report().log(section="Chat SFT", data=[vars(args), {  # (a no-op off rank 0)
        "source": training.describe_lineage(meta["source"]),
        "training_conversations": len(train_task), "truncated_conversations": truncated["truncated"],
        "steps": num_steps, "training_time_min": round(log.train_time / 60, 2), **last_eval}])
    return training.finish(log, orig_model, meta)  # (and the process group torn down)

if __name__ == "__main__":
    main()
