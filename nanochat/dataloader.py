"""
The pretraining dataloader: documents in, B x T batches of token ids out, resumable exactly.

    for inputs, targets, state in tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "train"):
"""
import bisect
from itertools import islice

import torch
import torch.distributed as dist

from nanochat.common import DataError, get_dist_info, print0
from nanochat.dataset import Corpus

STATE_VERSION = 1
WARN_CROPPED = 0.25  # warn once if more than this fraction of the tokens read is cropped away

# Every row starts with a whole document (<|bos|> first) and is packed best-fit, without padding.
# Little is cropped when documents are shorter than a row: on public domain books, vocab 4096, 9%
# of the tokens at T=2048 with the default 4000-char .txt passages, 7-14% for T=256..2048 with
# passages of ~2*T chars, but 74% at T=256 with 4000-char passages (hence WARN_CROPPED).
class BestFitBuffer:
    """Tokenized documents kept sorted by length, so 'largest that fits' is a binary search."""
    def __init__(self, row_len):
        # a document longer than a row can only be cropped to one: keep no more of it (1000 whole 5 MB
        # records once took 22 GB), but sort and count it by its tokenized length
        self.row_len = row_len
        self.keys = []   # sorted (length, arrival number): ties go to the oldest document
        self.docs = {}   # arrival number -> (tokens, ref); dicts keep arrival order
        self.arrivals = 0

    def __len__(self):
        return len(self.keys)

    def add(self, tokens, ref):
        bisect.insort(self.keys, (len(tokens), self.arrivals))
        self.docs[self.arrivals] = (tokens[:self.row_len], ref)
        self.arrivals += 1

    def _pop(self, i):
        length, arrival = self.keys.pop(i)
        return length, self.docs.pop(arrival)[0]

    def pop_largest_fitting(self, room):
        """The longest document of at most `room` tokens (the oldest among equals), or None."""
        i = bisect.bisect_right(self.keys, (room, float("inf"))) - 1
        return self._pop(bisect.bisect_left(self.keys, (self.keys[i][0], -1)))[1] if i >= 0 else None

    def pop_shortest(self):
        return self._pop(0)

    def take(self, room, stats):
        """The longest document that fits `room`, else the shortest cropped to it (stats["cropped"] counts the loss)."""
        if (tokens := self.pop_largest_fitting(room)) is None:
            length, tokens = self.pop_shortest()
            stats["cropped"] += length - room
            tokens = tokens[:room]
        return tokens

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
        raise DataError(f"cannot resume the {what} exactly, it was saved with different settings or data: "
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
    # the state is per rank and JSON-serialisable; resuming it needs these to be the same
    identity = {"version": STATE_VERSION, "corpus": corpus.fingerprint, "split": split, "rank": rank,
                "world_size": world_size, "T": T, "buffer_size": buffer_size}
    buffer = BestFitBuffer(row_len)
    cursor = None  # where the document stream continues: the document after the last one buffered
    stats = {"rows": 0, "tokens": 0, "cropped": 0}  # cropped = tokens of documents thrown away
    if resume_state_dict:
        # a list holds every rank's state (see gather_state_dicts): each rank picks its own
        state = resumed_state(resume_state_dict, rank, identity, "dataloader", required=("cursor", "buffer"))
        cursor, stats, refs = state["cursor"], dict(state["stats"]), state["buffer"]
        # the state names the buffered documents, not their text: read them back and re-tokenize
        texts = corpus.fetch_documents(refs)
        for ref, tokens in zip(refs, tokenizer.encode([t[:max_chars] for t in texts], prepend=bos, num_threads=tokenizer_threads)):
            buffer.add(tokens, ref)
    # each rank tokenizes only its own documents (dealt round-robin by the Corpus)
    documents = corpus.iter_documents(split, rank=rank, world_size=world_size, start=cursor, num_epochs=num_epochs)

    def tokenize_documents():
        # tokenizer_batch_size documents per call, on tokenizer_threads threads
        while chunk := [(text[:max_chars], position) for text, position in islice(documents, tokenizer_batch_size)]:
            token_lists = tokenizer.encode([text for text, _ in chunk], prepend=bos, num_threads=tokenizer_threads)
            yield from zip((position for _, position in chunk), token_lists)

    tokenized = tokenize_documents()  # (position, tokens), read ahead of the buffer: not part of the state

    def next_row():
        nonlocal cursor
        row = []
        while len(row) < row_len:
            # top the buffer up from the read-ahead stream (which ends only with num_epochs)
            for position, tokens in islice(tokenized, buffer_size - len(buffer)):
                buffer.add(tokens, (position.file, position.doc))
                cursor = position.resume_point()
            if not len(buffer):
                return None  # the data ran out (num_epochs): this unfinished row is dropped
            # best fit: the largest document that fits the room left, again and again; when none fits, the
            # shortest is cropped to fill the row (the rest of it is thrown away)
            row.extend(buffer.take(row_len - len(row), stats))
        return row

    warned = False
    while True:
        # B rows; fewer only in the last batch of num_epochs passes, so that an evaluation of one
        # pass over a small split sees all of it
        if not (rows := list(islice(iter(next_row, None), B))):
            return
        stats["rows"] += len(rows)
        stats["tokens"] += len(rows) * row_len
        # warn once, and only after enough rows for the fraction to mean something
        if not warned and stats["rows"] >= 256 and (cropped := cropped_fraction({"stats": stats})) > WARN_CROPPED:
            warned = True
            print0(f"warning: the {split} loader crops {cropped:.0%} of the tokens it reads: documents are much longer "
                   f"than a row of {T} tokens (for .txt corpora, lower txt_doc_chars to about 2 x T characters)")
        batch = torch.tensor(rows, dtype=torch.long)
        # page-locked host copies let the host->GPU transfer run asynchronously with compute
        inputs = torch.empty((len(rows), T), dtype=torch.long, pin_memory=pin).copy_(batch[:, :-1])
        targets = torch.empty((len(rows), T), dtype=torch.long, pin_memory=pin).copy_(batch[:, 1:])
        # restarting from this state gives the very batches a run that never stopped would see next
        state_dict = dict(identity, epoch=cursor["epoch"], cursor=dict(cursor), buffer=buffer.refs(), stats=dict(stats))
        yield inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin), state_dict

def gather_state_dicts(state_dict):
    """Every rank's loader state, in rank order, for rank 0 to save in the checkpoint. Call on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state_dict]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state_dict)
    return states

def cropped_fraction(state_dict):
    """Fraction of the tokens read that were cropped away so far (packing waste)."""
    stats = state_dict["stats"]
    return stats["cropped"] / max(1, stats["tokens"] + stats["cropped"])
