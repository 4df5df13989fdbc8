"""Pretrain the base model on the default web corpus or on your own text.
    python -m scripts.base_train --depth=4 --device-batch-size=8 [--data ~/books/]   # one process, [your corpus]
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20                     # 8 GPUs"""
import argparse
import math
import os
import time
from dataclasses import asdict

import torch

from nanochat import training
from nanochat.checkpoint_manager import SOURCES
from nanochat.common import HelpFormatter, autocast_ctx, compute_init, exit_on, get_base_dir, print0
from nanochat.dataloader import data_budget, tokenizing_distributed_data_loader_with_state
from nanochat.dataset import Corpus, DataError
from nanochat.gpt import GPT, GPTConfig
from nanochat.hopper import FA3, use_fp8
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from scripts.base_loss import SAMPLE_PROMPTS

def model_config_from_args(args, vocab_size):
    # one dial: --depth sets the width (depth × aspect ratio), cut into heads of --head-dim
    model_dim = args.depth * args.aspect_ratio
    if args.depth < 1 or model_dim % args.head_dim != 0:
        raise SystemExit(f"--depth={args.depth} gives width {args.depth} × {args.aspect_ratio} = {model_dim}, which is "
                         f"not a multiple of --head-dim={args.head_dim}: pick a depth that fits, or change "
                         f"--head-dim / --aspect-ratio")
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        raise SystemExit(f"--window-pattern must be letters S and L (e.g. SSSL), got {args.window_pattern!r}")
    num_heads = model_dim // args.head_dim
    num_kv_heads = args.num_kv_heads or num_heads
    if num_heads % num_kv_heads != 0:
        raise SystemExit(f"--num-kv-heads={num_kv_heads} must divide the number of heads ({num_heads})")
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=num_heads,
                     n_kv_head=num_kv_heads, n_embd=model_dim, value_embeds=bool(args.value_embeds),
                     layer_lambdas=bool(args.layer_lambdas), window_pattern=args.window_pattern)

def budget_rules(num_params, ref_params, micro_batch_tokens):
    """The batch and LR and weight-decay factors for num_params by nanochat's public rules, tuned at d12 (ref_params,
    a 2^19 batch; both at the same tokens per parameter: D/D_ref = num_params/ref_params): B ∝ D^0.383 (arXiv 2505.13738)
    in micro-batches, LRs × √(B/2^19), weight decay × √(B/2^19)·D_ref/D to keep T_epoch = B/(η·λ·D) (arXiv 2405.13698)."""
    size = num_params / ref_params
    batch = micro_batch_tokens * 2 ** max(0, round(math.log2(2 ** 19 * size ** 0.383 / micro_batch_tokens)))
    lr_scale = (batch / 2 ** 19) ** 0.5
    return batch, lr_scale, lr_scale / size

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one complexity dial")
    g.add_argument("--aspect-ratio", type=int, default=64, help="width = depth × aspect ratio")
    g.add_argument("--head-dim", type=int, default=128, help="dimension of each attention head")
    g.add_argument("--num-kv-heads", type=int, default=0, help="key/value heads for GQA (0 = as many as query heads)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    g.add_argument("--value-embeds", type=int, default=1, choices=[0, 1], help="value embeddings on every other layer")
    g.add_argument("--layer-lambdas", type=int, default=1, choices=[0, 1], help="learned residual and x0 scalars per layer")
    g.add_argument("--window-pattern", default="L", help="attention windows tiled over the layers, the last always L: "
                   "L = full, S = sequence_len // 4 keys (SSSL saves FLOPs only where a kernel skips the masked keys)")
    g.add_argument("--fp8", type=int, default=0, choices=[0, 1], help="the blocks' matmuls in fp8 (torch._scaled_mm: "
                   "Hopper's fast path, emulated slowly elsewhere); the weights and checkpoints stay as they are")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="your corpus: file, folder or glob of .txt/.jsonl/.parquet "
                                                "(default: the downloaded FineWeb-Edu shards)")
    g.add_argument("--val-data", default=None, help="explicit validation text (default: a stable held-out slice of --data)")
    g.add_argument("--txt-doc-chars", type=int, default=-1,
                   help=".txt files are cut into documents of up to this many chars (-1: 2 × --max-seq-len, about "
                        "2 rows' worth, so little is cropped; 0: one document per file)")
    g.add_argument("--target-param-data-ratio", type=float, default=10, help="train for this many tokens per parameter "
                   "(if --num-iterations=-1; 10: value embeddings halve the compute-optimal 20 of Chinchilla)")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (at most one pass over the validation split)")
    g.add_argument("--sample-every", type=int, default=-1, help="print samples every N steps (-1 = at the end only)")
    training.add_training_flags(parser)
    # -1: the batch, LRs and weight decay from the model's size (budget_rules); an explicit batch keeps them as given;
    # half the run in warmdown, as the public GPU-scale recipes do (d6 on CPU: -0.016 val bpb against 0.2)
    parser.set_defaults(total_batch_size=-1, muon_weight_decay=0.28, warmdown_ratio=0.5, muon_momentum_final=0.9)
    args = parser.parse_args(argv)
    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    # the vocabulary size comes from the trained tokenizer (scripts/tok_train.py)
    tokenizer = get_tokenizer()
    # each token's length in bytes: the loss in bits per byte compares across tokenizers and vocab sizes
    token_bytes = get_token_bytes(device)
    config = model_config_from_args(args, tokenizer.get_vocab_size())
    txt_doc_chars = 2 * args.max_seq_len if args.txt_doc_chars < 0 else args.txt_doc_chars
    with exit_on(DataError):  # read (and check) the whole corpus before building anything big
        corpus = Corpus(args.data, val_data=args.val_data, txt_doc_chars=txt_doc_chars)
    print0(corpus.summary())
    # The model: built on the meta device (no memory, no init), then allocated and initialised once
    with torch.device("meta"):
        orig_model = GPT(config)
    orig_model.to_empty(device=device).init_weights()
    use_fp8(orig_model, bool(args.fp8))  # the blocks' linears; lm_head stays bf16: the logits want the precision
    if device.type == "cuda" and FA3 is None and "S" in args.window_pattern.upper():
        print0("warning: windowed layers without FA3: SDPA's masked kernel computes every key (slower than L)")
    model = training.maybe_compile(orig_model, args, device, dynamic=False)  # optimizer and checkpoints see orig_model
    # the parameters set the token budget below, the FLOPs per token the MFU of the progress line
    # (the value-embedding tables are lookups, no FLOPs: the token budget counts the rest, as before they existed)
    num_value_embeds = sum(p.numel() for p in orig_model.value_embeds.parameters())
    num_params, flops_per_token = orig_model.num_params() - num_value_embeds, orig_model.estimate_flops()
    print0(f"model: {asdict(config)}\nparameters: {num_params:,} (+ {num_value_embeds:,} in value embeddings) | "
           f"FLOPs per token: {flops_per_token:e}")
    # How long: a token budget of --target-param-data-ratio tokens per parameter, in optimizer steps
    T, B = args.max_seq_len, args.device_batch_size
    if args.total_batch_size <= 0:
        # the reference is d12 (12 blocks of 12·dim², dim = 12 × aspect ratio, plus embedding and lm_head)
        d12_params = 12 * 12 * (12 * args.aspect_ratio) ** 2 + 2 * config.vocab_size * 12 * args.aspect_ratio
        args.total_batch_size, lr_scale, wd_scale = budget_rules(num_params, d12_params, B * T * world_size)
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            setattr(args, name, getattr(args, name) * lr_scale)
        args.muon_weight_decay *= wd_scale  # 0.28 at d12 (nanochat's tuning), 0.07 at d24
        print0(f"{num_params / d12_params:.3g}× d12: batch {args.total_batch_size:,}, LRs × {lr_scale:.3g}, Muon wd {args.muon_weight_decay:.3g}")
    optimizer = training.build_optimizer(args, orig_model)
    grad_accum = training.grad_accum_steps(args.total_batch_size, B * T * world_size,
                                           "--total-batch-size (device_batch_size × seq_len × world_size)")
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    total_tokens = num_steps * args.total_batch_size
    print0(f"steps: {num_steps:,} × {args.total_batch_size:,} tokens = {total_tokens:,} tokens "
           f"({total_tokens / num_params:.3g} per parameter) | grad accumulation: {grad_accum}")
    # how many passes over the training data that is, measured by packing up to 4096 rows (no more than the run
    # reads), on rank 0 only: the others would measure the same thing (a loud warning if more than 1 pass)
    if rank == 0:
        print0(data_budget(tokenizer, corpus, T, total_tokens, num_rows=min(4096, max(128, total_tokens // T)))["summary"])
    # the meta is what load_model needs to rebuild the model (its config), and how it was trained
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["base"][0], args.model_tag or f"d{args.depth}")
    meta = {"model_config": asdict(config), "user_config": vars(args), "num_params": num_params}
    # --resume: weights, optimizer state, and the loader exactly where that step left the data
    step, loader_state, saved = training.resume(args.resume, checkpoint_dir, orig_model, optimizer, meta, device)
    train_loader = tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "train", device=device, data=corpus,
                                                                 resume_state_dict=loader_state)
    eval_steps = max(1, args.eval_tokens // (B * T * world_size))  # the same val tokens whatever the ranks
    def evaluate(step):
        model.eval()
        # a fresh loader each time: every evaluation reads the very same validation tokens, at most once each
        # (looping over a small split would only repeat them, for minutes)
        val_loader = tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "val", device=device, data=corpus, num_epochs=1)
        with autocast_ctx(device.type):
            bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        if rank == 0 and training.is_due(step, args.sample_every, num_steps):
            # a few greedy completions: the quickest sanity check that the model learns language
            for prompt in SAMPLE_PROMPTS:
                with autocast_ctx(device.type):
                    out = orig_model.generate(tokenizer.encode(prompt, prepend="<|bos|>"), max_tokens=16, temperature=0)
                    print0(f"  {prompt!r} -> {tokenizer.decode(list(out))!r}")
        model.train()
        return log.evaluated(step, {"val_bpb": bpb})

    # -------------------------------------------------------------------------
    # The training loop: one iteration is one optimizer step of --total-batch-size tokens
    log = training.TrainLog("base", args, num_steps, flops_per_token, world_size, device.type, saved)
    # the first batch comes before the loop: from then on each micro-batch fetches the next
    inputs, targets, next_state = next(train_loader)
    last_eval, t_start = {}, time.time()
    while step < num_steps:
        lrm = training.set_schedule(optimizer, step, num_steps, args)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            with autocast_ctx(device.type):
                loss = model(inputs, targets)
            (loss / grad_accum).backward()  # gradients add up over the micro-batches
            loss_sum += loss.detach()  # on the device: reading it now would stall it (one sync per step)
            # tokenize the next batch while the device still works on this one; the position to
            # save is the one after the batch just trained on, not after the one prefetched
            loader_state = next_state
            inputs, targets, next_state = next(train_loader)
        training.optimizer_step(orig_model, optimizer, args.grad_clip)
        step += 1
        # the step's one host sync: its mean loss over the micro-batches, read for the progress line
        log.step(step, t0, lrm, loss_sum / grad_accum, tokens=grad_accum * B * T)
        if training.is_due(step, args.eval_every, num_steps):
            last_eval = evaluate(step)
        if training.is_due(step, args.save_every, num_steps):  # with the last eval's val_bpb in its meta
            training.save(checkpoint_dir, step, orig_model, optimizer, dict(meta, **last_eval), loader_state, log)

    # the number to size --device-batch-size by on a GPU
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min | val bpb {last_eval.get('val_bpb', float('nan')):.4f}"
           + (f" | peak memory {peak_mem:.0f} MiB" if peak_mem else ""))
    get_report().log(section="Base model training", data=[vars(args), {  # (a no-op off rank 0)
        "parameters": num_params, "flops_per_token": f"{flops_per_token:e}", "steps": num_steps, "tokens": total_tokens,
        "tokens_per_param": round(total_tokens / num_params, 2), "min_val_bpb": last_eval.get("val_bpb"),
        "training_time_min": round(log.train_time / 60, 2), "peak_memory_mib": peak_mem}])
    return training.finish(log, orig_model, meta)  # (and the process group torn down)

if __name__ == "__main__":
    main()
