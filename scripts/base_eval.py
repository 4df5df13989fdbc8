"""The CORE metric of a checkpoint (nanochat/core_eval.py), on the DCLM eval bundle or on local files.
    python -m scripts.base_eval                                   # base model, the eval bundle
    torchrun --nproc_per_node=8 -m scripts.base_eval -i mid --data-dir ../shared/data/eval   # offline"""
import argparse
import csv
import io
import os
import time

import torch.distributed as dist

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import (DataError, HelpFormatter, atomic_write, autocast_ctx, compute_cleanup, compute_init, exit_on,
                             get_base_dir, print0)
from nanochat.core_eval import bundle_tasks, download_eval_bundle, evaluate_core, local_tasks
from nanochat.download import DownloadError
from nanochat.report import get_report

def load_tasks(args, ddp, rank):
    # --data-dir: local files, offline; --bundle-dir: a bundle unzipped by hand; neither: download it once
    if not (args.data_dir or args.bundle_dir):
        # one download, by rank 0; the other ranks wait for it, then read the same folder
        if rank == 0:
            download_eval_bundle(url=args.bundle_url)
        if ddp:
            dist.barrier()
    bundle_dir = args.bundle_dir or os.path.join(get_base_dir(), "eval_bundle")
    tasks = local_tasks(args.data_dir) if args.data_dir else bundle_tasks(bundle_dir)
    by_label = {task.label: task for task in tasks}
    # no --tasks: all of them, in their own order
    names = [name.strip() for name in args.tasks.split(",") if name.strip()] or list(by_label)
    if unknown := [name for name in names if name not in by_label]:
        raise DataError(f"--tasks: unknown task(s) {unknown}; available: {', '.join(by_label)}")
    return [by_label[name] for name in names]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_args(parser, default_source="base")
    parser.add_argument("--max-per-task", type=int, default=-1, help="at most this many items per task (-1: all)")
    parser.add_argument("--tasks", default="", help="comma-separated task labels to run (default: all)")
    # where the tasks come from, if not from the download
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None, help="offline: task files in the shared format (../shared/data/eval)")
    where.add_argument("--bundle-dir", default=None, help="an eval bundle folder (default: downloaded on first use)")
    parser.add_argument("--bundle-url", default=None, help="download the bundle from here (or $NANOCHAT_EVAL_BUNDLE_URL)")
    args = parser.parse_args(argv)
    ddp, rank, _, world_size, device = compute_init(args.device)
    # no checkpoint, or bad task data (which can show up as late as when its task is read)
    with exit_on(FileNotFoundError, DataError, DownloadError):
        # the tasks first: a failed download or a bad task list stops us before a model is loaded
        tasks = load_tasks(args, ddp, rank)
        # load_model's FileNotFoundError names the script that makes the missing checkpoint or tokenizer
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        print0(f"CORE on {len(tasks)} task(s), {args.source} model step {meta['step']}, {world_size} rank(s)")
        t0 = time.time()
        with autocast_ctx(device.type):
            out = evaluate_core(model, tokenizer, tasks, device, max_per_task=args.max_per_task)
    seconds, results, core, step = time.time() - t0, out["results"], out["core"], meta["step"]
    print0(f"CORE: {core:.4f}  ({seconds:.1f}s)")
    # the counts are summed over ranks, so every rank holds the same numbers: one writes them
    if rank == 0:
        header = ["task", "type", "num_fewshot", "num_items", "accuracy", "random_baseline", "centered"]
        rows = [[label, r["type"], r["num_fewshot"], r["num_items"], f"{r['accuracy']:.6f}",
                 f"{r['random_baseline']:.4f}", f"{r['centered']:.6f}"] for label, r in results.items()]
        buffer = io.StringIO()
        # the score itself as a last row, so a spreadsheet of several runs lines them up
        csv.writer(buffer).writerows([header, *rows, ["CORE", "", "", "", "", "", f"{core:.6f}"]])
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{args.source}_{meta['model_tag']}_{step:06d}.csv")
        atomic_write(csv_path, buffer.getvalue())
        print0(f"wrote {csv_path}")
        get_report().log(section=f"CORE evaluation ({args.source})", data=[
            {"source": args.source, "model_tag": meta["model_tag"], "step": step,
             "tasks_from": args.data_dir or args.bundle_dir or "eval_bundle", "max_per_task": args.max_per_task},
            {label: round(r["centered"], 4) for label, r in results.items()},
            {"CORE": round(core, 4), "eval_time_s": round(seconds, 1)}])
    compute_cleanup()
    return out

if __name__ == "__main__":
    main()
