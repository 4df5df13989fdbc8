"""Benchmark BPE tokenizer training: our `rustbpe`, HF `tokenizers` and the `rustbpe` on PyPI (Karpathy's),
on the same corpus, vocab size and split pattern; the merges are compared to ours, in order.

    python -m dev.bench_tokenizer                     # all text under ../shared/data, vocab 32768
    python -m dev.bench_tokenizer --data my_corpus/ --vocab-size 65536 --rounds 3
    python -m dev.bench_tokenizer --reading           # instead: tok_train and base_train's reading, 2 MB..1 GB"""
import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # the PyPI-rustbpe worker runs this file in a venv of its own, without nanochat (or torch): plain help there
    from nanochat.common import HelpFormatter
except ImportError:
    HelpFormatter = argparse.HelpFormatter

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_VENV = REPO_ROOT / "dev" / "bench_out" / "pypi_rustbpe_venv"
# our default split pattern (GPT-4's, numbers in runs of 1-2 digits); passed to every contender. A copy, not
# an import of nanochat.tokenizer's: the worker runs in a venv that may not have nanochat
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
CONTENDERS = ["ours", "hf", "pypi_rustbpe"]

def json_strings(value):
    """Every string inside a parsed JSON value, depth first."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [value] if isinstance(value, str) else [s for v in items for s in json_strings(v)]

def load_corpus(data):
    """All texts under `data` (a file or folder): each blank-line-separated block of .txt, each string of .jsonl."""
    # used as they are, never repeated to look bigger: BPE works on distinct words and their counts, so a
    # repeated corpus adds little work beyond reading it
    data = Path(data)
    files = sorted(p for p in ([data] if data.is_file() else data.rglob("*")) if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise SystemExit(f"no .txt or .jsonl files found under {data}")
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            texts.extend(text.split("\n\n"))
            continue
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
            try:
                texts.extend(json_strings(json.loads(line)) if line.strip() else [])
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no}: invalid JSON: {e}")
    return [t for t in texts if t]

# -----------------------------------------------------------------------------
# The child side: train one contender, write its merges and measurements as JSON. Each trains in a
# process of its own, so that wall time and peak RSS are its own.
def train_rustbpe(texts, vocab_size):
    import rustbpe  # ours, or the PyPI one: which is whichever the venv running this file has
    tok, t0 = rustbpe.Tokenizer(), time.perf_counter()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=PATTERN)
    seconds = time.perf_counter() - t0
    # past the 256 single bytes, which every contender starts from: the merges, in the order they were learnt
    return seconds, [token.hex() for token, _ in sorted(tok.get_mergeable_ranks(), key=lambda item: item[1])[256:]]

def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # split with the same pattern, then map bytes to printable chars (GPT-2's byte-level trick)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - t0
    merges = json.loads(tok.to_str())["model"]["merges"]  # pairs of byte-level characters: the parent maps them back
    return seconds, ["".join(m if isinstance(m, list) else m.split(" ")) for m in merges]

def run_worker(args):
    # peak RSS of this process so far (Linux reports KiB); the corpus alone is the baseline
    def peak_rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    texts, baseline = load_corpus(args.data), peak_rss_mb()
    seconds, merges = (train_hf if args.worker == "hf" else train_rustbpe)(texts, args.vocab_size)
    Path(args.out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
                                          "merges": merges, "n_texts": len(texts),
                                          "n_bytes": sum(len(t.encode("utf-8")) for t in texts)}))

# -----------------------------------------------------------------------------
# The parent side: run every contender in its own process, print a table
def python_for(contender, venv):
    # the PyPI rustbpe also imports as `rustbpe`, so it runs from a venv of its own, made with uv
    if contender != "pypi_rustbpe":
        return sys.executable
    python = Path(venv) / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import rustbpe"], capture_output=True).returncode == 0:
        return str(python)
    print(f"setting up {venv} with the PyPI rustbpe (uv venv + uv pip install rustbpe) ...", flush=True)
    try:
        subprocess.run(["uv", "venv", "--quiet", "--allow-existing", str(venv)], check=True)
        subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(python), "rustbpe"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:  # the error names the command
        raise SystemExit(f"could not set up the PyPI rustbpe ({e}); is uv installed and PyPI reachable? "
                         "Or leave it out: --contenders ours,hf")
    return str(python)

def run_contender(contender, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python_for(contender, args.pypi_venv), str(Path(__file__).resolve()), "--worker", contender,
               "--data", str(args.data.resolve()), "--vocab-size", str(args.vocab_size), "--out", str(out)]
        # our own package must not shadow the PyPI one in the other venv (and vice versa)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        # run from a scratch directory: whatever the contender writes there goes with it
        if (proc := subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)).returncode != 0:
            raise SystemExit(f"{contender} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    if contender == "hf":  # byte-level characters -> the bytes they stand for
        from scripts.export import bytes_to_unicode
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        result["merges"] = [bytes(byte_of[c] for c in m).hex() for m in result["merges"]]
    return result

# -----------------------------------------------------------------------------
# --reading: tok_train, and base_train's data path (read and check the corpus, count its split, then 20
# batches from the loader), on generated inputs: time should grow linearly with the input, memory not at all
LOADER = ("import sys; from nanochat.dataset import Corpus; from nanochat.tokenizer import Tokenizer; from nanochat."
          "dataloader import tokenizing_distributed_data_loader_with_state as L; c = Corpus(sys.argv[1], txt_doc_chars=1024); print("
          "c.summary(), flush=True); all(zip(range(20), L(Tokenizer.from_directory(sys.argv[2]), 8, 512, 'train', data=c)))")

def run_timed(cmd, env):
    """Wall time, peak RSS (MB) and the longest stretch without a line of output (s) of a child process."""
    t0 = last = time.perf_counter()
    silent, proc = 0, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in proc.stdout:
        silent, last = max(silent, time.perf_counter() - last), time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    if status:
        raise SystemExit(f"{cmd[1:3]} failed (wait status {status})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, max(silent, time.perf_counter() - last)

def bench_reading():
    r = random.Random(0)
    words = ["".join(r.choices("abcdefghijklmnopqrstuvwxyz", k=r.randint(2, 9))) for _ in range(20_000)]
    prose = "\n\n".join(" ".join(r.choices(words, k=80)) for _ in range(2000))  # ~1 MB of paragraphs
    # (name, files, extension, the pieces each file is made of)
    cases = [(f"{mb} MB single-line .txt", 1, ".txt", ["word " * 200_000] * mb) for mb in (2, 4, 8, 50)]
    cases += [(f"{50 * n} MB folder of .txt", n, ".txt", [prose + "\n\n"] * 50) for n in (4, 20)]
    cases += [("50 MB .jsonl record + 2000 short", 1, ".jsonl", ['{"text": "'] + ["word " * 200_000] * 50 + ['"}\n']
               + [json.dumps({"text": p}) + "\n" for p in prose.split("\n\n")])]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1", NANOCHAT_BASE_DIR=tmp)  # tok_train's report goes there too
        header = f"| {'input':<32} | {'MB':>5} |" + "".join(f" {w} s | peak RSS MB | max silent s |" for w in ("tok_train", "data path"))
        print(f"tok_train --vocab-size 512 (reads all of it: --max-chars is 2e9) | base_train's data path at T=512 | peak RSS"
              f" of importing torch alone: {run_timed([sys.executable, '-c', 'import torch'], env)[1]:.0f} MB\n{header}\n|"
              + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
        for i, (name, n_files, ext, pieces) in enumerate(cases):
            (data := Path(tmp) / f"data{i}").mkdir()
            for j in range(n_files):
                (data / f"part{j}{ext}").write_text("".join(pieces))
            tok_train = ["-m", "scripts.tok_train", "--data", data, "--vocab-size", "512", "--output-dir", f"{tmp}/tok{i}"]
            results = [run_timed([sys.executable, *c], env) for c in (tok_train, ["-c", LOADER, data, f"{tmp}/tok{i}"])]
            print(f"| {name:<32} | {n_files * sum(map(len, pieces)) / 1e6:5.0f} | "
                  + " | ".join(f"{t:11.1f} | {rss:11.0f} | {q:12.1f}" for t, rss, q in results) + " |", flush=True)

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus: a .txt/.jsonl file or a folder of them")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size (256 bytes + merges)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {CONTENDERS}")
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times, interleaved; report the fastest")
    parser.add_argument("--reading", action="store_true", help="instead: time tok_train and base_train's reading of 2 MB..1 GB")
    parser.add_argument("--pypi-venv", type=Path, default=DEFAULT_VENV, help="venv holding the PyPI rustbpe (created if missing)")
    # how the parent starts a worker: not for people
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.reading:
        return run_worker(args) if args.worker else bench_reading()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    if "ours" not in contenders:
        contenders.insert(0, "ours")  # the reference the others are compared to
    # rounds interleave the contenders, so that a slow spell of a busy machine hits them all alike
    results = {c: [] for c in contenders}
    for round_idx in range(args.rounds):
        for contender in contenders:
            results[contender].append(r := run_contender(contender, args))
            print(f"round {round_idx + 1}/{args.rounds} {contender:>13}: {r['seconds']:7.2f}s  peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
    # the fastest round of each: noise (a busy machine) only ever adds time
    best = {c: min(rs, key=lambda r: r["seconds"]) for c, rs in results.items()}
    ours = best["ours"]
    print(f"\ncorpus: {args.data} ({ours['n_texts']:,} texts, {ours['n_bytes'] / 1e6:.1f} MB), "
          f"vocab {args.vocab_size}, {os.cpu_count()} CPUs, best of {args.rounds} round(s)")
    header = f"| {'contender':<13} | {'train s':>8} | {'vs ours':>7} | {'peak RSS MB':>11} | {'RSS - corpus MB':>15} | {'merges':>6} | identical merges to ours |"
    print(header + "\n|" + "|".join("-" * len(col) for col in header.split("|")[1:-1]) + "|")
    for contender, r in best.items():
        # the first merge that differs from ours; a shorter list differs where it ends
        diff = next((i for i, (a, b) in enumerate(itertools.zip_longest(r["merges"], ours["merges"])) if a != b), None)
        same = "-" if contender == "ours" else "yes" if diff is None else f"no, first differs at merge {diff}"
        print(f"| {contender:<13} | {r['seconds']:8.2f} | {r['seconds'] / ours['seconds']:6.2f}x | "
              f"{r['peak_rss_mb']:11.1f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:15.1f} | {len(r['merges']):6d} | {same} |")

if __name__ == "__main__":
    main()
