"""
Direct Preference Optimization (DPO): from pairs of answers to the same prompt, one preferred,
make the preferred answer more likely relative to the rejected one, measured against the
starting model (the frozen reference). See nanochat/dpo.py for the loss.

    python -m scripts.chat_dpo                                  # from the SFT model, UltraFeedback pairs
    python -m scripts.chat_dpo --data pairs.jsonl --data-only   # only your pairs (validation: held out)
    python -m scripts.chat_dpo --persona persona.json           # + "I am <name>" over generic answers
    python -m scripts.chat_dpo --loss ipo --length-norm --sft-weight 0.1
    python -m scripts.chat_dpo --lora-rank 16                   # LoRA: adapters only, in chatdpo_checkpoints/<tag>_lora/
    torchrun --nproc_per_node=8 -m scripts.chat_dpo

Pairs come as {"prompt": str | messages, "chosen": str, "rejected": str} (tasks/preferences.py).
The reference log-probs of every pair are computed in one pass before training, so only one
model is in memory while training. With --lora-rank only low-rank adapters train and the
reference is the very same network with its adapters switched off (disable_lora): no second
copy, and only the adapters are saved (load_model("dpo", ..., model_tag="<tag>_lora") merges them).
A pair that does not fit --max-seq-len has its prompt cut from the left first, then its answers
from the right (never below --min-response-tokens); pairs that cannot fit, or are empty or
identical (after tokenization or truncation), are dropped and counted.
Logged, on training steps and on held-out pairs: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies (beta * log-ratio to the reference), logps/chosen, logps/rejected.
--device-batch-size counts pairs (each is two rows, chosen and rejected).
Offline: --mixture preferences:skip_bad:$DATA/preference/hh_rlhf_harmless_base_test.jsonl
"""
import argparse
import time

import torch
import torch.distributed as dist

from nanochat.chat_data import StepBatches, build_chat_tasks, padded_batches
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, print0
from nanochat.dpo import LOSS_TYPES, collate_pairs, describe_counts, pair_losses, reference_logps, tokenize_pairs
from nanochat.lora import add_lora_args, disable_lora
from nanochat.report import get_report
from nanochat.training import Trainer, add_training_args, finetune_outputs, load_starting_model
from tasks.common import SPEC_HELP, DownloadError

DEFAULT_MIXTURE = ["preferences:train"]
DEFAULT_VAL = ["preferences:test"]
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")


def build_preference_tasks(args):
    """(train, val) mixtures of preference items; every file is checked before a model is loaded."""
    from tasks.identity import IdentityPreferences, load_persona
    from tasks.preferences import Preferences
    own = [Preferences(path) for path in args.data]
    if args.persona:
        own.append(IdentityPreferences(load_persona(args.persona), n=args.persona_pairs))
    return build_chat_tasks(args, DEFAULT_VAL, own=own, noun="pairs")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--source", default="sft", choices=["sft", "mid", "base"], help="which checkpoint to start from")
    g.add_argument("--step", type=int, default=None, help="step of the source checkpoint (default: the last)")
    g.add_argument("--output-tag", default=None, help="save under chatdpo_checkpoints/<this> (default: --model-tag; "
                                                      "with --lora-rank: <this>_lora, the adapters only)")
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference (KL weight)")
    g.add_argument("--loss", default="sigmoid", choices=LOSS_TYPES, help="sigmoid: DPO; ipo: IPO's squared loss")
    g.add_argument("--length-norm", action="store_true",
                   help="average log-probs over the answer's tokens instead of summing them (less length bias)")
    g.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this much NLL of the chosen answer (keeps its likelihood from sinking)")
    g = parser.add_argument_group("data")
    g.add_argument("--mixture", nargs="*", default=DEFAULT_MIXTURE,
                   help="preference task specs (e.g. 'preferences:skip_bad:/data/hh.jsonl', 'identity_pairs:p.json')")
    g.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="your pairs (.jsonl/.parquet: prompt, chosen, rejected); repeatable; added to --mixture")
    g.add_argument("--data-only", action="store_true", help="train only on --data (and --persona), not --mixture")
    g.add_argument("--persona", default=None, help="persona.json: add pairs preferring the persona's identity answers")
    g.add_argument("--persona-pairs", type=int, default=300, help="identity pairs to add")
    g.add_argument("--val-mixture", nargs="*", default=None,
                   help=f"validation specs (default: {' '.join(DEFAULT_VAL)}; with --data-only, or when given "
                        "with no specs: --val-holdout pairs held out of the training pairs)")
    g.add_argument("--val-holdout", type=int, default=200, help="pairs held out when there is no --val-mixture "
                                                               "(at most a tenth)")
    g.add_argument("--max-seq-len", type=int, default=0, help="max tokens of prompt + answer (0: the model's context)")
    g.add_argument("--min-prompt-tokens", type=int, default=32, help="a prompt is never cut shorter than this")
    g.add_argument("--min-response-tokens", type=int, default=16,
                   help="answers may be cut to fit, but not below this (else the pair is dropped)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the pairs (if --num-iterations=-1)")
    g = parser.add_argument_group("batches")
    g.add_argument("--examples-per-step", type=int, default=32, help="pairs per optimizer step over all ranks")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-pairs", type=int, default=500, help="held-out pairs per evaluation")
    add_training_args(parser)
    add_lora_args(parser.add_argument_group("LoRA"))
    # gentler than SFT, as the full fine-tuning LRs are (init_lr_frac 0.01 here, 0.02 in SFT)
    parser.set_defaults(device_batch_size=4, init_lr_frac=0.01, warmup_ratio=0.1, warmdown_ratio=0.9,
                        eval_every=50, compile="0", total_batch_size=None, lora_lr=5e-4)
    args = parser.parse_args(argv)
    if args.total_batch_size is not None:
        raise SystemExit("--total-batch-size counts tokens; DPO steps are counted in pairs: use --examples-per-step")
    if args.beta <= 0:
        raise SystemExit(f"--beta must be positive, got {args.beta}")
    if args.min_prompt_tokens < 2 or args.min_response_tokens < 1:
        raise SystemExit("--min-prompt-tokens must be at least 2 (<|bos|> ... <|assistant_start|>) and "
                         "--min-response-tokens at least 1")

    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    master = rank == 0
    try:  # read and check all the data before loading a model
        train_task, val_task = build_preference_tasks(args)
    except (ValueError, FileNotFoundError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    orig_model, model, tokenizer, source_meta, tag = load_starting_model(args, args.source, device, dynamic_shapes=True)

    # pairs -> token ids (prompt rendered once, shared by both answers), truncated or dropped, counted
    T, B = args.max_seq_len or orig_model.config.sequence_len, args.device_batch_size
    fit = dict(max_seq_len=T, min_prompt_tokens=args.min_prompt_tokens, min_response_tokens=args.min_response_tokens)
    train_pairs, train_counts = tokenize_pairs(train_task, tokenizer, **fit)
    val_items = [val_task[i] for i in range(min(args.eval_pairs, len(val_task)))]
    val_pairs, val_counts = tokenize_pairs(val_items, tokenizer, **fit)
    print0(f"train: {describe_counts(train_counts)}")
    print0(f"val:   {describe_counts(val_counts)}")
    if not train_pairs:
        raise SystemExit("error: no training pair is left (see the counts above: raise --max-seq-len?)")

    # the frozen reference: the starting weights, scored once (with LoRA: the same network, adapters off)
    pad_id = tokenizer.get_bos_token_id()  # any id: padded positions have target -1
    t0 = time.time()
    with disable_lora(orig_model):  # a no-op without adapters
        ref = reference_logps(orig_model, train_pairs + val_pairs, B, pad_id, device, rank, world_size,
                              autocast=lambda: autocast_ctx(device.type))
    train_ref, val_ref = ref[:len(train_pairs)], ref[len(train_pairs):]
    print0(f"reference log-probs of {len(ref):,} pairs in {time.time() - t0:.1f}s")

    per_micro = B * world_size
    if args.examples_per_step % per_micro != 0:
        raise SystemExit(f"--examples-per-step={args.examples_per_step} must be a multiple of --device-batch-size × "
                         f"world_size = {B}×{world_size} = {per_micro}")
    grad_accum = args.examples_per_step // per_micro
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        num_steps = max(1, round(args.num_epochs * len(train_pairs) / args.examples_per_step))
    print0(f"steps: {num_steps:,} × {args.examples_per_step} pairs | grad accumulation: {grad_accum} | "
           f"loss {args.loss} beta {args.beta}" + (" length-normalised" if args.length_norm else "")
           + (f" + {args.sft_weight} × SFT" if args.sft_weight else ""))

    optimizers, checkpoint_dir, meta = finetune_outputs(args, orig_model, "dpo", args.source, tag, source_meta)
    meta["pairs"] = dict(train_counts)
    batches = None
    trainer = Trainer(args, orig_model, optimizers, device=device, ddp=ddp, world_size=world_size, rank=rank,
                      checkpoint_dir=checkpoint_dir, num_steps=num_steps, grad_accum=grad_accum,
                      tokens_per_step=lambda: batches.step_tokens, meta=meta, stage="dpo")
    trainer.maybe_resume()  # after the reference pass: the reference is always the starting model

    def micro_batches(pair_batches):
        for items, state in pair_batches:
            index = [i for i, _ in items]
            inputs, targets = collate_pairs([pair for _, pair in items], pad_id, device)
            yield {"inputs": inputs, "targets": targets, "ref": train_ref[index], "count": len(items),
                   "tokens": inputs.numel()}, state

    try:
        pair_batches = padded_batches(train_pairs, lambda pair: pair, B, rank=rank, world_size=world_size,
                                      seed=args.seed, resume_state=trainer.loader_state, what="dpo pairs")
    except ValueError as e:  # a resume state that does not fit these pairs or settings
        raise SystemExit(f"error: {e}")
    batches = StepBatches(micro_batches(pair_batches), grad_accum, world_size, device)
    loss_kwargs = dict(beta=args.beta, loss_type=args.loss, length_norm=args.length_norm, sft_weight=args.sft_weight)

    def compute_loss(_model, batch):
        losses, stats = pair_losses(model, batch, **loss_kwargs)
        scale = batch["loss_scale"]  # sums -> this micro-batch's share of the step's means (loss and stats)
        return losses.sum() * scale, {name: stats[name].sum() * scale for name in STAT_NAMES}

    @torch.no_grad()
    def evaluate(step):
        sums = [0.0] * (len(STAT_NAMES) + 2)  # the stats, the loss, the number of pairs
        mine = list(range(rank, len(val_pairs), world_size))
        for start in range(0, len(mine), B):
            index = mine[start:start + B]
            inputs, targets = collate_pairs([val_pairs[i] for i in index], pad_id, device)
            with autocast_ctx(device.type):
                losses, stats = pair_losses(orig_model, {"inputs": inputs, "targets": targets, "ref": val_ref[index]},
                                            **loss_kwargs)
            values = [stats[name].sum().item() for name in STAT_NAMES] + [losses.sum().item(), len(index)]
            sums = [a + b for a, b in zip(sums, values)]
        if ddp:
            t = torch.tensor(sums, dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            sums = t.tolist()
        n = max(sums[-1], 1)
        out = {f"val/{name}": sums[i] / n for i, name in enumerate(STAT_NAMES)}
        out["val/loss"] = sums[-2] / n
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    t0 = time.time()
    last_eval = trainer.run(batches, compute_loss, evaluate if val_pairs else None, eval_at_start=True)
    print0(f"done: {trainer.step} steps in {(time.time() - t0) / 60:.1f} min")
    if master:
        get_report().log(section="Chat DPO", data=[
            vars(args),
            {"source": f"{args.source} {tag} step {source_meta['step']}", "training_pairs": len(train_pairs),
             **{f"pairs_{k}": v for k, v in sorted(train_counts.items())}, "steps": num_steps,
             "training_time_min": round(trainer.train_time / 60, 2), **last_eval},
        ])
    compute_cleanup()
    return trainer


if __name__ == "__main__":
    main()
