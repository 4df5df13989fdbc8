"""
Pretrain the base model on the default web corpus or on your own text.

    python -m scripts.base_train --depth=4 --device-batch-size=8 ...          # one process
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20              # 8 GPUs
    python -m scripts.base_train --data ~/books/ --depth=8                    # your own corpus

`--depth` is the one complexity dial: width = depth × --aspect-ratio, heads of --head-dim,
and the number of steps follows from a token budget of --target-param-data-ratio × params
(Chinchilla's ~20 tokens per parameter). One process falls back to gradient accumulation,
so the optimizer sees the same --total-batch-size whatever the number of devices.
"""
import argparse
import os
import time
from dataclasses import asdict

import torch

from nanochat.checkpoint_manager import SOURCES
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state
from nanochat.dataset import Corpus, DataError
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import Trainer, add_training_args, build_optimizers, grad_accum_steps, should_compile

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


def model_config_from_args(args, vocab_size):
    """GPTConfig from --depth: width = depth × aspect ratio, split into heads of --head-dim."""
    model_dim = args.depth * args.aspect_ratio
    if args.depth < 1 or model_dim % args.head_dim != 0:
        raise SystemExit(f"--depth={args.depth} gives width {args.depth} × {args.aspect_ratio} = {model_dim}, which is "
                         f"not a multiple of --head-dim={args.head_dim}: pick a depth that fits, or change "
                         f"--head-dim / --aspect-ratio")
    num_heads = model_dim // args.head_dim
    num_kv_heads = args.num_kv_heads or num_heads
    if num_heads % num_kv_heads != 0:
        raise SystemExit(f"--num-kv-heads={num_kv_heads} must divide the number of heads ({num_heads})")
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                     n_head=num_heads, n_kv_head=num_kv_heads, n_embd=model_dim)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one complexity dial")
    g.add_argument("--aspect-ratio", type=int, default=64, help="width = depth × aspect ratio")
    g.add_argument("--head-dim", type=int, default=128, help="dimension of each attention head")
    g.add_argument("--num-kv-heads", type=int, default=0, help="key/value heads for GQA (0 = as many as query heads)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="your corpus: file, folder or glob of .txt/.jsonl/.parquet "
                                                "(default: the downloaded FineWeb-Edu shards)")
    g.add_argument("--val-data", default=None, help="explicit validation text (default: a stable held-out slice of --data)")
    g.add_argument("--txt-doc-chars", type=int, default=-1,
                   help=".txt files are cut into documents of up to this many chars (-1: about 2 rows' worth, "
                        "2 × --max-seq-len, so little is cropped; 0: one document per file)")
    g.add_argument("--target-param-data-ratio", type=float, default=20,
                   help="train for this many tokens per parameter (used when --num-iterations=-1)")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens of validation data per evaluation")
    g.add_argument("--sample-every", type=int, default=-1, help="print samples every N steps (-1 = at the end only)")
    add_training_args(parser)
    args = parser.parse_args(argv)

    ddp, rank, _, world_size, device = compute_init(args.device, seed=args.seed)
    master = rank == 0
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    config = model_config_from_args(args, tokenizer.get_vocab_size())
    try:  # read (and check) the corpus before building anything big
        txt_doc_chars = 2 * args.max_seq_len if args.txt_doc_chars < 0 else args.txt_doc_chars
        corpus = Corpus(args.data, val_data=args.val_data, txt_doc_chars=txt_doc_chars)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print0(corpus.summary())

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    orig_model = model  # optimizers and checkpoints see the plain module
    if should_compile(args.compile, device.type):
        model = torch.compile(model, dynamic=False)
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()
    print0(f"model: {asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e}")

    T, B = args.max_seq_len, args.device_batch_size
    grad_accum = grad_accum_steps(args.total_batch_size, B, T, world_size)
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        num_steps = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    total_tokens = num_steps * args.total_batch_size
    print0(f"steps: {num_steps:,} × {args.total_batch_size:,} tokens = {total_tokens:,} tokens "
           f"({total_tokens / num_params:.1f} per parameter) | grad accumulation: {grad_accum}")

    optimizers = build_optimizers(args, orig_model)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["base"][0], model_tag)
    meta = {"model_config": asdict(config), "user_config": vars(args), "num_params": num_params}
    trainer = Trainer(args, orig_model, optimizers, device=device, ddp=ddp, world_size=world_size, rank=rank,
                      checkpoint_dir=checkpoint_dir, num_steps=num_steps, grad_accum=grad_accum,
                      tokens_per_step=args.total_batch_size, meta=meta, stage="base")
    trainer.maybe_resume()

    train_loader = tokenizing_distributed_data_loader_with_state(
        tokenizer, B, T, "train", device=device, data=corpus, resume_state_dict=trainer.loader_state)

    def next_batch():
        inputs, targets, state = next(train_loader)
        return (inputs, targets), state

    def compute_loss(_model, batch):
        inputs, targets = batch
        return model(inputs, targets)  # the (maybe compiled) module

    eval_steps = max(1, args.eval_tokens // (B * T * world_size))

    def evaluate(step):
        val_loader = tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "val", device=device, data=corpus)
        with autocast_ctx(device.type):
            bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        last = step == num_steps
        if master and (last or (args.sample_every > 0 and step % args.sample_every == 0)):
            for prompt in SAMPLE_PROMPTS:
                tokens = tokenizer.encode(prompt, prepend="<|bos|>")
                with autocast_ctx(device.type):
                    out = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
                print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")
        return {"val_bpb": bpb}

    t0 = time.time()
    last_eval = trainer.run(next_batch, compute_loss, evaluate)
    wall = time.time() - t0
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print0(f"done: {trainer.step} steps in {wall / 60:.1f} min | val bpb {last_eval.get('val_bpb', float('nan')):.4f}"
           + (f" | peak memory {peak_mem:.0f} MiB" if peak_mem else ""))
    if master:
        get_report().log(section="Base model training", data=[
            vars(args),
            {"parameters": num_params, "flops_per_token": f"{flops_per_token:e}", "steps": num_steps,
             "tokens": total_tokens, "tokens_per_param": round(total_tokens / num_params, 2),
             "min_val_bpb": last_eval.get("val_bpb"), "training_time_min": round(trainer.train_time / 60, 2),
             "peak_memory_mib": peak_mem},
        ])
    compute_cleanup()
    return trainer


if __name__ == "__main__":
    main()
