"""
Supervised fine-tuning (SFT): teach the model to answer like an assistant, one conversation per
row, with the loss only on what the assistant says.

    python -m scripts.chat_sft                                   # from the mid model, default mixture
    python -m scripts.chat_sft --data mine.jsonl                 # + your conversations
    python -m scripts.chat_sft --data mine.jsonl --data-only     # only yours (validation: held out)
    python -m scripts.chat_sft --persona persona.json            # + who-am-I conversations
    python -m scripts.chat_sft --lora-rank 16                    # LoRA: adapters only, in chatsft_checkpoints/<tag>_lora/
    torchrun --nproc_per_node=8 -m scripts.chat_sft

Each micro-batch holds --device-batch-size conversations padded to the longest one; targets are
-1 on padding, on <|bos|>, user turns, <|assistant_start|> and tool outputs, so the loss covers the
assistant's text, its tool calls and <|assistant_end|>. A conversation longer than --max-seq-len
is truncated (counted and printed). The loss of a step is the mean over all its supervised
tokens on all ranks (see nanochat/chat_data.py), so one process with gradient accumulation
equals torchrun. With --lora-rank the source model stays frozen and only low-rank adapters train
(nanochat/lora.py); only they are saved (~1-2% of the weights), and load_model("sft", ..., model_tag="<tag>_lora"),
chat_cli and chat_web (--model-tag <tag>_lora) load the source with them merged.
Offline, give every dataset as a local file, e.g.
    --mixture gsm8k:train:$DATA/chat/gsm8k_train_chat.jsonl custom:$DATA/chat/selfinstruct_seed_tasks_chat.jsonl \\
    --val-mixture gsm8k:test:$DATA/eval/gsm8k_test.jsonl --eval-tasks arc:easy:test:$DATA/eval/arc_easy.jsonl
"""
import argparse
import time

import torch
import torch.distributed as dist

from nanochat.chat_data import (StepBatches, add_chat_data_args, build_chat_tasks, collate_padded, padded_batches,
                                scaled_token_loss)
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, print0
from nanochat.lora import add_lora_args
from nanochat.report import get_report
from nanochat.training import Trainer, add_training_args, finetune_outputs, load_starting_model
from tasks.common import SPEC_HELP, DownloadError, build_task

DEFAULT_MIXTURE = ["arc:easy:train", "arc:challenge:train", "gsm8k:train", "smoltalk:train[:10000]",
                   "simplespelling:train:300", "spelling:train:300"]
DEFAULT_VAL = ["smoltalk:test"]
DEFAULT_EVAL_TASKS = ["mmlu:test", "arc:easy:test"]


# -----------------------------------------------------------------------------
# Quick evaluations (every rank takes every world_size-th item; counts are summed over ranks)

def _all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def validation_loss(model, tokenizer, task, num_examples, batch_size, max_seq_len, device, rank, world_size):
    """Mean loss per supervised token over the first num_examples conversations of `task`."""
    total, count = 0.0, 0
    mine = list(range(rank, min(num_examples, len(task)), world_size))
    for start in range(0, len(mine), batch_size):
        rows = [tokenizer.render_conversation(task[i], max_tokens=max_seq_len + 1) for i in mine[start:start + batch_size]]
        inputs, targets = collate_padded(rows, tokenizer.get_bos_token_id(), device)
        with autocast_ctx(device.type):
            total += model(inputs, targets, loss_reduction="none").sum().item()
        count += (targets >= 0).sum().item()
    total, count = _all_reduce_sum([total, count], device)
    return total / max(count, 1)


@torch.no_grad()
def categorical_accuracy(model, tokenizer, task, num_items, batch_size, max_seq_len, device, rank, world_size):
    """Multiple choice by the logits: of the answer letters, the one the model finds most likely
    right after <|assistant_start|>, compared with the correct letter."""
    correct, seen = 0, 0
    mine = list(range(rank, min(num_items, len(task)), world_size))
    for start in range(0, len(mine), batch_size):
        conversations = [task[i] for i in mine[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-max_seq_len:] for c in conversations]
        length = max(map(len, prompts))
        inputs = torch.full((len(prompts), length), tokenizer.get_bos_token_id(), dtype=torch.long)
        for i, p in enumerate(prompts):
            inputs[i, :len(p)] = torch.tensor(p)
        with autocast_ctx(device.type):
            logits = model(inputs.to(device))
        for i, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(letter)[0] for letter in letters]
            guess = letters[logits[i, len(prompt) - 1, letter_ids].argmax().item()]
            correct += task.evaluate(conversation, guess)
            seen += 1
    correct, seen = _all_reduce_sum([correct, seen], device)
    return correct / max(seen, 1)


@torch.no_grad()
def generative_accuracy(model, tokenizer, task, num_items, max_tokens, max_seq_len, device, rank, world_size):
    """Greedy answers (through the Engine, with its tools) graded by the task."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    conversations = [task[i] for i in range(rank, min(num_items, len(task)), world_size)]
    prompts = [tokenizer.render_for_completion(c)[-max_seq_len:] for c in conversations]
    correct = 0
    if prompts:
        with autocast_ctx(device.type):
            outputs = engine.generate_multi(prompts, max_tokens=max_tokens, temperature=0)
        for conversation, prompt, (results, _) in zip(conversations, prompts, outputs):
            correct += task.evaluate(conversation, tokenizer.decode(results[0][len(prompt):]))
    correct, seen = _all_reduce_sum([correct, len(conversations)], device)
    return correct / max(seen, 1)


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--source", default="mid", choices=["mid", "base"], help="which checkpoint to fine-tune")
    g.add_argument("--step", type=int, default=None, help="step of the source checkpoint (default: the last)")
    g.add_argument("--output-tag", default=None, help="save under chatsft_checkpoints/<this> (default: --model-tag; "
                                                      "with --lora-rank: <this>_lora, the adapters only)")
    add_chat_data_args(parser, DEFAULT_MIXTURE, DEFAULT_VAL, persona_examples=300)
    g = parser.add_argument_group("batches")
    g.add_argument("--examples-per-step", type=int, default=32,
                   help="conversations per optimizer step over all ranks (gradient accumulation fills the gap)")
    g = parser.add_argument_group("quick evaluations")
    g.add_argument("--eval-examples", type=int, default=1000, help="validation conversations per evaluation")
    g.add_argument("--eval-tasks", nargs="*", default=DEFAULT_EVAL_TASKS,
                   help="task specs to score: multiple choice by letter logits, others by greedy generation "
                        "(none: skip)")
    g.add_argument("--eval-items", type=int, default=256, help="items per --eval-tasks task")
    g.add_argument("--eval-max-tokens", type=int, default=128, help="generation budget for generative tasks")
    add_training_args(parser)
    add_lora_args(parser.add_argument_group("LoRA"))
    # fine-tuning defaults: small LRs decaying linearly to 0; padded rows vary in length (no compile)
    parser.set_defaults(device_batch_size=4, init_lr_frac=0.02, warmdown_ratio=1.0, eval_every=100,
                        compile="0", total_batch_size=None)
    args = parser.parse_args(argv)
    if args.total_batch_size is not None:
        raise SystemExit("--total-batch-size counts tokens; SFT steps are counted in conversations: "
                         "use --examples-per-step")

    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    master = rank == 0
    try:  # read and check all the data before loading a model
        train_task, val_task = build_chat_tasks(args, DEFAULT_VAL)
        eval_tasks = {spec: build_task(spec, "test") for spec in args.eval_tasks}
    except (ValueError, FileNotFoundError, DownloadError) as e:
        raise SystemExit(f"error: {e}")

    orig_model, model, tokenizer, source_meta, tag = load_starting_model(args, args.source, device, dynamic_shapes=True)
    T = args.max_seq_len or orig_model.config.sequence_len
    B = args.device_batch_size
    if args.examples_per_step % (B * world_size) != 0:
        raise SystemExit(f"--examples-per-step={args.examples_per_step} must be a multiple of --device-batch-size × "
                         f"world_size = {B}×{world_size} = {B * world_size}")
    grad_accum = args.examples_per_step // (B * world_size)
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        num_steps = max(1, round(args.num_epochs * len(train_task) / args.examples_per_step))
    print0(f"steps: {num_steps:,} × {args.examples_per_step} conversations | grad accumulation: {grad_accum} | "
           f"max {T} tokens per conversation")

    optimizers, checkpoint_dir, meta = finetune_outputs(args, orig_model, "sft", args.source, tag, source_meta)
    batches = None  # StepBatches below; the Trainer asks it for the tokens of each step
    trainer = Trainer(args, orig_model, optimizers, device=device, ddp=ddp, world_size=world_size, rank=rank,
                      checkpoint_dir=checkpoint_dir, num_steps=num_steps, grad_accum=grad_accum,
                      tokens_per_step=lambda: batches.step_tokens, meta=meta, stage="sft")
    trainer.maybe_resume()

    pad_id = tokenizer.get_bos_token_id()  # any id: padded positions have target -1
    truncated = {"rows": 0, "truncated": 0}

    def render(conversation):
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**9)
        truncated["rows"] += 1
        if len(ids) > T + 1:
            truncated["truncated"] += 1
            ids, mask = ids[:T + 1], mask[:T + 1]
        return ids, mask

    def micro_batches(conversations):
        for items, state in conversations:
            inputs, targets = collate_padded([row for _, row in items], pad_id, device)
            yield {"inputs": inputs, "targets": targets, "count": (targets >= 0).sum().item(),
                   "tokens": inputs.numel()}, state

    try:
        conversations = padded_batches(train_task, render, B, rank=rank, world_size=world_size, seed=args.seed,
                                       resume_state=trainer.loader_state, what="sft conversations")
    except ValueError as e:  # a resume state that does not fit this data or these settings
        raise SystemExit(f"error: {e}")
    batches = StepBatches(micro_batches(conversations), grad_accum, world_size, device)

    def compute_loss(_model, batch):
        return scaled_token_loss(model, batch)

    def evaluate(step):
        out = {"val_loss": validation_loss(orig_model, tokenizer, val_task, args.eval_examples, B, T, device,
                                           rank, world_size)}
        for spec, task in eval_tasks.items():
            if task.eval_type == "categorical":
                acc = categorical_accuracy(orig_model, tokenizer, task, args.eval_items, B, T, device, rank, world_size)
            else:
                acc = generative_accuracy(orig_model, tokenizer, task, args.eval_items, args.eval_max_tokens, T,
                                          device, rank, world_size)
            out[f"acc/{spec}"] = acc
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items())
               + f" | truncated conversations so far: {truncated['truncated']} of {truncated['rows']}")
        return out

    t0 = time.time()
    last_eval = trainer.run(batches, compute_loss, evaluate, eval_at_start=True)
    print0(f"done: {trainer.step} steps in {(time.time() - t0) / 60:.1f} min | "
           + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
    if master:
        get_report().log(section="Chat SFT", data=[
            vars(args),
            {"source": f"{args.source} {tag} step {source_meta['step']}", "training_conversations": len(train_task),
             "truncated_conversations": truncated["truncated"], "steps": num_steps,
             "training_time_min": round(trainer.train_time / 60, 2), **last_eval},
        ])
    compute_cleanup()
    return trainer


if __name__ == "__main__":
    main()
