"""How well does our tokenizer compress? Bytes per token on varied texts, beside GPT-2's and GPT-4's.

    python -m scripts.tok_eval [--text-file my_domain.txt ...]"""
import argparse

from nanochat.common import HelpFormatter
from nanochat.tokenizer import Tokenizer, get_tokenizer

# prose, code, math and three other languages: a tokenizer trained on English web text compresses
# the first well and the last ones poorly, and the table shows by how much
SAMPLES = {
    "prose": ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of "
              "boiled cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, "
              "had been tacked to the wall. It depicted simply an enormous face, more than a metre wide: the face "
              "of a man of about forty-five, with a heavy black moustache and ruggedly handsome features. Winston "
              "made for the stairs. It was no use trying the lift."),
    # Python in the style of nanochat's own KV cache (nanochat/engine.py)
    "code": ("class KVCache:\n"
             "    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):\n"
             "        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)\n"
             "        self.cache = None\n"
             "        self.pos = 0\n\n"
             "    def insert_kv(self, layer_idx, k, v):\n"
             "        if self.cache is None:\n"
             "            self.cache = torch.empty(self.shape, dtype=k.dtype, device=k.device)\n"
             "        t0, t1 = self.pos, self.pos + k.size(2)\n"
             "        self.cache[layer_idx, 0, :, :, t0:t1] = k\n"
             "        return self.cache[layer_idx, 0, :, :, :t1]\n"),
    "math": ("Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, so the minimum is at x = 2 with f(2) = 12 - 24 + 7 "
             "= -5. The integral of f from 0 to 3 is [x^3 - 6x^2 + 7x]_0^3 = 27 - 54 + 21 = -6. If 48 apples are "
             "split among 6 children, each gets 48/6 = 8; 1234 * 5678 = 7006652; 3.14159 * 2.71828 = 8.5397."),
    "french": ("Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes yeux se "
               "fermaient si vite que je n'avais pas le temps de me dire : « Je m'endors. » Et, une demi-heure "
               "après, la pensée qu'il était temps de chercher le sommeil m'éveillait."),
    "korean": "대한민국은 동아시아의 한반도 남부에 위치한 민주공화국이다. 수도는 서울특별시이며, 공용어는 한국어이다.",
    "chinese": "北京是中华人民共和国的首都，也是全国的政治中心、文化中心、国际交往中心和科技创新中心。",
}

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
    samples = dict(SAMPLES)
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
