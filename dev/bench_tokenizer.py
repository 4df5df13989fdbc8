"""
Benchmark BPE tokenizer training: our `rustbpe` against HF `tokenizers` and the `rustbpe`
package on PyPI (Karpathy's), on the same corpus, vocab size and split pattern.

Each contender trains in its own subprocess, so wall time and peak RSS are its own. The PyPI
`rustbpe` also imports as `rustbpe`, so it runs from a separate venv created on demand with uv.
Merges are compared to ours as byte strings, in order.

    python dev/bench_tokenizer.py                      # all text under ../shared/data, vocab 32768
    python dev/bench_tokenizer.py --data my_corpus/ --vocab-size 65536 --rounds 3

The corpus is used as is (never duplicated to look bigger): every .txt file, split into
blank-line-separated blocks, and every string field of every .jsonl record, each one text.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_VENV = REPO_ROOT / "dev" / "bench_out" / "pypi_rustbpe_venv"
# our default split pattern (GPT-4's, numbers in runs of 1-2 digits); passed to every contender
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
CONTENDERS = ["ours", "hf", "pypi_rustbpe"]


def json_strings(value):
    """Every string inside a parsed JSON value, depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


def load_corpus(data):
    """All texts under `data` (a file or a folder): .txt blank-line blocks, .jsonl string fields."""
    data = Path(data)
    files = sorted(p for p in ([data] if data.is_file() else data.rglob("*")) if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise SystemExit(f"no .txt or .jsonl files found under {data}")
    texts = []
    for path in files:
        if path.suffix == ".txt":
            texts.extend(block for block in path.read_text(encoding="utf-8").split("\n\n") if block)
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{line_no}: invalid JSON: {e}")
                texts.extend(s for s in json_strings(record) if s)
    return texts


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -----------------------------------------------------------------------------
# the child side: train one contender, write merges + measurements as JSON

def train_ours_or_pypi(texts, vocab_size):
    import rustbpe
    tok = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=PATTERN)
    seconds = time.perf_counter() - t0
    ranks = sorted(tok.get_mergeable_ranks(), key=lambda item: item[1])
    return seconds, [token for token, _ in ranks[256:]]


def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # split with the same pattern, then map bytes to printable chars (GPT-2's byte-level trick)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - t0
    # byte-level chars back to bytes: the alphabet is the 256 bytes in GPT-2's char mapping
    byte_of_char = gpt2_char_to_byte()
    merges = json.loads(tok.to_str())["model"]["merges"]
    tokens = []
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        tokens.append(bytes(byte_of_char[c] for c in left + right))
    return seconds, tokens


def gpt2_char_to_byte():
    """GPT-2's byte -> printable unicode char table, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def run_worker(args):
    texts = load_corpus(args.data)
    baseline = peak_rss_mb()
    train = train_hf if args.worker == "hf" else train_ours_or_pypi
    seconds, merges = train(texts, args.vocab_size)
    result = {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "merges": [m.hex() for m in merges],
        "n_texts": len(texts),
        "n_bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    Path(args.out).write_text(json.dumps(result))


# -----------------------------------------------------------------------------
# the parent side: run every contender in its own process, print a table

def python_for(contender, venv):
    if contender != "pypi_rustbpe":
        return sys.executable
    python = Path(venv) / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import rustbpe"], capture_output=True).returncode == 0:
        return str(python)
    print(f"setting up {venv} with the PyPI rustbpe (uv venv + uv pip install rustbpe) ...", flush=True)
    for cmd in (["uv", "venv", "--quiet", "--allow-existing", str(venv)],
                ["uv", "pip", "install", "--quiet", "--python", str(python), "rustbpe"]):
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"could not set up the PyPI rustbpe ({' '.join(cmd)}: {e}); "
                             f"is uv installed and PyPI reachable? Or leave it out: --contenders ours,hf")
    return str(python)


def run_contender(contender, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python_for(contender, args.pypi_venv), str(Path(__file__).resolve()), "--worker", contender,
               "--data", str(args.data), "--vocab-size", str(args.vocab_size), "--out", str(out)]
        # our own package must not shadow the PyPI one in the other venv (and vice versa)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{contender} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus: a .txt/.jsonl file or a folder of them")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size (256 bytes + merges)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {CONTENDERS}")
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times, interleaved; report the fastest")
    parser.add_argument("--pypi-venv", type=Path, default=DEFAULT_VENV, help="venv holding the PyPI rustbpe (created if missing)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    if "ours" not in contenders:
        contenders.insert(0, "ours")  # the reference the others are compared to

    results = {c: [] for c in contenders}
    for round_idx in range(args.rounds):
        for contender in contenders:
            r = run_contender(contender, args)
            print(f"round {round_idx + 1}/{args.rounds} {contender:>13}: {r['seconds']:7.2f}s  peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
            results[contender].append(r)

    ours = min(results["ours"], key=lambda r: r["seconds"])
    print(f"\ncorpus: {args.data} ({ours['n_texts']:,} texts, {ours['n_bytes'] / 1e6:.1f} MB), "
          f"vocab {args.vocab_size}, {os.cpu_count()} CPUs, best of {args.rounds} round(s)")
    header = f"| {'contender':<13} | {'train s':>8} | {'vs ours':>7} | {'peak RSS MB':>11} | {'RSS - corpus MB':>15} | {'merges':>6} | identical merges to ours |"
    print(header)
    print("|" + "|".join("-" * (len(col)) for col in header.split("|")[1:-1]) + "|")
    for contender in contenders:
        best = min(results[contender], key=lambda r: r["seconds"])
        diff = first_difference(best["merges"], ours["merges"])
        same = "yes" if diff is None else f"no, first differs at merge {diff}"
        if contender == "ours":
            same = "-"
        print(f"| {contender:<13} | {best['seconds']:8.2f} | {best['seconds'] / ours['seconds']:6.2f}x | "
              f"{best['peak_rss_mb']:11.1f} | {best['peak_rss_mb'] - best['baseline_rss_mb']:15.1f} | "
              f"{len(best['merges']):6d} | {same} |")


if __name__ == "__main__":
    main()
