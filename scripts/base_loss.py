"""Bits per byte of a checkpoint on the train and val splits of a corpus, and a few greedy samples.
    python -m scripts.base_loss                         # the base model, on the corpus it was trained on
    python -m scripts.base_loss --data ~/books/ --split-tokens 1000000     # your own text"""
import argparse
import time

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import DataError, HelpFormatter, autocast_ctx, compute_cleanup, compute_init, exit_on, print0
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state
from nanochat.dataset import Corpus
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

# a fact, a step of reasoning, a list, algebra; base_train samples the same ones, so the outputs compare
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]

# [(prompt, continuation)] decoded greedily, all prompts in one batch (the Engine's KV cache)
def greedy_samples(model, tokenizer, prompts, max_tokens):
    from nanochat.engine import Engine  # only needed here, and it is a big import
    encoded = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    outputs = Engine(model, tokenizer, use_tools=False).generate_multi(encoded, max_tokens=max_tokens, temperature=0.0)
    return [(p, tokenizer.decode(results[0][len(ids):])) for p, ids, (results, _) in zip(prompts, encoded, outputs)]

def open_corpus(args, meta):
    """(its name, val_data, Corpus): the corpus the flags name, else the one the base training run recorded."""
    # a base checkpoint is measured on its own training corpus by default; other sources (mid,
    # sft) were trained on conversations, so for them the default is the FineWeb-Edu shards
    trained = meta.get("user_config", {}) if args.source == "base" else {}
    data = args.data if args.data is not None else trained.get("data")
    # the recorded val_data belongs to the recorded data: a --data of your own drops it
    val_data = args.val_data if args.val_data is not None else (trained.get("val_data") if args.data is None else None)
    # txt_doc_chars: the flag's or the recorded one if set (>= 0), else base_train's default, ~2 rows' worth
    chars = [c for c in (args.txt_doc_chars, trained.get("txt_doc_chars")) if c is not None and c >= 0]
    txt_doc_chars = chars[0] if chars else 2 * meta["model_config"]["sequence_len"]
    # one Corpus for both splits: the files are read (and checked) once
    return data or "FineWeb-Edu shards", val_data, Corpus(data, val_data=val_data, txt_doc_chars=txt_doc_chars)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_args(parser, default_source="base")
    # by default, the corpus the base training run used (recorded in the checkpoint), else the shards
    parser.add_argument("--data", default=None, help="corpus to measure: file, folder or glob of .txt/.jsonl/.parquet")
    parser.add_argument("--val-data", default=None, help="explicit validation text (default: held out from --data)")
    parser.add_argument("--txt-doc-chars", type=int, default=-1, help="chars per .txt document (-1: as in training)")
    parser.add_argument("--split-tokens", type=int, default=20 * 524288,
                        help="tokens per split (whole batches, at most one pass)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass per device")
    parser.add_argument("--sample-tokens", type=int, default=24, help="tokens per greedy sample (0 = no samples)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt to sample from (repeatable)")
    args = parser.parse_args(argv)
    _, rank, _, world_size, device = compute_init(args.device)
    with exit_on(FileNotFoundError, DataError):  # no checkpoint or tokenizer; bad or missing data
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        token_bytes = get_token_bytes(device)
        data_name, val_data, corpus = open_corpus(args, meta)
        B, T = args.device_batch_size, model.config.sequence_len
        # whole batches of every rank, and at least one: bpb of a few tokens beats none
        steps = max(1, args.split_tokens // (B * T * world_size))
        print0(f"{args.source} model {meta['model_tag']} step {meta['step']}: bpb over {steps} batches of {B}x{T} "
               f"tokens x {world_size} rank(s) per split, data: {data_name}")
        t0, results = time.time(), {}
        for split in ("train", "val"):
            # at most one pass over each split: a small corpus is measured whole, not looped over for minutes
            loader = tokenizing_distributed_data_loader_with_state(tokenizer, B, T, split, device=device, data=corpus,
                                                                   num_epochs=1)
            with autocast_ctx(device.type):
                results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
            print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")
    seconds = time.time() - t0
    # samples on rank 0 only (the bpb is already summed over ranks); get_report() is a no-op on the others
    samples = []
    if rank == 0 and args.sample_tokens > 0:
        with autocast_ctx(device.type):
            samples = greedy_samples(model, tokenizer, args.prompt or SAMPLE_PROMPTS, args.sample_tokens)
        print0("\n".join(f"{prompt!r} -> {continuation!r}" for prompt, continuation in samples))
    get_report().log(section=f"Loss evaluation ({args.source})", data=[
        {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"], "data": data_name,
         "val_data": val_data, "split_tokens": steps * B * T * world_size}, {**results, "eval_time_s": round(seconds, 1)},
        ("Greedy samples:\n\n" + "\n".join(f"    {p!r} -> {c!r}" for p, c in samples)) if samples else None])
    compute_cleanup()
    return {**results, "samples": samples}

if __name__ == "__main__":
    main()
