"""
The CORE metric of a checkpoint (see nanochat/core_eval.py): in-context learning on 22 tasks
(the DCLM eval bundle, downloaded once), or offline on local files in the shared format.

    python -m scripts.base_eval                                   # base model, the eval bundle
    python -m scripts.base_eval --data-dir ../shared/data/eval --max-per-task 200   # offline, quick
    torchrun --nproc_per_node=8 -m scripts.base_eval -i mid       # midtrained model, 8 GPUs

Prints one line per task and the CORE score, writes the numbers to
$NANOCHAT_BASE_DIR/base_eval/<source>_<tag>_<step>.csv and a section of the report card.
"""
import argparse
import csv
import io
import os
import time

import torch.distributed as dist

from nanochat.checkpoint_manager import SOURCES, add_checkpoint_args, find_largest_model, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.core_eval import CoreDataError, bundle_tasks, download_eval_bundle, evaluate_core, local_tasks
from nanochat.report import get_report


def select_tasks(tasks, wanted):
    if not wanted:
        return tasks
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    by_label = {task.label: task for task in tasks}
    unknown = [name for name in names if name not in by_label]
    if unknown:
        raise CoreDataError(f"--tasks: unknown task(s) {unknown}; available: {', '.join(by_label)}")
    return [by_label[name] for name in names]


def write_csv(path, results, core):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task", "type", "num_fewshot", "num_items", "accuracy", "random_baseline", "centered"])
    for label, r in results.items():
        writer.writerow([label, r["type"], r["num_fewshot"], r["num_items"], f"{r['accuracy']:.6f}",
                         f"{r['random_baseline']:.4f}", f"{r['centered']:.6f}"])
    writer.writerow(["CORE", "", "", "", "", "", f"{core:.6f}"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser, default_source="base")
    parser.add_argument("--max-per-task", type=int, default=-1,
                        help="evaluate at most this many items per task (a seeded sample; -1 = all)")
    parser.add_argument("--tasks", default="", help="comma-separated task labels to run (default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="offline: a folder of task files in the shared format (core/*.jsonl, arc_*.jsonl, "
                             "hellaswag_val.jsonl), e.g. ../shared/data/eval")
    parser.add_argument("--bundle-dir", default=None,
                        help="an eval bundle folder (core.yaml, eval_meta_data.csv, eval_data/); "
                             "default: $NANOCHAT_BASE_DIR/eval_bundle, downloaded on first use")
    parser.add_argument("--bundle-url", default=None,
                        help="where to download the eval bundle from (default: $NANOCHAT_EVAL_BUNDLE_URL or "
                             "nanochat's public bundle)")
    args = parser.parse_args(argv)
    if args.data_dir and args.bundle_dir:
        parser.error("--data-dir and --bundle-dir are alternatives: give one")

    ddp, rank, _, world_size, device = compute_init(args.device)
    try:
        if args.data_dir:
            tasks = local_tasks(args.data_dir)
        else:
            bundle_dir = args.bundle_dir
            if bundle_dir is None:
                if rank == 0:  # one download; the other ranks wait for it
                    bundle_dir = download_eval_bundle(url=args.bundle_url)
                if ddp:
                    dist.barrier()
                bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
            tasks = bundle_tasks(bundle_dir)
        tasks = select_tasks(tasks, args.tasks)
    except CoreDataError as e:
        raise SystemExit(f"error: {e}")

    try:
        model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (train a {args.source} model first: python -m {SOURCES[args.source][1]})")
    step = meta["step"]
    print0(f"CORE on {len(tasks)} task(s), {args.source} model step {step}, {world_size} rank(s)")
    t0 = time.time()
    try:
        with autocast_ctx(device.type):
            out = evaluate_core(model, tokenizer, tasks, device, max_per_task=args.max_per_task)
    except CoreDataError as e:
        raise SystemExit(f"error: {e}")
    seconds = time.time() - t0
    results, core = out["results"], out["core"]
    print0(f"CORE: {core:.4f}  ({seconds:.1f}s)")

    if rank == 0:
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{args.source}_{model_tag}_{step:06d}.csv")
        write_csv(csv_path, results, core)
        print0(f"wrote {csv_path}")
        get_report().log(section=f"CORE evaluation ({args.source})", data=[
            {"source": args.source, "model_tag": model_tag, "step": step,
             "tasks_from": args.data_dir or args.bundle_dir or "eval_bundle", "max_per_task": args.max_per_task},
            {label: round(r["centered"], 4) for label, r in results.items()},
            {"CORE": round(core, 4), "eval_time_s": round(seconds, 1)},
        ])
    compute_cleanup()
    return out


if __name__ == "__main__":
    main()
