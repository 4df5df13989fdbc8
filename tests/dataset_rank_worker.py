"""
torchrun worker for tests/test_dataloader.py (not a test module itself):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dataset_rank_worker.py CORPUS_DIR OUT_DIR

Every rank (gloo, CPU) reads its share of the train split of the corpus that make_corpus wrote, one pass, and
packs it with the pretraining loader (the tokenizer in $NANOCHAT_BASE_DIR); rank 0 writes what each rank
read, (file key, doc index) per document, and the document tags in its batches to OUT_DIR/ranks.json.
Shared helpers live here so that the test and the worker cannot drift apart.
"""
import json
import os
import random
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from nanochat.dataloader import tokenizing_distributed_data_loader_with_state
from nanochat.dataset import Corpus
from nanochat.tokenizer import get_tokenizer

T, B = 48, 2
TAG = re.compile(r"((?:pq|txt) \d+):")

def make_corpus(root):
    """A parquet file of 8 row groups of 8 rows ("pq N: ...") and a .txt file of 20 paragraphs ("txt N: ...")."""
    rng = random.Random(0)
    words = "the cat sat on a mat while seven quiet dogs watched".split()
    def text(tag, low, high):  # low..high characters (a word adds at most 8)
        out, length = f"{tag}:", rng.randint(low, high - 7)
        while len(out) < length:
            out += " " + rng.choice(words)
        return out
    root.mkdir(parents=True, exist_ok=True)
    rows = [text(f"pq {i}", 10, 90) for i in range(64)]
    pq.write_table(pa.table({"text": rows}), root / "web.parquet", row_group_size=8)
    # paragraphs of 36..69 characters: with .txt documents of at most 70, two never join, each is a document
    (root / "notes.txt").write_text("\n\n".join(text(f"txt {i}", 36, 69) for i in range(20)) + "\n")
    return root

def open_corpus(root):
    return Corpus(str(root), txt_doc_chars=70, val_fraction=0.1)

def tags(inputs, targets, tokenizer):
    """The tags of the documents (whole or cropped, if the tag survived) in a batch's rows."""
    bos, found = tokenizer.get_bos_token_id(), set()
    for x, y in zip(inputs.tolist(), targets.tolist()):
        row = x + [y[-1]]
        starts = [i for i, t in enumerate(row) if t == bos]
        for a, b in zip(starts, starts[1:] + [len(row)]):
            if m := TAG.match(tokenizer.decode(row[a + 1:b])):
                found.add(m.group(1))
    return found

def main(corpus_dir, out_dir):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    corpus, tokenizer = open_corpus(corpus_dir), get_tokenizer()
    docs = [(corpus.files[p.file].key, p.doc) for _, p in corpus.iter_documents("train", rank, world_size, num_epochs=1)]
    batches = list(tokenizing_distributed_data_loader_with_state(tokenizer, B, T, "train", data=corpus, num_epochs=1))
    seen = set().union(*(tags(x, y, tokenizer) for x, y, _ in batches))
    mine = {"docs": docs, "batches": len(batches), "tags": sorted(seen), "state_rank": batches[-1][2]["rank"]}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(os.path.join(out_dir, "ranks.json"), "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
