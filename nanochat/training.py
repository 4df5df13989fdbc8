"""What the four training stages (base, mid, SFT, DPO) share: flags, LR schedule, optimizer step, checkpoint save and
resume, the progress line. The loops themselves live in the stage scripts, where you can read and edit them."""
import gc
import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (DEFAULT_TAG_HELP, SOURCES, list_steps, load_checkpoint, load_model,
                                         save_checkpoint, trained_state)
from nanochat.common import (compute_cleanup, exit_on, format_eta, get_base_dir, get_peak_flops, get_rank, init_wandb,
                             print0)
from nanochat.lora import apply_lora_from_args, lora_optimizer
from nanochat.optim import all_reduce_gradients

def add_training_flags(parser, model_tag_help="checkpoint sub-folder name (default: d<depth>)"):
    """The flags every stage has; a stage changes their defaults with parser.set_defaults."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--compile", default="auto", choices=["auto", "1", "0"],
                   help="torch.compile the model (auto: on for CUDA, off elsewhere)")
    g.add_argument("--fused", default="auto", choices=["auto", "1", "0"],
                   help="the hand-written fused kernels of nanochat/fused.py (auto: on CPU, off elsewhere)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per micro-batch per device")
    g.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step across all ranks (gradient accumulation fills the gap; "
                   "base_train's -1: sized from the model, the LRs and Muon weight decay with it)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: the stage decides)")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR for the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR for the lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR for the transformer matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--muon-weight-decay", type=float, default=0.0,
                   help="Muon's cautious weight decay (where update and weight agree in sign), linear to 0 at the end")
    g.add_argument("--muon-ns", default="polar", choices=["polar", "quintic"],
                   help="Newton-Schulz coefficients: Polar Express (per step) or the fixed quintic of the first Muon")
    g.add_argument("--normuon-beta2", type=float, default=0.95, help="NorMuon's per-neuron second moment (0 = off)")
    g.add_argument("--muon-momentum-final", type=float, default=0.95, help="Muon momentum at the end of the LR warmdown")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR for the residual/x0 lambdas (if the model has them)")
    g.add_argument("--init-lr-frac", type=float, default=1.0, help="scale all LRs (e.g. lower for fine-tuning)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps with linear LR decay at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--muon-precision", default="auto", choices=["auto", "bf16", "fp32"], help="Muon's Newton-Schulz "
                   "matmuls (auto: bf16 on CUDA and on CPUs with bf16 matmul hardware, fp32 elsewhere)")
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps (-1 = only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest K checkpoints of this run (0 = all; "
                                                            "a d20 checkpoint is ~5 GB with its optimizer state)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this --model-tag")
    g.add_argument("--model-tag", default=None, help=model_tag_help)
    g.add_argument("--log-every", type=int, default=1, help="print a progress line every N steps")

def add_finetuning_flags(parser, default_source, default_mixture, default_val, noun="conversations"):
    """The flags mid, SFT and DPO share (where the model comes from, the data, LoRA), then add_training_flags."""
    # a stage's own defaults (its source, mixture, validation specs) come in as arguments: one help text for three
    g = parser.add_argument_group("starting model and output")
    g.add_argument("-i", "--source", default=default_source, choices=list(SOURCES),
                   help=f"which stage's checkpoint to start from (default: {default_source})")
    g.add_argument("--step", type=int, default=None, help="step of the starting checkpoint (default: the last)")
    g.add_argument("--output-tag", default=None, help="save under <this stage's folder>/<this> (default: "
                                                      "--model-tag; with --lora-rank: <this>_lora, the adapters only)")
    g = parser.add_argument_group("data (task specs: python -m tasks.specs --help)")
    g.add_argument("--mixture", nargs="*", default=default_mixture,
                   help="training task specs (a local copy of a default dataset: e.g. 'gsm8k:train:/data/gsm8k.jsonl')")
    g.add_argument("--data", action="append", default=[], metavar="FILE",
                   help=f"your {noun} (.jsonl/.parquet); repeatable; added to --mixture")
    g.add_argument("--data-only", action="store_true", help="train only on --data (and --persona), not --mixture")
    g.add_argument("--persona", default=None, help="persona.json: add who-am-I examples (tasks/identity.py)")
    g.add_argument("--persona-examples", "--persona-pairs", type=int, default=300, help="identity examples to add")
    g.add_argument("--val-mixture", nargs="*", help=f"validation specs (default: {' '.join(default_val)}; with "
                   f"--data-only, or when given with no specs: --val-holdout {noun} held out of the training data)")
    g.add_argument("--val-holdout", type=int, default=500,
                   help=f"training {noun} held out when there is no --val-mixture (at most a tenth)")
    g.add_argument("--max-seq-len", type=int, default=0, help="tokens per row (0: the model's context length)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the data (if --num-iterations=-1)")
    g = parser.add_argument_group("LoRA (train small adapters on a frozen model)")
    g.add_argument("--lora-rank", type=int, default=0, help="adapter rank (0 = full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 * rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="c_q,c_k,c_v,c_proj,c_fc",
                   help="comma-separated Linear names to adapt (c_q,c_k,c_v,c_proj,c_fc,lm_head; or attn.c_proj)")
    g.add_argument("--lora-lr", type=float, default=1e-3, help="AdamW learning rate of the adapters")
    add_training_flags(parser, model_tag_help=f"the --source checkpoint folder to start from, and the output's unless "
                                              f"--output-tag (default: {DEFAULT_TAG_HELP})")

# -----------------------------------------------------------------------------
# The schedule and the optimizer step
def lr_multiplier(step, num_steps, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup to 1, flat, linear warmdown to final_lr_frac (tested the right way round)."""
    warmup, warmdown = round(warmup_ratio * num_steps), round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown  # 1 at the start of the warmdown, 0 at the end
    return progress + (1 - progress) * final_lr_frac

def set_schedule(optimizer, step, num_steps, args):
    """Set every group's LR for this step; returns the multiplier (for the log)."""
    # from "initial_lr", never from the current lr: the schedule must not compound over steps
    lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            # the weight decay goes linearly to 0: late in the run it would only undo the last, small updates
            group["weight_decay"] = args.muon_weight_decay * (1 - step / num_steps)
            # momentum 0.85 -> 0.95 over the first 300 steps (the first, noisy updates stick less), then linearly to
            # --muon-momentum-final over the LR warmdown (base_train's 0.9, as nanochat's: a shorter memory as steps shrink)
            frac, warmdown = min(step / 300, 1.0), round(args.warmdown_ratio * num_steps)
            late = min(max(step - (num_steps - warmdown), 0) / max(warmdown, 1), 1.0)  # 0 -> 1 over the warmdown
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95 + late * (args.muon_momentum_final - 0.95)
    return lrm

def optimizer_step(model, optimizer, grad_clip):
    """Clip (optionally) and step, then drop the gradients."""
    # set_to_none below: the next backward writes fresh gradients instead of adding to zeroed ones
    synced = False
    if grad_clip > 0:
        # clip the *global* gradient: average over ranks first (the sharded optimizer would
        # otherwise average inside step(), after each rank clipped its own partial gradient)
        synced = all_reduce_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step(grads_averaged=synced)
    model.zero_grad(set_to_none=True)

def grad_accum_steps(total, per_micro_batch, what):
    """Micro-batches per optimizer step, when `total` must be a whole number of them."""
    if total % per_micro_batch != 0:
        raise SystemExit(f"{what}={total} must be a multiple of {per_micro_batch} (a micro-batch on every rank)")
    return total // per_micro_batch

def build_optimizer(args, model):
    """Muon for the block matrices, AdamW for the embedding and lm_head, LRs from the flags."""
    # --init-lr-frac scales the three LRs together: fine-tuning stages start gentler than pretraining
    muon_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.muon_precision]
    f = args.init_lr_frac
    muon = dict(ns=args.muon_ns, normuon_beta2=args.normuon_beta2, weight_decay=args.muon_weight_decay)
    return model.setup_optimizer(unembedding_lr=args.unembedding_lr * f, embedding_lr=args.embedding_lr * f,
                                 matrix_lr=args.matrix_lr * f, weight_decay=args.weight_decay, muon_dtype=muon_dtype,
                                 scalar_lr=args.scalar_lr * f, muon=muon)

def is_due(step, every, num_steps):
    """True every `every` steps (every <= 0: never) and always at the last step."""
    return step == num_steps or (every > 0 and step % every == 0)

def maybe_compile(model, args, device, dynamic):
    """The fused-kernel switch, then torch.compile when --compile says so (CUDA by default)."""
    if args.fused != "auto":
        model.fused = args.fused == "1"
    if args.compile == "1" or (args.compile == "auto" and device.type == "cuda"):
        return torch.compile(model, dynamic=dynamic)
    return model

# -----------------------------------------------------------------------------
# Where a fine-tuning stage starts from and saves to
def load_starting_model(args, source, stage, device):
    """(model, optimizer, tokenizer, checkpoint_dir, meta) of a fine-tuning stage, from the `source` checkpoint."""
    # with --lora-rank, adapters go on it and only they train; meta is what this stage's checkpoints carry
    with exit_on(FileNotFoundError, ValueError, prefix=f"cannot load the {source} model: "):
        model, tokenizer, source_meta = load_model(source, device, "train", model_tag=args.model_tag, step=args.step)
    tag = source_meta["model_tag"]
    start = {"model_tag": tag, "step": source_meta["step"]}
    # the lineage: the checkpoint this run starts from, and (from its meta) what that one started from, and so on
    lineage = {"stage": source, **start, **({"source": source_meta["source"]} if "source" in source_meta else {})}
    print0(f"starting from {describe_lineage(lineage)}")
    meta = {"model_config": source_meta["model_config"], "user_config": vars(args), "source": lineage}
    output_tag = args.output_tag or tag
    if args.lora_rank > 0:  # on the plain module, before torch.compile
        print0(apply_lora_from_args(model, args))
        optimizer = lora_optimizer(model, lr=args.lora_lr, weight_decay=args.weight_decay)
        # its checkpoints hold only the adapters, "base" names the checkpoint they adapt, and they go to
        # <tag>_lora: beside, never mixed with, the full checkpoints of <tag>
        meta.update(stage=stage, base={"source": source, **start}, lora=model.lora_config)
        output_tag = output_tag if output_tag.endswith("_lora") else f"{output_tag}_lora"
    else:
        optimizer = build_optimizer(args, model)
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[stage][0], output_tag)
    # continuing a stage from its own checkpoint: the new run's steps would overwrite (and mix with) the old run's
    if checkpoint_dir == os.path.join(get_base_dir(), SOURCES[source][0], tag):
        raise SystemExit(f"error: this run would save into {checkpoint_dir}, the checkpoint it starts from "
                         f"(--source {source} --model-tag {tag}): pass --output-tag NEW_TAG to save it elsewhere")
    return model, optimizer, tokenizer, checkpoint_dir, meta

def describe_lineage(source):
    """'sft d4 step 100 <- mid d4 step 800 <- base d4 step 0' of a meta["source"] chain (older checkpoints: "phase")."""
    this = f"{source.get('stage') or source.get('phase')} {source['model_tag']} step {source['step']}"
    return f"{this} <- {describe_lineage(source['source'])}" if source.get("source") else this

# -----------------------------------------------------------------------------
# Checkpoints: save and resume
def save(checkpoint_dir, step, model, optimizer, meta, loader_state, log):
    """Save a step on every rank: weights (or the LoRA adapters), optimizer shards, meta."""
    # the meta holds every rank's loader position and the log's running state (loss EMA, train time),
    # so that --resume continues exactly where this step ended
    if log.world_size > 1:  # each rank reads its own slice of the data: keep all their positions
        gathered = [None] * log.world_size
        dist.all_gather_object(gathered, loader_state)
        loader_state = gathered
    meta = dict(meta, step=step, loader_state=loader_state, trainer=log.state())
    save_checkpoint(checkpoint_dir, step, trained_state(model), optimizer.state_dict(), meta, rank=get_rank(),
                    keep_last=log.args.keep_last or None)
    print0(f"saved checkpoint: {checkpoint_dir} step {step}")

def resume(requested, checkpoint_dir, model, optimizer, meta, device):
    """(step, loader state, saved meta) of the last checkpoint in checkpoint_dir, loaded into model and optimizer."""
    if not requested:  # a fresh run
        return 0, None, None
    if not (steps := list_steps(checkpoint_dir)):
        raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir} to resume from")
    step = steps[-1]
    # each rank its own optimizer shard: a run resumes with the number of ranks it was saved with
    state, optimizer_state, saved = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=get_rank())
    # refused if trained with other LoRA flags, base, model config (windows, seq len) or batch: it would "resume" another run
    for key in ("lora", "base", "model_config"):
        if saved.get(key) != meta.get(key):
            hint = " (it holds LoRA adapters: resume with the same --lora-* flags)" if saved.get("lora") else ""
            raise SystemExit(f"--resume: {checkpoint_dir} step {step} was trained with {key} {saved.get(key)}, this run has {meta.get(key)}{hint}")
    if (was := saved.get("user_config", {}).get("total_batch_size")) != (now := meta.get("user_config", {}).get("total_batch_size")):
        raise SystemExit(f"--resume: {checkpoint_dir} step {step} took steps of {was} tokens, this run {now}: another schedule")
    # strict where it matters: a LoRA checkpoint must fill every adapter, a full one every weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise SystemExit(f"--resume: {checkpoint_dir} step {step} does not fit this model "
                         f"(missing {sorted(trained & set(missing))[:3]}, unexpected {unexpected[:3]})")
    if isinstance(optimizer_state, list):  # saved before the one-optimizer redesign: [AdamW, Muon], or LoRA's [AdamW]
        raise SystemExit(f"--resume: {checkpoint_dir} step {step} holds the optimizer state of an older nanochat "
                         "(two optimizers), which this one cannot continue; its weights still load for chat and eval")
    optimizer.load_state_dict(optimizer_state)
    print0(f"resumed from {checkpoint_dir} at step {step}")
    return step, saved.get("loader_state"), saved

def finish(log, model, meta):
    """A stage's last act: tear down the process group; return the log, with what the tests inspect."""
    compute_cleanup()
    gc.unfreeze()  # TrainLog froze the run's objects: a caller running more stages in-process (tests) gets them back
    log.model, log.meta = model, meta  # log.num_steps, log.history, ... are there already
    return log

# -----------------------------------------------------------------------------
# The progress line
class TrainLog:
    """One line per step (loss, its EMA, LR multiplier, tok/s, MFU, ETA), the same to wandb, and a history."""
    # the history (steps, losses, metrics, evaluations) is what the tests and the report card read
    def __init__(self, stage, args, num_steps, flops_per_token=None, world_size=1, device_type="cpu", saved=None):
        self.stage, self.args, self.num_steps, self.world_size = stage, args, num_steps, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, get_peak_flops(device_type)
        state = (saved or {}).get("trainer", {})
        self.smooth_loss = state.get("smooth_loss", 0.0)
        self.train_time = state.get("train_time", 0.0)  # seconds in training steps (no eval/save), across resumes
        self.history, self.metrics_history, self.eval_history = [], [], []
        self.wandb = init_wandb(args.run, f"nanochat-{stage}", vars(args), get_rank() == 0)
    def state(self):
        return {"smooth_loss": self.smooth_loss, "train_time": self.train_time}
    def step(self, step, t0, lrm, loss, tokens, metrics=None):
        """Log a finished step: its loss and metrics (device tensors) and this rank's tokens."""
        # all read in ONE host sync, the only one of the step: tokens are summed over ranks, loss and
        # metrics averaged, with one all_reduce and one .tolist()
        metrics = metrics or {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(())
                              for v in [loss, *metrics.values(), tokens]])
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        loss, *rest, tokens = values.tolist()
        loss, metrics = loss / self.world_size, {name: v / self.world_size for name, v in zip(metrics, rest)}
        dt = time.time() - t0
        if not math.isfinite(loss):
            raise SystemExit(f"loss is {loss} at step {step}: diverged (lower the LRs?)")
        beta = 0.9  # EMA of the loss, debiased, for a readable curve
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * loss
        ema = self.smooth_loss / (1 - beta ** step)
        self.history.append((step, loss))
        if metrics:
            self.metrics_history.append((step, metrics))
        if step > 1:  # the first step pays for compilation and warm-up: not representative
            self.train_time += dt
        if len(self.history) == 1:  # this process's first step (a resumed run's too)
            # what exists after it (model, loader buffers, compiled graphs) lives for the whole run: frozen, the
            # collector never scans it again (nanochat measured ~0.5 s pauses of full collections over it on GPU)
            gc.collect()
            gc.freeze()
        # from the mean step time so far (train_time survives a resume, like step)
        eta = (self.train_time / (step - 1) if step > 1 else dt) * (self.num_steps - step)
        # model FLOPs utilisation, of the GPUs' bf16 peak (unknown on CPU: no MFU)
        mfu = (100 * self.flops_per_token * tokens / dt / (self.peak_flops * self.world_size)
               if self.flops_per_token and self.peak_flops else None)
        if step % self.args.log_every == 0 or step == self.num_steps:
            print0(f"{self.stage} step {step:05d}/{self.num_steps:05d} ({100 * step / self.num_steps:.1f}%) | "
                   f"loss {loss:.4f} (ema {ema:.4f}) | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tokens / dt:,.0f}"
                   + (f" | mfu {mfu:.1f}%" if mfu is not None else "") + f" | eta {format_eta(eta)}"
                   + "".join(f" | {name} {value:.4f}" for name, value in metrics.items()))
        self.wandb.log({"step": step, "train/loss": loss, "train/lrm": lrm, "train/tok_per_sec": tokens / dt,
                        **({"train/mfu": mfu} if mfu is not None else {}),
                        **{f"train/{name}": value for name, value in metrics.items()}})
        return loss
    def evaluated(self, step, results):  # returns results, so a stage writes last_eval = log.evaluated(...)
        self.eval_history.append((step, results))
        self.wandb.log({"step": step, **results})
        return results
