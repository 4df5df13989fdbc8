"""
Train the BPE tokenizer on the pretraining corpus and save it to $NANOCHAT_BASE_DIR/tokenizer/.

    python -m scripts.tok_train                                  # the downloaded FineWeb-Edu shards
    python -m scripts.tok_train --data ~/books/ --vocab-size 16384   # your own corpus
"""
import argparse
import time

import torch

from nanochat.common import DataError, atomic_write, print0
from nanochat.dataset import Corpus
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

def text_iterator(data, max_chars, doc_cap):
    """Training documents, each cropped to doc_cap chars, until max_chars in total."""
    nchars = 0
    # one pass over the train split only: val text must stay unseen, even by the tokenizer
    for document, _position in Corpus(data).iter_documents("train", num_epochs=1):
        # crop long documents, so that a few of them cannot dominate the pair counts
        yield document[:doc_cap]
        nchars += min(len(document), doc_cap)
        if nchars >= max_chars:
            return

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size, including the special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--data", default=None, help="your corpus: file, folder or glob (default: the shards)")
    parser.add_argument("--output-dir", default=None, help="where to save (default: $NANOCHAT_BASE_DIR/tokenizer)")
    args = parser.parse_args()
    # rustbpe prints its own progress while it counts chunks and merges pairs
    t0 = time.time()
    try:
        texts = text_iterator(args.data, args.max_chars, args.doc_cap)
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    train_time = time.time() - t0
    # a small corpus runs out of pairs to merge before it reaches the vocabulary size asked for
    if tokenizer.get_vocab_size() < args.vocab_size:
        print0(f"warning: the corpus only supported {tokenizer.get_vocab_size()} tokens "
               f"(asked for {args.vocab_size}): every chunk became a single token")
    # token_bytes.pt goes next to the tokenizer: bytes per token id (0 for special tokens), what
    # bits-per-byte evaluation divides by (nanochat.tokenizer.get_token_bytes reads it back)
    output_dir = args.output_dir or get_tokenizer_dir()
    tokenizer.save(output_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64)
    atomic_write(f"{output_dir}/token_bytes.pt", lambda f: torch.save(token_bytes, f))
    nonzero = token_bytes[token_bytes > 0].float()
    print0(f"trained a {tokenizer.get_vocab_size()}-token tokenizer in {train_time:.1f}s -> {output_dir}")
    print0(f"token bytes: min {int(nonzero.min())}, max {int(nonzero.max())}, mean {nonzero.mean():.2f}; "
           f"{int((token_bytes == 0).sum())} special tokens")
    get_report().log(section="Tokenizer training", data=[vars(args), {"vocab_size": tokenizer.get_vocab_size(),
                     "train_time_s": round(train_time, 2), "token_bytes_mean": round(nonzero.mean().item(), 3)}])

if __name__ == "__main__":
    main()
