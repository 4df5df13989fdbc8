"""Direct Preference Optimization (DPO): from pairs of answers to one prompt, make the preferred one the more likely.
    python -m scripts.chat_dpo --data pairs.jsonl --data-only   # only your pairs (validation: held out); or torchrun
    python -m scripts.chat_dpo --loss ipo --length-norm --sft-weight 0.1 --lora-rank 16"""
import argparse
import time

import torch

from nanochat import training
from nanochat.chat_data import StepBatches, padded_batches
from nanochat.common import HelpFormatter, autocast_ctx, compute_init, exit_on, print0
from nanochat.download import DownloadError
from nanochat.dpo import LOSS_TYPES, collate_pairs, describe_counts, pair_losses, reference_logps, tokenize_pairs
from nanochat.lora import disable_lora
from nanochat.report import get_report
from nanochat.task_eval import all_reduce_sum
from tasks.specs import SPEC_HELP, build_chat_tasks

# More likely relative to the rejected answer, measured against the starting model (the frozen reference); the
# loss is in nanochat/dpo.py. Pairs: {"prompt": str | messages, "chosen": str, "rejected": str} per line (default:
# UltraFeedback). Offline: --mixture preferences:skip_bad:$DATA/preference/hh_rlhf_harmless_base_test.jsonl
DEFAULT_MIXTURE = ["preferences:train"]
DEFAULT_VAL = ["preferences:test"]
STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP, formatter_class=HelpFormatter)
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference (KL weight)")
    g.add_argument("--loss", default="sigmoid", choices=LOSS_TYPES, help="sigmoid: DPO; ipo: IPO's squared loss")
    g.add_argument("--length-norm", action="store_true",
                   help="average log-probs over the answer's tokens instead of summing them (less length bias)")
    g.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this much NLL of the chosen answer (keeps its likelihood from sinking)")
    g.add_argument("--min-prompt-tokens", type=int, default=32, help="a prompt is never cut shorter than this")
    g.add_argument("--min-response-tokens", type=int, default=16,
                   help="answers may be cut to fit, but not below this (else the pair is dropped)")
    g.add_argument("--examples-per-step", type=int, default=32, help="pairs per optimizer step over all ranks")
    g.add_argument("--eval-pairs", type=int, default=500, help="held-out pairs per evaluation")
    training.add_finetuning_flags(parser, "sft", DEFAULT_MIXTURE, DEFAULT_VAL, noun="pairs")
    # gentler than SFT (init_lr_frac 0.01 here, 0.2 there); --device-batch-size counts pairs (2 rows each)
    parser.set_defaults(device_batch_size=4, init_lr_frac=0.01, warmup_ratio=0.1, warmdown_ratio=0.9,
                        eval_every=50, compile="0", total_batch_size=None, lora_lr=5e-4, val_holdout=200)
    args = parser.parse_args(argv)
    # None by default, as in chat_sft: --total-batch-size counts tokens, and is refused here rather than ignored
    if args.total_batch_size is not None:
        raise SystemExit("--total-batch-size counts tokens; DPO steps are counted in pairs: use --examples-per-step")
    if args.beta <= 0:
        raise SystemExit(f"--beta must be positive, got {args.beta}")
    if args.min_prompt_tokens < 2 or args.min_response_tokens < 1:
        raise SystemExit("--min-prompt-tokens must be >= 2 (<|bos|>, <|assistant_start|>), --min-response-tokens >= 1")
    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    with exit_on(ValueError, FileNotFoundError, DownloadError):  # read and check all the data before loading a model
        train_task, val_task = build_chat_tasks(args, DEFAULT_VAL, pairs=True)
    orig_model, optimizer, tokenizer, checkpoint_dir, meta = training.load_starting_model(args, args.source, "dpo", device)
    # compiled for dynamic shapes if at all: a micro-batch is as long as its longest pair
    model = training.maybe_compile(orig_model, args, device, dynamic=True)
    # pairs -> token ids (the prompt rendered once, shared by both answers), cut to fit or dropped, counted
    T, B = args.max_seq_len or orig_model.config.sequence_len, args.device_batch_size
    fit = dict(max_seq_len=T, min_prompt_tokens=args.min_prompt_tokens, min_response_tokens=args.min_response_tokens)
    train_pairs, train_counts = tokenize_pairs(train_task, tokenizer, **fit)
    val_pairs, val_counts = tokenize_pairs([val_task[i] for i in range(min(args.eval_pairs, len(val_task)))],
                                           tokenizer, **fit)
    print0(f"train: {describe_counts(train_counts)}\nval:   {describe_counts(val_counts)}")
    if not train_pairs:
        raise SystemExit("error: no training pair is left (see the counts above: raise --max-seq-len?)")
    meta["pairs"] = dict(train_counts)  # the checkpoints record how many pairs were kept, cut and dropped (and why)
    # The frozen reference: the starting weights, scored once before training (so only one model
    # is ever in memory; with LoRA it is the very same network with its adapters switched off)
    pad_id, t0 = tokenizer.get_bos_token_id(), time.time()  # pad_id: any id, padded positions have target -1
    with disable_lora(orig_model):  # a no-op without adapters
        ref = reference_logps(orig_model, train_pairs + val_pairs, B, pad_id, device, rank, world_size)
    train_ref, val_ref = ref[:len(train_pairs)], ref[len(train_pairs):]
    print0(f"reference log-probs of {len(ref):,} pairs in {time.time() - t0:.1f}s")
    # How long: --num-epochs passes over the training pairs, in steps of --examples-per-step
    grad_accum = training.grad_accum_steps(args.examples_per_step, B * world_size,
                                           "--examples-per-step (device_batch_size × world_size)")
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, round(args.num_epochs * len(train_pairs) / args.examples_per_step))
    print0(f"steps: {num_steps:,} × {args.examples_per_step} pairs | grad accumulation: {grad_accum} | "
           f"loss {args.loss} beta {args.beta}" + (" length-normalised" if args.length_norm else "")
           + (f" + {args.sft_weight} × SFT" if args.sft_weight else ""))
    # --resume after the reference pass: the reference is always the starting model, never the resumed one
    step, loader_state, saved = training.resume(args.resume, checkpoint_dir, orig_model, optimizer, meta, device)
    def micro_batches(pair_batches):
        for items, state in pair_batches:
            index = [i for i, _ in items]
            inputs, targets = collate_pairs([pair for _, pair in items], pad_id, device)
            # rows 0..n-1 chosen, n..2n-1 rejected; a step's loss is the mean over its pairs
            yield {"inputs": inputs, "targets": targets, "ref": train_ref[index], "count": len(items),
                   "tokens": inputs.numel()}, state
    # the pairs are token ids already, so render is the identity; a resume state must fit these pairs and settings
    with exit_on(ValueError):
        pair_batches = padded_batches(train_pairs, lambda pair: pair, B, rank=rank, world_size=world_size,
                                      seed=args.seed, resume_state=loader_state, what="dpo pairs")
    batches = StepBatches(micro_batches(pair_batches), grad_accum, world_size, device)
    loss_kwargs = dict(beta=args.beta, loss_type=args.loss, length_norm=args.length_norm, sft_weight=args.sft_weight)
    @torch.no_grad()
    def evaluate(step):
        # the loss and the reward statistics on the held-out pairs, averaged per pair (over all ranks)
        model.eval()
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
        sums = all_reduce_sum(sums, device)
        # the names pair with the sums in order, the loss after the stats; the last sum counts the pairs
        out = {f"val/{name}": total / max(sums[-1], 1) for name, total in zip(STAT_NAMES + ("loss",), sums)}
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
        model.train()
        return log.evaluated(step, out)
    # -------------------------------------------------------------------------
    # The training loop, after a look at the starting model (on a fresh run)
    log = training.TrainLog("dpo", args, num_steps, orig_model.estimate_flops(), world_size, device.type, saved)
    if val_pairs and step == 0 and args.eval_every > 0:
        evaluate(0)
    last_eval, t_start = {}, time.time()
    step_batches = batches.next_step()
    while step < num_steps:
        lrm = training.set_schedule(optimizer, step, num_steps, args)
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        stat_sums = {name: torch.zeros((), device=device) for name in STAT_NAMES}
        for batch, loader_state in step_batches:
            with autocast_ctx(device.type):
                losses, stats = pair_losses(model, batch, **loss_kwargs)
            scale = batch["loss_scale"]  # per-pair sums -> this micro-batch's share of the step's means
            loss = losses.sum() * scale
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
            for name in STAT_NAMES:  # summed on the device: logged with the loss, in one sync
                stat_sums[name] += stats[name].sum() * scale / grad_accum
        step_batches = batches.next_step()  # collated while the device still runs this backward
        training.optimizer_step(orig_model, optimizer, args.grad_clip)
        step += 1
        # the reward statistics ride along in the step's one host sync, averaged over ranks like the loss
        log.step(step, t0, lrm, loss_sum / grad_accum, tokens=batches.step_tokens, metrics=stat_sums)
        if val_pairs and training.is_due(step, args.eval_every, num_steps):  # none left after tokenizing: no eval
            last_eval = evaluate(step)
        if training.is_due(step, args.save_every, num_steps):
            training.save(checkpoint_dir, step, orig_model, optimizer, dict(meta, **last_eval), loader_state, log)
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min")
    get_report().log(section="Chat DPO", data=[vars(args), {  # (a no-op off rank 0)
        "source": training.describe_lineage(meta["source"]), "training_pairs": len(train_pairs),
        **{f"pairs_{k}": v for k, v in sorted(train_counts.items())}, "steps": num_steps,
        "training_time_min": round(log.train_time / 60, 2), **last_eval}])
    return training.finish(log, orig_model, meta)  # (and the process group torn down)

if __name__ == "__main__":
    main()
