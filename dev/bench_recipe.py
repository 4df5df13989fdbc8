"""The training recipe, old against new, at CPU sizes: val bpb at equal tokens, one ablation row per change.
    python -m dev.bench_recipe --depths 4 6 --tokens 1048576 [--rows old new -ve ...]
Each run is scripts.base_train in a subprocess on the same local data (../shared/data books; validation on
WikiText-2, or --val books: base_train's held-out 1 % of the books), same seed, same batch; "tokens to old" is
where a run's val-bpb curve (linearly interpolated between evaluations) first reaches the old recipe's final bpb,
as a fraction of the old run's tokens. WikiText-2 is another domain (Wikipedia): its bpb can rise late in a run
while the books' falls, which makes its "tokens to old" noisy; the books' held-out slice measures the fit."""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

OLD = ("--value-embeds 0 --layer-lambdas 0 --muon-ns quintic --normuon-beta2 0 --muon-weight-decay 0 --warmdown-ratio 0.2 "
       "--muon-momentum-final 0.95")
# each row: the flags on top of base_train's defaults (the new recipe)
ROWS = {"old": OLD, "new": "", "-ve": "--value-embeds 0", "-lambdas": "--layer-lambdas 0", "-polar": "--muon-ns quintic",
        "-normuon": "--normuon-beta2 0", "-wd": "--muon-weight-decay 0", "+sssl": "--window-pattern SSSL",
        "-warmdown": "--warmdown-ratio 0.2", "-momentum": "--muon-momentum-final 0.95"}

def run(depth, row, args, base_dir):
    """The (tokens, val bpb) curve and seconds of one base_train run."""
    batch = 16 * args.seq_len
    steps = args.tokens // batch
    val = ["--val-data", f"{args.data}/pretrain/val"] if args.val == "wikitext" else []
    cmd = [sys.executable, "-m", "scripts.base_train", "--data", f"{args.data}/pretrain/train", *val, *shlex.split(
           f"--depth {depth} --aspect-ratio 64 --head-dim 64 --max-seq-len {args.seq_len} --device cpu "
           f"--device-batch-size 16 --total-batch-size {batch} --num-iterations {steps} --eval-every {max(1, steps // 8)} "
           f"--eval-tokens 65536 --warmup-ratio 0.02 --seed {args.seed} --model-tag bench_d{depth} --log-every 50 "
           f"{ROWS[row]} {args.extra}")]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, NANOCHAT_BASE_DIR=base_dir))
    if out.returncode != 0:
        raise SystemExit(f"d{depth} {row} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    curve = [(int(s) * batch, float(b)) for s, b in re.findall(r"step (\d+) \| val bpb ([\d.]+)", out.stdout)]
    return curve, time.time() - t0

def tokens_to_reach(curve, target):
    """The first (interpolated) token count at which the curve is at or below target, None if never."""
    for (t0, b0), (t1, b1) in zip([(0, float("inf"))] + curve, curve):
        if b1 <= target:
            return t1 if b0 == float("inf") else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tokens", type=int, default=2 ** 20, help="training tokens per run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--val", default="wikitext", choices=["wikitext", "books"])
    parser.add_argument("--extra", default="", help="flags added to every run (e.g. an LR of a sweep)")
    args = parser.parse_args()
    base_dir = tempfile.mkdtemp(prefix="bench_recipe_")
    # one tokenizer for every run, trained as the CPU preset trains it
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--data", f"{args.data}/pretrain/train", "--vocab-size",
                    "4096"], check=True, capture_output=True, env=dict(os.environ, NANOCHAT_BASE_DIR=base_dir))
    print(f"{'depth':>5} {'row':>9} {'bpb@25%':>8} {'bpb@50%':>8} {'final':>8} {'vs old':>7} {'tokens to old':>13} {'s':>5}")
    for depth in args.depths:
        old_final = None
        for row in args.rows:
            curve, seconds = run(depth, row, args, base_dir)
            (tokens, final), at = curve[-1], dict(curve)
            old_final = final if row == "old" else old_final
            quarter, half = (min(at, key=lambda t, f=f: abs(t - f * tokens)) for f in (0.25, 0.5))
            reach = tokens_to_reach(curve, old_final) if old_final is not None else None
            print(f"{depth:>5} {row:>9} {at[quarter]:>8.4f} {at[half]:>8.4f} {final:>8.4f} "
                  f"{final - old_final if old_final else float('nan'):>+7.4f} "
                  f"{f'{reach / tokens:.2f}x' if reach else 'never':>13} {seconds:>5.0f}", flush=True)
            # the whole curve too, so that runs made apart (one row each, in parallel) can be compared afterwards
            print(f"      curve: {' '.join(f'{t}:{b:.4f}' for t, b in curve)}", flush=True)

if __name__ == "__main__":
    main()
