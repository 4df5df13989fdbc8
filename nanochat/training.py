"""
The loop machinery every training stage shares (base, mid, SFT, DPO): command-line knobs,
LR schedule, gradient accumulation, the optimizer step (with correct cross-rank sync and
optional clipping), per-step logging with tok/s, MFU and ETA, periodic evaluation, and
checkpoint/resume. Each stage script only says *what* a micro-batch is and *how* its loss is
computed; this file says how the steps happen.

Counting convention (a known trap): a "step" is always one optimizer step. A step consumes
`grad_accum_steps` micro-batches; nothing in here counts micro-steps as steps.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.common import (autocast_ctx, get_base_dir, format_eta, get_peak_flops, init_wandb, print0, synchronize)
from nanochat.checkpoint_manager import (SOURCES, find_largest_model, find_last_step, list_steps, load_checkpoint,
                                         load_model, save_checkpoint)
from nanochat.distributed import all_reduce_gradients
from nanochat.lora import (apply_lora_from_args, has_lora, list_lora_steps, load_lora, load_lora_checkpoint,
                           load_lora_optimizer, lora_optimizer, lora_tag, save_lora)
from nanochat.muon import Muon


def add_training_args(parser: argparse.ArgumentParser, lr_defaults=None):
    """The knobs every stage has. Stage scripts add their own on top."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--compile", default="auto", choices=["auto", "1", "0"],
                   help="torch.compile the model (auto: on for CUDA, off elsewhere)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per micro-batch per device")
    g.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step across all ranks (gradient accumulation fills the gap)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: the stage decides)")
    lr = {"embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02, "weight_decay": 0.0, **(lr_defaults or {})}
    g.add_argument("--embedding-lr", type=float, default=lr["embedding_lr"], help="AdamW LR for the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=lr["unembedding_lr"], help="AdamW LR for the lm_head")
    g.add_argument("--matrix-lr", type=float, default=lr["matrix_lr"], help="Muon LR for the transformer matrices")
    g.add_argument("--weight-decay", type=float, default=lr["weight_decay"], help="AdamW weight decay")
    g.add_argument("--init-lr-frac", type=float, default=1.0, help="scale all LRs (e.g. lower for fine-tuning)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps with linear LR decay at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--muon-precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="Muon's Newton-Schulz matmuls (auto: bf16 on CUDA and on CPUs with bf16 matmul "
                        "hardware, fp32 elsewhere)")
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps (-1 = only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this --model-tag")
    g.add_argument("--model-tag", default=None, help="checkpoint sub-folder name (default: d<depth>)")
    g.add_argument("--log-every", type=int, default=1, help="print a progress line every N steps")
    return parser


def lr_multiplier(step, num_steps, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup from ~0 to 1, flat, then linear warmdown to final_lr_frac. Goes UP during
    warmup and DOWN during warmdown (tested: an inverted ramp is a classic bug)."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown  # 1 at the start of warmdown -> 0 at the end
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon's momentum ramps from 0.85 to 0.95 over the first steps: a lower momentum early on
    makes the first, noisy updates less sticky."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    tokens_per_micro = device_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro != 0:
        raise SystemExit(f"--total-batch-size={total_batch_size} must be a multiple of device_batch_size × "
                         f"seq_len × world_size = {device_batch_size}×{seq_len}×{world_size} = {tokens_per_micro}")
    return total_batch_size // tokens_per_micro


def should_compile(flag, device_type):
    return flag == "1" or (flag == "auto" and device_type == "cuda")


def build_optimizers(args, model):
    """[AdamW, Muon] with the --*-lr flags, all scaled by --init-lr-frac."""
    f = args.init_lr_frac
    muon_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.muon_precision]
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * f, embedding_lr=args.embedding_lr * f,
                                  matrix_lr=args.matrix_lr * f, weight_decay=args.weight_decay, muon_dtype=muon_dtype)


def load_starting_model(args, source, device, dynamic_shapes):
    """
    The checkpoint a fine-tuning stage (mid, SFT, DPO) starts from, as (orig_model, model,
    tokenizer, source_meta, tag): LoRA adapters (--lora-rank) go onto the plain module, then
    `model` is the torch.compile'd view of it when --compile says so.
    """
    try:
        tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES[source][0]))
        orig_model, tokenizer, source_meta = load_model(source, device, "train", model_tag=tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load the {source} model: {e}")
    print0(f"starting from the {source} model {tag} step {source_meta['step']}")
    if args.lora_rank > 0:  # on the plain module, before torch.compile
        print0(apply_lora_from_args(orig_model, args))
    model = orig_model
    if should_compile(args.compile, device.type):
        model = torch.compile(orig_model, dynamic=dynamic_shapes)
    return orig_model, model, tokenizer, source_meta, tag


def finetune_outputs(args, orig_model, stage, source, tag, source_meta):
    """
    (optimizers, checkpoint_dir, meta) of a fine-tuning stage: the full weights with Muon+AdamW,
    or with --lora-rank AdamW on the adapters alone, saved to their own <tag>_lora folder with
    the base they adapt (what load_model_with_lora rebuilds the model from).
    """
    output_tag = args.output_tag or tag
    if args.lora_rank > 0:
        optimizers = [lora_optimizer(orig_model, lr=args.lora_lr, weight_decay=args.weight_decay)]
        output_tag = lora_tag(output_tag)
    else:
        optimizers = build_optimizers(args, orig_model)
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[stage][0], output_tag)
    start = {"model_tag": tag, "step": source_meta["step"]}
    meta = {"model_config": source_meta["model_config"], "user_config": vars(args),
            "source": {"phase": source, **start}}
    if args.lora_rank > 0:
        meta.update(stage=stage, base={"source": source, **start})
    return optimizers, checkpoint_dir, meta


class Trainer:
    """
    Runs optimizer steps. Each step: set LRs from the schedule, accumulate gradients over
    `grad_accum` micro-batches, sync + (optionally) clip, step the optimizers, log.
    `next_batch()` returns (batch, loader_state); `compute_loss(model, batch)` returns the loss
    (the mean over the micro-batch's counted tokens), or (loss, metrics) where metrics is a dict
    of floats/scalars averaged over the step like the loss and logged as train/<name>.
    tokens_per_step (for tok/s and MFU) is a number, or a callable giving the tokens of the step
    just taken (when padding makes it vary).
    """

    def __init__(self, args, model, optimizers, *, device, ddp, world_size, rank, checkpoint_dir,
                 num_steps, grad_accum, tokens_per_step, meta, stage):
        self.args, self.model, self.optimizers = args, model, optimizers
        self.device, self.ddp, self.world_size, self.rank = device, ddp, world_size, rank
        self.master = rank == 0
        self.checkpoint_dir, self.num_steps, self.grad_accum = checkpoint_dir, num_steps, grad_accum
        self.tokens_per_step, self.meta, self.stage = tokens_per_step, meta, stage
        self.device_type = device.type
        self.step = 0
        self.loader_state = None
        self.smooth_loss = 0.0
        self.train_time = 0.0  # seconds of training steps so far (excludes eval/ckpt), survives resume
        self.history = []  # (step, loss) of every step, for tests and the report
        self.metrics_history = []  # (step, {name: value}) of every step whose compute_loss returned metrics
        self.eval_history = []  # (step, evaluate's dict) of every evaluation
        self.wandb = init_wandb(args.run, f"nanochat-{stage}", vars(args), self.master)
        self.flops_per_token = model.estimate_flops() if hasattr(model, "estimate_flops") else None
        self.peak_flops = get_peak_flops(self.device_type)

    # -- checkpoints ----------------------------------------------------------------------

    def maybe_resume(self):
        """If --resume: load the last checkpoint (model, optimizer shards, loader state, step).
        A LoRA model (has_lora) resumes from its adapter files: adapters, optimizer, meta."""
        if not self.args.resume:
            return None
        if has_lora(self.model):
            optim_states, meta = self._load_lora_for_resume()
        else:
            if not list_steps(self.checkpoint_dir):
                lora_hint = " (it holds LoRA adapters: resume with the same --lora-* flags)" \
                    if list_lora_steps(self.checkpoint_dir) else ""
                raise SystemExit(f"--resume: no checkpoint in {self.checkpoint_dir} to resume from{lora_hint}")
            step = find_last_step(self.checkpoint_dir)
            model_state, optim_states, meta = load_checkpoint(self.checkpoint_dir, step, self.device,
                                                              load_optimizer=True, rank=self.rank)
            self.model.load_state_dict(model_state, strict=True)
        if len(optim_states) != len(self.optimizers):
            raise SystemExit(f"--resume: the checkpoint holds {len(optim_states)} optimizer states, this run has "
                             f"{len(self.optimizers)} optimizers (LoRA on one side only?)")
        for opt, state in zip(self.optimizers, optim_states):
            opt.load_state_dict(state)
        self.step = meta["step"]
        self.loader_state = meta.get("loader_state")
        trainer_state = meta.get("trainer", {})
        self.smooth_loss = trainer_state.get("smooth_loss", 0.0)
        self.train_time = trainer_state.get("train_time", 0.0)
        print0(f"resumed from {self.checkpoint_dir} at step {self.step}")
        return meta

    def _load_lora_for_resume(self):
        """The adapters and optimizer state of the last LoRA step; the base model the script loaded
        must be the one the adapters were trained on, with the same LoRA settings."""
        steps = list_lora_steps(self.checkpoint_dir)
        if not steps:
            raise SystemExit(f"--resume: no LoRA adapter in {self.checkpoint_dir} to resume from")
        state, meta = load_lora_checkpoint(self.checkpoint_dir, steps[-1], device=self.device)
        for key, now in (("lora", self.model.lora_config), ("base", self.meta.get("base"))):
            if meta.get(key) != now:
                raise SystemExit(f"--resume: {self.checkpoint_dir} step {meta['step']} was trained with "
                                 f"{key} {meta.get(key)}, this run has {now}")
        load_lora(self.model, state)
        return load_lora_optimizer(self.checkpoint_dir, steps[-1], self.device, rank=self.rank), meta

    def save(self, extra_meta=None):
        meta = dict(self.meta)
        meta.update(extra_meta or {})
        meta["step"] = self.step
        loader_state = self.loader_state
        if self.ddp:  # every rank reads its own slice of the data: keep all their positions
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, loader_state)
            loader_state = gathered
        meta["loader_state"] = loader_state
        meta["trainer"] = {"smooth_loss": self.smooth_loss, "train_time": self.train_time}
        optimizer_states = [opt.state_dict() for opt in self.optimizers]
        if has_lora(self.model):  # the frozen base is on disk already: keep only the (small) adapters
            save_lora(self.checkpoint_dir, self.step, self.model, meta, optimizer_states, rank=self.rank)
        else:
            save_checkpoint(self.checkpoint_dir, self.step, self.model.state_dict(), optimizer_states, meta,
                            rank=self.rank)
        print0(f"saved checkpoint: {self.checkpoint_dir} step {self.step}")

    # -- one optimizer step ---------------------------------------------------------------

    def set_lr(self):
        a = self.args
        lrm = lr_multiplier(self.step, self.num_steps, a.warmup_ratio, a.warmdown_ratio, a.final_lr_frac)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(self.step)
        return lrm

    def train_step(self, next_batch, compute_loss):
        self.model.train()
        synchronize(self.device_type)
        t0 = time.time()
        lrm = self.set_lr()
        step_loss, step_metrics = 0.0, {}
        for _ in range(self.grad_accum):
            batch, self.loader_state = next_batch()
            with autocast_ctx(self.device_type):
                loss = compute_loss(self.model, batch)
            loss, metrics = loss if isinstance(loss, tuple) else (loss, {})
            (loss / self.grad_accum).backward()
            step_loss += loss.detach().float().item() / self.grad_accum
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + float(value) / self.grad_accum
        grads_synced = False
        if self.args.grad_clip > 0:
            # clip the *global* gradient: sync first, then clip (clipping per-rank before the
            # sync would clip each rank's partial gradient with the wrong norm)
            if self.ddp:
                all_reduce_gradients(self.model)
                grads_synced = True
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        for opt in self.optimizers:  # the sharded optimizers average gradients across ranks here
            opt.step(grads_already_averaged=grads_synced)
        self.model.zero_grad(set_to_none=True)
        if self.ddp:  # report the loss (and metrics) averaged over ranks, same as one process would see
            names = sorted(step_metrics)
            t = torch.tensor([step_loss] + [step_metrics[name] for name in names], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            values = (t / self.world_size).tolist()
            step_loss, step_metrics = values[0], dict(zip(names, values[1:]))
        synchronize(self.device_type)
        dt = time.time() - t0
        self.step += 1
        if step_metrics:
            self.metrics_history.append((self.step, step_metrics))
        return step_loss, lrm, dt, step_metrics

    def log(self, loss, lrm, dt, metrics=None):
        metrics = metrics or {}
        beta = 0.9  # EMA of the loss, debiased, for a readable curve
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * loss
        debiased = self.smooth_loss / (1 - beta ** self.step)
        self.history.append((self.step, loss))
        if self.step > 1:  # the first step includes compilation/warmup: not representative
            self.train_time += dt
        tokens = self.tokens_per_step() if callable(self.tokens_per_step) else self.tokens_per_step
        tok_per_sec = tokens / dt
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = 100 * self.flops_per_token * tok_per_sec / (self.peak_flops * self.world_size)
        steps_done = max(self.step - 1, 1)
        eta = (self.train_time / steps_done) * (self.num_steps - self.step) if self.step > 1 else dt * (self.num_steps - 1)
        if self.step % self.args.log_every == 0 or self.step == self.num_steps:
            mfu_txt = f" | mfu {mfu:.1f}%" if mfu is not None else ""
            metrics_txt = "".join(f" | {name} {value:.4f}" for name, value in metrics.items())
            print0(f"{self.stage} step {self.step:05d}/{self.num_steps:05d} ({100 * self.step / self.num_steps:.1f}%) | "
                   f"loss {loss:.4f} (ema {debiased:.4f}) | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
                   f"tok/s {tok_per_sec:,.0f}{mfu_txt} | eta {format_eta(eta)}{metrics_txt}")
        self.wandb.log({"step": self.step, "train/loss": loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                        **({"train/mfu": mfu} if mfu is not None else {}),
                        **{f"train/{name}": value for name, value in metrics.items()}})

    # -- the loop -------------------------------------------------------------------------

    def run(self, next_batch, compute_loss, evaluate=None, eval_at_start=False):
        """Train until num_steps. `evaluate(step) -> dict` runs every --eval-every steps and at the
        end (its dict lands in the checkpoint meta). eval_at_start: also evaluate the starting point
        of a fresh run (not a resumed one), to compare with. Returns the last evaluation dict."""
        a = self.args
        last_eval = {}
        if evaluate is not None and eval_at_start and self.step == 0 and a.eval_every > 0:
            self.model.eval()
            self.eval_history.append((0, evaluate(0) or {}))
        while self.step < self.num_steps:
            loss, lrm, dt, metrics = self.train_step(next_batch, compute_loss)
            if not math.isfinite(loss):
                raise SystemExit(f"loss is {loss} at step {self.step}: diverged (lower the LRs?)")
            self.log(loss, lrm, dt, metrics)
            last = self.step == self.num_steps
            if evaluate is not None and (last or (a.eval_every > 0 and self.step % a.eval_every == 0)):
                self.model.eval()
                last_eval = evaluate(self.step) or {}
                self.eval_history.append((self.step, last_eval))
                self.wandb.log({"step": self.step, **last_eval})
            if last or (a.save_every > 0 and self.step % a.save_every == 0):
                self.save(extra_meta=last_eval)
        self.wandb.finish()
        return last_eval
