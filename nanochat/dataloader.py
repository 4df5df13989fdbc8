"""
The pretraining dataloader: documents in, (inputs, targets) batches of B x T token ids out.

- Distributed: each rank tokenizes only its own documents (dealt round-robin by the Corpus).
- Every document starts with <|bos|>, and every row starts at a document boundary: a row is
  packed best-fit from a buffer of tokenized documents (the largest one that still fits, again
  and again); when none fits the remaining space, the shortest one is cropped to fill it. No
  padding, and little is cropped when documents are shorter than the row. Measured on public
  domain books with a 4096-token vocabulary: 9% of tokens cropped at T=2048 with the default
  4000-char .txt passages, 7-14% for T=256..2048 with passages of ~2*T chars, but 74% at T=256
  with 4000-char passages (the loader warns when it crops that much).
- Resumable exactly: the state_dict yielded with each batch names the next document to read
  and the documents sitting in the buffer (by reference, not text). Restarting from it gives
  the very same batches as a run that never stopped. It is JSON-serialisable and per rank.
"""
import bisect
from collections import deque
from itertools import islice

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info, print0
from nanochat.dataset import Corpus, DataError

STATE_VERSION = 1
WARN_CROPPED = 0.25  # warn once if more than this fraction of the tokens read is cropped away


class BestFitBuffer:
    """Tokenized documents kept sorted by length, so 'largest that fits' is a binary search.
    Ties go to the oldest document; `refs()` lists documents in arrival order, which is all
    it takes to rebuild an identical buffer."""

    def __init__(self):
        self.keys = []   # sorted (length, arrival number)
        self.docs = {}   # arrival number -> (tokens, ref); dicts keep arrival order
        self.arrivals = 0

    def __len__(self):
        return len(self.keys)

    def add(self, tokens, ref):
        bisect.insort(self.keys, (len(tokens), self.arrivals))
        self.docs[self.arrivals] = (tokens, ref)
        self.arrivals += 1

    def _pop(self, i):
        _, arrival = self.keys.pop(i)
        return self.docs.pop(arrival)[0]

    def pop_largest_fitting(self, room):
        """The longest document of at most `room` tokens (the oldest among equals), or None."""
        i = bisect.bisect_right(self.keys, (room, float("inf"))) - 1
        if i < 0:
            return None
        return self._pop(bisect.bisect_left(self.keys, (self.keys[i][0], -1)))

    def pop_shortest(self):
        return self._pop(0)

    def refs(self):
        return [list(ref) for _, ref in self.docs.values()]


def tokenizing_distributed_data_loader_with_state(tokenizer, B, T, split, device="cpu", data=None,
                                                  resume_state_dict=None, tokenizer_threads=4,
                                                  tokenizer_batch_size=128, buffer_size=1000,
                                                  val_data=None, num_epochs=None):
    """
    Yield (inputs, targets, state_dict) forever (or for num_epochs passes over the data):
    inputs/targets are int64 (B, T) on `device`, targets = inputs shifted by one (each row is
    T+1 consecutive tokens). Both splits loop by default, so an eval can ask for any number of
    steps; build a fresh val loader per evaluation to see the same tokens each time.

    data: None (the downloaded FineWeb-Edu shards), a path/glob spec (see nanochat.dataset), or
          a Corpus (build one and share it between the train and val loaders: it is read once).
    val_data: explicit validation files when data is a path spec.
    resume_state_dict: a state_dict yielded by an earlier run, or a list of them indexed by rank.
    tokenizer_batch_size documents are tokenized at a time on tokenizer_threads threads; the
    buffer holds buffer_size documents to choose from (bigger: better packing, more memory).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    corpus = data if isinstance(data, Corpus) else Corpus(data, val_data=val_data)
    _, rank, _, world_size = get_dist_info()
    device = torch.device(device)
    pin = device.type == "cuda"
    row_len = T + 1
    bos = tokenizer.get_bos_token_id()
    identity = {"version": STATE_VERSION, "corpus": corpus.fingerprint, "split": split, "rank": rank,
                "world_size": world_size, "T": T, "buffer_size": buffer_size}

    buffer = BestFitBuffer()
    cursor = None  # where the document stream continues: the document after the last one buffered
    stats = {"rows": 0, "tokens": 0, "cropped": 0}  # cropped = tokens of documents thrown away
    if resume_state_dict:
        state = _state_for_rank(resume_state_dict, rank, world_size)
        mismatched = {k: (state.get(k), v) for k, v in identity.items() if state.get(k) != v}
        if mismatched:
            raise DataError("cannot resume the dataloader exactly, the state was saved with different settings "
                            "or data: " + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatched.items()))
        cursor, stats = state["cursor"], dict(state["stats"])
        refs = state["buffer"]
        texts = corpus.fetch_documents(refs)
        for ref, tokens in zip(refs, tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)):
            buffer.add(tokens, ref)

    documents = corpus.iter_documents(split, rank=rank, world_size=world_size, start=cursor, num_epochs=num_epochs)
    tokenized = deque()  # (position, tokens) read ahead of the buffer; not part of the state

    def fill_buffer():
        nonlocal cursor
        while len(buffer) < buffer_size:
            if not tokenized:
                chunk = list(islice(documents, tokenizer_batch_size))
                if not chunk:
                    return  # out of data (only with num_epochs)
                token_lists = tokenizer.encode([text for text, _ in chunk], prepend=bos, num_threads=tokenizer_threads)
                tokenized.extend(zip((position for _, position in chunk), token_lists))
            position, tokens = tokenized.popleft()
            buffer.add(tokens, (position.file, position.doc))
            cursor = position.resume_point()

    warned = False
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < row_len:
                fill_buffer()
                if not len(buffer):
                    return  # the data ran out (num_epochs): the partial batch is dropped
                room = row_len - len(row)
                tokens = buffer.pop_largest_fitting(room)
                if tokens is None:
                    tokens = buffer.pop_shortest()
                    stats["cropped"] += len(tokens) - room
                    tokens = tokens[:room]
                row.extend(tokens)
            rows.append(row)
        stats["rows"] += B
        stats["tokens"] += B * row_len
        if not warned and stats["rows"] >= 256 and cropped_fraction({"stats": stats}) > WARN_CROPPED:
            warned = True
            print0(f"warning: the {split} loader crops {cropped_fraction({'stats': stats}):.0%} of the tokens it reads: "
                   f"documents are much longer than a row of {T} tokens (for .txt corpora, lower txt_doc_chars "
                   f"to about 2 x T characters)")
        batch = torch.tensor(rows, dtype=torch.long)
        # page-locked host copies let the host->GPU transfer run asynchronously with compute
        inputs = torch.empty((B, T), dtype=torch.long, pin_memory=pin).copy_(batch[:, :-1])
        targets = torch.empty((B, T), dtype=torch.long, pin_memory=pin).copy_(batch[:, 1:])
        state_dict = dict(identity, epoch=cursor["epoch"], cursor=dict(cursor), buffer=buffer.refs(), stats=dict(stats))
        yield inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin), state_dict


def _state_for_rank(state, rank, world_size):
    if isinstance(state, (list, tuple)):
        if len(state) != world_size:
            raise DataError(f"the dataloader state holds {len(state)} ranks but this run has {world_size}")
        state = state[rank]
    if not isinstance(state, dict) or "cursor" not in state or "buffer" not in state:
        raise DataError("resume_state_dict is not a dataloader state (expected the dict yielded with a batch)")
    return state


def gather_state_dicts(state_dict):
    """Every rank's loader state, in rank order, so rank 0 can store them all in the checkpoint
    meta (resume_state_dict accepts the list and each rank picks its own). Call on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state_dict]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state_dict)
    return states


def tokenizing_distributed_data_loader(*args, **kwargs):
    """Like tokenizing_distributed_data_loader_with_state, yielding just (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state(*args, **kwargs):
        yield inputs, targets


def cropped_fraction(state_dict):
    """Fraction of the tokens read that were cropped away so far (packing waste)."""
    stats = state_dict["stats"]
    return stats["cropped"] / max(1, stats["tokens"] + stats["cropped"])
