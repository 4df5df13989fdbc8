"""The pretraining dataloader: documents in, B x T batches of token ids out, resumable exactly.

    for inputs, targets, state in tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "train"):
    python -m nanochat.dataloader --tokens 11.2e9   # the shards a token budget needs, measured (the last line)"""
import argparse
import bisect
import math
from itertools import islice

import torch

from nanochat.common import DataError, HelpFormatter, exit_on, get_dist_info, print0
from nanochat.dataset import Corpus
from nanochat.tokenizer import get_tokenizer

STATE_VERSION = 3  # 2: ranks read stripes of the files; 3: a shuffled corpus interleaves its files
WARN_CROPPED = 0.25  # data_budget warns if more than this fraction of the tokens read is cropped away

# Every row starts with a whole document (<|bos|> first) and is packed best-fit, without padding.
# Little is cropped when documents are shorter than a row: on public domain books, vocab 4096, 9%
# of the tokens at T=2048 with the default 4000-char .txt passages, 7-14% for T=256..2048 with
# passages of ~2*T chars, but 74% at T=256 with 4000-char passages (hence WARN_CROPPED).
class BestFitBuffer:
    """Tokenized documents kept sorted by length, so 'largest that fits' is a binary search."""
    def __init__(self, row_len):
        # a document longer than a row can only be cropped to one: keep no more of it (1000 whole 5 MB
        # records once took 22 GB), but sort and count it by its tokenized length
        self.row_len, self.arrivals = row_len, 0
        self.keys = []   # sorted (length, arrival number): ties go to the oldest document
        self.docs = {}   # arrival number -> (tokens, ref); dicts keep arrival order
    def __len__(self):
        return len(self.keys)
    def add(self, tokens, ref):
        bisect.insort(self.keys, (len(tokens), self.arrivals))
        self.docs[self.arrivals] = (tokens[:self.row_len], ref)
        self.arrivals += 1
    def take(self, room, stats):
        """The longest document of at most `room` tokens (the oldest among equals), else the shortest cropped to
        `room` (stats["cropped"] counts the tokens thrown away)."""
        i = bisect.bisect_right(self.keys, (room, float("inf"))) - 1  # the last key that fits, if any
        length, arrival = self.keys.pop(bisect.bisect_left(self.keys, (self.keys[i][0], -1)) if i >= 0 else 0)
        stats["cropped"] += max(0, length - room)
        return self.docs.pop(arrival)[0][:room]
    def refs(self):
        """The documents in arrival order: adding them again in this order rebuilds this very buffer."""
        return [list(ref) for _, ref in self.docs.values()]

def resumed_state(state, rank, identity, what, required=()):
    """This rank's part of a saved loader state (every rank's under DDP); a DataError unless it was saved with
    `identity` (its "kind", if any, included) and holds the `required` keys."""
    if isinstance(state, (list, tuple)):
        if len(state) != identity["world_size"]:
            raise DataError(f"cannot resume the {what}: the state holds {len(state)} ranks but this run has "
                            f"{identity['world_size']}")
        state = state[rank]
    if not isinstance(state, dict) or state.get("kind") != identity.get("kind") or not set(required) <= state.keys():
        raise DataError(f"cannot resume: the state is not a {what} state (expected the dict saved with a batch)")
    # a state from other data or settings would resume "somewhere": refuse it, saying what differs
    if mismatched := {k: (state.get(k), v) for k, v in identity.items() if state.get(k) != v}:
        raise DataError(f"cannot resume the {what} exactly, it was saved with different settings, data or format: "
                        + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatched.items()))
    return state

def tokenizing_distributed_data_loader_with_state(
        tokenizer, B, T, split, device="cpu", data=None, resume_state_dict=None, tokenizer_threads=4,
        tokenizer_batch_size=128, buffer_size=1000, val_data=None, num_epochs=None):
    """Yield (inputs, targets, state_dict) forever, or for num_epochs passes: int64 (B, T) on `device`,
    targets = inputs shifted by one. data: None (the shards), a path spec, or a Corpus to share."""
    # a Corpus built once and shared by the train and val loaders reads (and checks) the files once
    corpus = data if isinstance(data, Corpus) else Corpus(data, val_data=val_data)
    _, rank, _, world_size = get_dist_info()
    pin = torch.device(device).type == "cuda"
    row_len = T + 1  # T inputs and, shifted by one, T targets
    bos = tokenizer.get_bos_token_id()
    # a document longer than a row is cropped to one: tokenize no more of it (a book as one record took
    # minutes and GBs); no token is longer than max bytes, so this many characters still give >= row_len tokens
    max_chars = row_len * max(tokenizer.token_bytes())
    def encode(texts):
        return tokenizer.encode([text[:max_chars] for text in texts], prepend=bos, num_threads=tokenizer_threads)
    # the state is per rank and JSON-serialisable; resuming it needs these to be the same
    identity = {"version": STATE_VERSION, "corpus": corpus.fingerprint, "split": split, "rank": rank,
                "world_size": world_size, "T": T, "buffer_size": buffer_size}
    buffer = BestFitBuffer(row_len)
    cursor = None  # where the document stream continues: the document after the last one buffered
    # tokens of the documents read, and of those thrown away (cropped); documents packed into rows (whole or cropped)
    stats = {"rows": 0, "tokens": 0, "read": 0, "cropped": 0, "docs": 0}
    if resume_state_dict:
        # a list holds every rank's state (training.save gathers them): each rank picks its own
        state = resumed_state(resume_state_dict, rank, identity, "dataloader", required=("cursor", "buffer"))
        cursor, stats, refs = state["cursor"], dict(state["stats"]), state["buffer"]
        # the state names the buffered documents, not their text: read them back and re-tokenize
        for ref, tokens in zip(refs, encode(corpus.fetch_documents(refs))):
            buffer.add(tokens, ref)
    # each rank reads and tokenizes only its own documents (its stripe of every file, see Corpus.iter_documents)
    documents = corpus.iter_documents(split, rank=rank, world_size=world_size, start=cursor, num_epochs=num_epochs)
    def tokenize_documents():
        # cropped as read, so a chunk never holds whole huge records
        while chunk := [(text[:max_chars], position) for text, position in islice(documents, tokenizer_batch_size)]:
            yield from zip((position for _, position in chunk), encode([text for text, _ in chunk]))
    tokenized = tokenize_documents()  # (position, tokens), read ahead of the buffer: not part of the state
    def next_row():
        nonlocal cursor
        row = []
        while len(row) < row_len:
            # top the buffer up from the read-ahead stream (which ends only with num_epochs)
            for position, tokens in islice(tokenized, buffer_size - len(buffer)):
                # training (an endless stream) went through all of its data: say so, loudly, once per new pass
                if num_epochs is None and position.epoch > (cursor or {"epoch": 0})["epoch"]:
                    print0(f"WARNING: the {split} data ran out after ~{stats['read'] * world_size:,} tokens read: pass "
                           f"{position.epoch + 1} over the same documents starts now. {more_data_hint(corpus)}")
                stats["read"] += len(tokens)
                buffer.add(tokens, (position.file, position.doc))
                cursor = position.resume_point()
            if not len(buffer):
                return None  # the data ran out (num_epochs): this unfinished row is dropped
            # best fit: the largest document that fits the room left, again and again; when none fits, the
            # shortest is cropped to fill the row (the rest of it is thrown away)
            row.extend(buffer.take(row_len - len(row), stats))
            stats["docs"] += 1
        return row
    while True:
        # B rows; fewer only in the last batch of num_epochs passes, so that an evaluation of one
        # pass over a small split sees all of it
        if not (rows := list(islice(iter(next_row, None), B))):
            return
        stats["rows"] += len(rows)
        stats["tokens"] += len(rows) * row_len
        batch = torch.tensor(rows, dtype=torch.long)
        # page-locked host copies let the host->GPU transfer run asynchronously with compute
        inputs = torch.empty((len(rows), T), dtype=torch.long, pin_memory=pin).copy_(batch[:, :-1])
        targets = torch.empty((len(rows), T), dtype=torch.long, pin_memory=pin).copy_(batch[:, 1:])
        # restarting from this state gives the very batches a run that never stopped would see next
        state_dict = dict(identity, epoch=cursor["epoch"], cursor=dict(cursor), buffer=buffer.refs(), stats=dict(stats))
        yield inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin), state_dict

def cropped_fraction(state_dict):
    """Fraction of the tokens read that were cropped away so far (packing waste)."""
    stats = state_dict["stats"]
    return stats["cropped"] / max(1, stats["tokens"] + stats["cropped"])

def more_data_hint(corpus, shards="NUM"):
    return f"Download more: python -m nanochat.dataset -n {shards}" if corpus.data is None else "Add more text to --data"

def data_budget(tokenizer, corpus, T, tokens, num_rows=4096):
    """What `tokens` need (passes over the train split, shards), measured by packing num_rows rows of it."""
    # as training packs it: passes follow on seamlessly (no buffer drained at the end), but not a warning per pass
    loader = tokenizing_distributed_data_loader_with_state(tokenizer, 64, T, "train", data=corpus, num_epochs=10**9)
    stats = [{"tokens": 0, "cropped": 0, "docs": 0}] + [s["stats"] for _, _, s in islice(loader, max(2, num_rows // 64))]
    # measured on the second half: at first best fit crops little, while the long documents that fit no row pile
    # up in its buffer (lognormal lengths like FineWeb's, T=2048: 4 % in the first 256 rows, ~28 % after 2000)
    delta = {k: stats[-1][k] - stats[(len(stats) - 1) // 2][k] for k in ("tokens", "cropped", "docs")}
    per_doc, cropped = delta["tokens"] / max(1, delta["docs"]), cropped_fraction({"stats": delta})
    files = [f for f in corpus.files if f.split != "val"]  # their documents: from parquet metadata, or counted
    docs = sum(f.num_docs * (1 - corpus.val_fraction if f.split == "hash" else 1) for f in files)
    passes = tokens / max(1, per_doc * docs)
    # +10 %: a margin for what these rows do not show (other shards' documents, a crop fraction still drifting)
    shards = math.ceil(1.1 * tokens / max(1, per_doc) / (docs / len(files)))
    summary = (f"data: {per_doc:,.0f} tokens per document read, {cropped:.0%} cropped by packing ({delta['docs']:,} "
               f"documents measured): {tokens:,.0f} tokens are {passes:.2f} passes over the train split, or {shards:,} "
               f"train {'shards' if corpus.data is None else 'files like these'} (+10 %)")
    if cropped > WARN_CROPPED:
        summary += f"\nwarning: packing crops {cropped:.0%} of the tokens read (.txt: try another --txt-doc-chars)"
    if passes > 1:
        summary += f"\nWARNING: this run will see its training data {passes:.1f} times. {more_data_hint(corpus, shards)}"
    return {"tokens_per_doc": per_doc, "cropped": cropped, "passes": passes, "shards": shards, "summary": summary}

def main(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description="The shards a token budget needs, "
                                     "measured on the data present with the trained tokenizer (last line: that number)")
    parser.add_argument("--tokens", type=float, required=True, help="the token budget, e.g. 11.2e9")
    parser.add_argument("--seq-len", type=int, default=2048, help="row length, as base_train's --max-seq-len")
    parser.add_argument("--data", default=None, help="a corpus of your own (default: the downloaded shards)")
    parser.add_argument("--rows", type=int, default=4096, help="rows to pack (the second half is measured)")
    args = parser.parse_args(argv)
    with exit_on(DataError, FileNotFoundError):  # .txt documents cut as base_train's default: 2 rows' worth of chars
        corpus = Corpus(args.data, txt_doc_chars=2 * args.seq_len)
        budget = data_budget(get_tokenizer(), corpus, args.seq_len, args.tokens, args.rows)
    print(budget["summary"], budget["shards"], sep="\n")  # the last line for scripts: the shards (-n) to download

if __name__ == "__main__":
    main()
