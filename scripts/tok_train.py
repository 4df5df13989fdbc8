"""Train the BPE tokenizer on the pretraining corpus and save it to $NANOCHAT_BASE_DIR/tokenizer/.
    python -m scripts.tok_train [--data ~/books/] [--vocab-size 16384]   # default: the downloaded FineWeb-Edu shards"""
import argparse
import time

import torch

from nanochat.common import DataError, HelpFormatter, atomic_write, exit_on, print0
from nanochat.dataset import Corpus
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

# training documents, each cropped to doc_cap (a few long ones must not dominate the pair counts), chars_left in all
def text_iterator(data, chars_left, doc_cap):
    # one pass over the train split only: val text must stay unseen, even by the tokenizer
    for document, _position in Corpus(data).iter_documents("train", num_epochs=1):
        yield document[:doc_cap]
        chars_left -= min(len(document), doc_cap)
        if chars_left <= 0:
            return

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, specials included (the record's)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--data", default=None, help="your corpus: file, folder or glob (default: the shards)")
    parser.add_argument("--output-dir", default=None, help="where to save (default: $NANOCHAT_BASE_DIR/tokenizer)")
    args = parser.parse_args()
    # rustbpe prints its own progress while it counts chunks and merges pairs
    t0 = time.time()
    with exit_on(DataError):
        texts = text_iterator(args.data, args.max_chars, args.doc_cap)
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    train_time, vocab = time.time() - t0, tokenizer.get_vocab_size()
    # a small corpus runs out of pairs to merge before it reaches the vocabulary size asked for
    if vocab < args.vocab_size:
        print0(f"warning: the corpus only supported {vocab} tokens (asked for {args.vocab_size}): every chunk became a "
               f"single token")
    # token_bytes.pt goes next to the tokenizer: bytes per token id (0 for special tokens), what
    # bits-per-byte evaluation divides by (nanochat.tokenizer.get_token_bytes reads it back)
    output_dir = args.output_dir or get_tokenizer_dir()
    tokenizer.save(output_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64)
    atomic_write(f"{output_dir}/token_bytes.pt", lambda f: torch.save(token_bytes, f))
    nonzero = token_bytes[token_bytes > 0].float()
    print0(f"trained a {vocab}-token tokenizer in {train_time:.1f}s -> {output_dir}")
    print0(f"token bytes: min {int(nonzero.min())}, max {int(nonzero.max())}, mean {nonzero.mean():.2f}; "
           f"{int((token_bytes == 0).sum())} special tokens")
    get_report().log(section="Tokenizer training", data=[vars(args), {"vocab_size": vocab,
                     "train_time_s": round(train_time, 2), "token_bytes_mean": round(nonzero.mean().item(), 3)}])

if __name__ == "__main__":
    main()
