"""How well does our tokenizer compress? Bytes per token on varied texts, beside GPT-2's and GPT-4's.
    python -m scripts.tok_eval [--text-file my_domain.txt ...]"""
import argparse
import re
from pathlib import Path

from nanochat.common import HelpFormatter
from nanochat.tokenizer import Tokenizer, get_tokenizer

# the texts measured by default: prose, code, math and three other languages (edit them there, or add yours)
SAMPLES_FILE = Path(__file__).resolve().with_name("tok_eval_samples.txt")

# the bytes of a text, then for each tokenizer its tokens and bytes per token (higher: compresses better);
# the name column is as wide as the longest name: a name cut short could be any of several files
def table_row(name, width, nbytes, num_tokens):
    return f"{name:<{width}} {nbytes:>8}" + "".join(f" {n:>10} {nbytes / max(n, 1):>10.2f}" for n in num_tokens)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer folder (None: $NANOCHAT_BASE_DIR/tokenizer)")
    parser.add_argument("--text-file", action="append", default=[], help="extra text file(s) to measure, e.g. your own")
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="read at most this many chars of a --text-file")
    parser.add_argument("--no-stock", action="store_true", help="skip the GPT-2 / GPT-4 comparison columns")
    args = parser.parse_args(argv)
    contenders = [("ours", Tokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer())]
    # {name: text} of the file's `=== name ===` sections (lines before the first one are notes)
    parts = re.split(r"^=== (.+) ===\n", SAMPLES_FILE.read_text(encoding="utf-8"), flags=re.M)
    samples = {name: text.removesuffix("\n") for name, text in zip(parts[1::2], parts[2::2])}
    for path in args.text_file:
        # errors="replace": a stray bad byte in your file should not stop the measurement
        with open(path, encoding="utf-8", errors="replace") as f:
            samples[path] = f.read(args.max_chars)  # as typed: two val.txt of different folders stay two rows
    for label, name in [] if args.no_stock else [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
        # tiktoken downloads a stock encoding on first use: offline, its column is left out with a note
        try:
            contenders.append((label, Tokenizer.from_pretrained(name)))
        except Exception as e:  # whatever tiktoken raises without a network
            print(f"note: {label} ({name}) column skipped: could not load it ({type(e).__name__}); "
                  f"tiktoken downloads it on first use — offline?")
    # UTF-8 bytes: the one measure of a text's size that no tokenizer decides
    sizes = {name: len(text.encode("utf-8")) for name, text in samples.items()}
    tokens = {name: [len(enc.encode(text)) for _, enc in contenders] for name, text in samples.items()}
    width = max(map(len, samples))
    header = f"{'text':<{width}} {'bytes':>8}" + "".join(f" {label + ' tok':>10} {label + ' B/tok':>10}"
                                                        for label, _ in contenders)
    # a bigger vocabulary compresses better by itself: compare at similar sizes
    print("vocab: " + ", ".join(f"{label}={enc.get_vocab_size()}" for label, enc in contenders))
    print(header + "\n" + "-" * len(header))
    for name in samples:
        print(table_row(name, width, sizes[name], tokens[name]))
    # the last row pools every text: total bytes over total tokens, not a mean of the ratios
    total_bytes, total_tokens = sum(sizes.values()), [sum(column) for column in zip(*tokens.values())]
    print("-" * len(header) + "\n" + table_row("all", width, total_bytes, total_tokens))
    return {label: total_bytes / max(n, 1) for (label, _), n in zip(contenders, total_tokens)}

if __name__ == "__main__":
    main()
