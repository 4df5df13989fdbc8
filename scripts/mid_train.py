"""
Midtraining: continue the base model on conversations (chat, multiple choice, tool use,
spelling, identity), so it learns the chat format and its special tokens before SFT.

    python -m scripts.mid_train                                   # the default mixture (downloads)
    python -m scripts.mid_train --data mine.jsonl                 # + your conversations
    python -m scripts.mid_train --data mine.jsonl --data-only     # only yours (validation: held out)
    python -m scripts.mid_train --persona persona.json            # + who-am-I conversations
    python -m scripts.mid_train --lora-rank 16                    # LoRA: adapters only, in mid_checkpoints/<tag>_lora/
    torchrun --nproc_per_node=8 -m scripts.mid_train

Like pretraining, rows are packed: each row of --max-seq-len + 1 tokens is filled best-fit with
whole rendered conversations, every row starting at a <|bos|>, no padding (a conversation longer
than a row is cut to one row). The loss is on every token by default (nanochat's midtraining);
--loss-on assistant keeps only what the assistant says. Resumes exactly (--resume): the loader
state (position in the mixture, conversations in the packing buffer) is in the checkpoint.
With --lora-rank the base stays frozen and only low-rank adapters train (nanochat/lora.py); only
they are saved, and load_model("mid", ..., model_tag="<tag>_lora") returns the base with them
merged. Midtraining teaches the chat special tokens, whose rows of the frozen embedding and
lm_head the base never trained: consider adding lm_head to --lora-targets.
Offline, give every dataset as a local file, e.g.
    --mixture gsm8k:train:$DATA/chat/gsm8k_train_chat.jsonl custom:$DATA/chat/selfinstruct_seed_tasks_chat.jsonl \\
              simplespelling:train:2000 --val-mixture gsm8k:test:$DATA/eval/gsm8k_test.jsonl
"""
import argparse
import random
import time


from nanochat.chat_data import PackedConversations, StepBatches, add_chat_data_args, build_chat_tasks, scaled_token_loss
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, print0
from nanochat.lora import add_lora_args
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.training import Trainer, add_training_args, finetune_outputs, grad_accum_steps, load_starting_model
from tasks.common import SPEC_HELP, DownloadError

DEFAULT_MIXTURE = ["smoltalk:train", "mmlu:auxiliary_train", "gsm8k:train", "simplespelling:train:200000",
                   "spelling:train:80000"]
DEFAULT_VAL = ["smoltalk:test", "mmlu:test[:5200]", "gsm8k:test[:420]"]


def estimate_tokens(task, tokenizer, max_tokens, sample=2000, seed=0):
    """Tokens in one pass over `task` (rendered, each cut to a row): exact for small mixtures,
    else extrapolated from a random sample (rendering 1M conversations just to count is slow)."""
    n = len(task)
    indices = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    counted = sum(len(tokenizer.render_conversation(task[i], max_tokens=max_tokens)[0]) for i in indices)
    return round(counted * n / len(indices)), n <= sample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--step", type=int, default=None, help="step of the base checkpoint (default: the last)")
    g.add_argument("--output-tag", default=None, help="save under mid_checkpoints/<this> (default: --model-tag; "
                                                      "with --lora-rank: <this>_lora, the adapters only)")
    g.add_argument("--loss-on", default="all", choices=["all", "assistant"],
                   help="train on every token of the rendered conversations, or only the assistant's")
    g.add_argument("--buffer-size", type=int, default=256, help="conversations to choose from when packing a row")
    add_chat_data_args(parser, DEFAULT_MIXTURE, DEFAULT_VAL, persona_examples=1000)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (at most one pass over the validation set)")
    add_training_args(parser)
    add_lora_args(parser.add_argument_group("LoRA"))
    parser.set_defaults(eval_every=150)
    args = parser.parse_args(argv)

    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    master = rank == 0
    try:  # read and check all the data before loading a model
        train_task, val_task = build_chat_tasks(args, DEFAULT_VAL)
    except (ValueError, FileNotFoundError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    orig_model, model, tokenizer, source_meta, tag = load_starting_model(args, "base", device, dynamic_shapes=False)
    token_bytes = get_token_bytes(device)

    T, B = args.max_seq_len or orig_model.config.sequence_len, args.device_batch_size
    grad_accum = grad_accum_steps(args.total_batch_size, B, T, world_size)
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        tokens, exact = estimate_tokens(train_task, tokenizer, T + 1)
        num_steps = max(1, round(args.num_epochs * tokens / args.total_batch_size))
        print0(f"training data: {'' if exact else '~'}{tokens:,} tokens per epoch")
    print0(f"steps: {num_steps:,} × {args.total_batch_size:,} tokens | grad accumulation: {grad_accum} | "
           f"loss on {args.loss_on} tokens")

    optimizers, checkpoint_dir, meta = finetune_outputs(args, orig_model, "mid", "base", tag, source_meta)
    trainer = Trainer(args, orig_model, optimizers, device=device, ddp=ddp, world_size=world_size, rank=rank,
                      checkpoint_dir=checkpoint_dir, num_steps=num_steps, grad_accum=grad_accum,
                      tokens_per_step=args.total_batch_size, meta=meta, stage="mid")
    trainer.maybe_resume()

    def loader(task, resume_state=None, what="mid conversations"):
        return PackedConversations(task, tokenizer, B, T, rank=rank, world_size=world_size, seed=args.seed,
                                   loss_on=args.loss_on, buffer_size=args.buffer_size, resume_state=resume_state,
                                   device=device, what=what)

    try:
        train_loader = loader(train_task, trainer.loader_state)
    except ValueError as e:  # a resume state that does not fit this data or these settings
        raise SystemExit(f"error: {e}")
    batches = StepBatches(train_loader, grad_accum, world_size, device)

    def compute_loss(_model, batch):
        return scaled_token_loss(model, batch)

    # at most one pass over the validation conversations: more would only repeat them
    val_tokens, _ = estimate_tokens(val_task, tokenizer, T + 1)
    eval_steps = max(1, min(args.eval_tokens, val_tokens) // (B * T * world_size))

    def evaluate(step):
        val = ((b["inputs"], b["targets"]) for b, _ in loader(val_task, what="mid validation"))
        with autocast_ctx(device.type):
            bpb = evaluate_bpb(model, val, eval_steps, token_bytes)
        stats = train_loader.stats  # packing waste: conversations cut off to fill a row
        cropped = stats["cropped"] / max(1, stats["rows"] * (T + 1) + stats["cropped"])
        print0(f"step {step:05d} | val bpb {bpb:.4f} | packing cropped {cropped:.1%} of the tokens read (rank 0)")
        return {"val_bpb": bpb}

    t0 = time.time()
    last_eval = trainer.run(batches, compute_loss, evaluate, eval_at_start=True)
    print0(f"done: {trainer.step} steps in {(time.time() - t0) / 60:.1f} min | "
           f"val bpb {last_eval.get('val_bpb', float('nan')):.4f}")
    if master:
        get_report().log(section="Midtraining", data=[
            vars(args),
            {"source": f"base {tag} step {source_meta['step']}", "training_conversations": len(train_task),
             "steps": num_steps, "tokens": num_steps * args.total_batch_size,
             "val_bpb": last_eval.get("val_bpb"), "training_time_min": round(trainer.train_time / 60, 2)},
        ])
    compute_cleanup()
    return trainer


if __name__ == "__main__":
    main()
