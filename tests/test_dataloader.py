"""
nanochat.dataloader: rows are BOS-aligned, packed from whole documents (only the last one in a
row may be cropped, nothing is padded), ranks read disjoint documents (under torchrun too), a
state_dict resumes the exact same batches, across epoch boundaries too, training that runs out of
data says so, and data_budget measures what a token budget needs.
"""
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dataset_rank_worker as rank_worker
from nanochat import dataloader, dataset
from nanochat.dataloader import (BestFitBuffer, cropped_fraction, data_budget,
                                 tokenizing_distributed_data_loader_with_state)
from nanochat.dataset import Corpus, DataError

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture
def corpus(tmp_path):
    """Documents of very different lengths, each tagged "doc N:" so it can be recognised."""
    rng = random.Random(0)
    words = "the cat sat on a mat while seven quiet dogs watched from far away".split()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for n in range(80):
            length = rng.choice([1, 3, 6, 12, 25, 50])
            f.write(json.dumps({"text": f"doc {n}: " + " ".join(rng.choice(words) for _ in range(length))}) + "\n")
    return Corpus(str(tmp_path / "docs.jsonl"), val_fraction=0.1)

def all_documents(corpus, tokenizer, split):
    bos = tokenizer.get_bos_token_id()
    return [tokenizer.encode(text, prepend=bos) for text, _ in corpus.iter_documents(split, num_epochs=1)]

def rows_of(inputs, targets):
    """The T+1 tokens of every row (targets are inputs shifted by one)."""
    return [x.tolist() + [y[-1].item()] for x, y in zip(inputs, targets)]

def split_at_bos(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]

def check_batch(inputs, targets, B, T, bos, documents):
    """BOS-aligned rows made of whole documents, except that the last may be cropped."""
    assert inputs.shape == targets.shape == (B, T)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs[:, 0] == bos).all()
    whole = {tuple(d) for d in documents}
    for row in rows_of(inputs, targets):
        segments = split_at_bos(row, bos)
        assert sum(map(len, segments)) == T + 1  # no padding: every token belongs to a document
        for segment in segments[:-1]:
            assert tuple(segment) in whole
        last = segments[-1]
        assert any(d[:len(last)] == last for d in documents)

def take(loader, n):
    return [next(loader) for _ in range(n)]

def test_rows_are_bos_aligned_whole_documents(corpus, tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    documents = all_documents(corpus, tiny_tokenizer, "train")
    B, T = 4, 48
    loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, B, T, "train", data=corpus, buffer_size=16)
    for inputs, targets, state in take(loader, 30):
        check_batch(inputs, targets, B, T, bos, documents)
    assert state["epoch"] >= 1  # went around the data more than once
    assert 0 < cropped_fraction(state) < 0.5
    json.dumps(state)  # the state goes into the checkpoint's meta JSON

def test_resume_gives_the_same_batches(corpus, tiny_tokenizer):
    B, T = 3, 40
    kwargs = dict(data=corpus, buffer_size=12)
    reference = take(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, B, T, "train", **kwargs), 60)
    assert reference[-1][2]["epoch"] >= 2
    for k in (0, 9, 31, 58):
        saved = json.loads(json.dumps([reference[k][2]]))  # as it comes back from a checkpoint
        resumed = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, B, T, "train", resume_state_dict=saved, **kwargs)
        for inputs, targets, state in reference[k + 1:]:
            x, y, s = next(resumed)
            assert torch.equal(x, inputs) and torch.equal(y, targets) and s == state

def test_tokenizer_batching_does_not_change_the_data(corpus, tiny_tokenizer):
    """Tokenizing ahead in chunks is not part of the state, so it must not matter."""
    def batches(chunk):
        loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus,
                                                               tokenizer_batch_size=chunk, buffer_size=10)
        return take(loader, 25)
    for (x1, y1, _), (x2, y2, _) in zip(batches(3), batches(128)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)

def test_resume_refuses_different_settings(corpus, tiny_tokenizer):
    _, _, state = next(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus))
    with pytest.raises(DataError, match=r"T=32 \(now 64\)"):
        next(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 64, "train", data=corpus, resume_state_dict=state))
    with pytest.raises(DataError, match="split='train' \\(now 'val'\\)"):
        next(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "val", data=corpus, resume_state_dict=state))
    # a state of the version 1 loader (ranks dealt by a running count) cannot resume this one
    old = dict(state, version=1, cursor=dict(state["cursor"], count=7))
    with pytest.raises(DataError, match=r"different settings, data or format: version=1 \(now 3\)"):
        next(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus, resume_state_dict=old))

def set_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))

def doc_tags(inputs, targets, tokenizer):
    bos = tokenizer.get_bos_token_id()
    tags = set()
    for row in rows_of(inputs, targets):
        for segment in split_at_bos(row, bos):
            text = tokenizer.decode(segment[1:])
            if text.startswith("doc ") and ":" in text:
                tags.add(text.split(":")[0])
    return tags

def test_ranks_read_disjoint_documents_and_resume_per_rank(corpus, tiny_tokenizer, monkeypatch):
    seen, states = [], []
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus,
                                                               buffer_size=8, num_epochs=1)
        batches = list(loader)
        seen.append(set().union(*(doc_tags(x, y, tiny_tokenizer) for x, y, _ in batches)))
        states.append(batches[3][2])
        assert batches[3][2]["rank"] == rank
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # a checkpoint stores every rank's state in one list; each rank picks its own
    set_rank(monkeypatch, 1, 2)
    resumed = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus,
                                                            buffer_size=8, num_epochs=1, resume_state_dict=states)
    assert next(resumed)[2]["rank"] == 1
    set_rank(monkeypatch, 0, 3)
    with pytest.raises(DataError, match="holds 2 ranks but this run has 3"):
        next(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus,
                                                           resume_state_dict=states))

def test_val_loader_reads_only_val_documents_and_can_stop(corpus, tiny_tokenizer):
    val_tags = {text.split(":")[0] for text, _ in corpus.iter_documents("val", num_epochs=1)}
    loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 1, 16, "val", data=corpus, num_epochs=1)
    batches = list(loader)  # finite with num_epochs
    seen = set().union(*(doc_tags(x, y, tiny_tokenizer) for x, y, _ in batches))
    assert batches and seen <= val_tags

def test_best_fit_buffer_picks_largest_fitting_then_crops_the_shortest():
    buffer, stats = BestFitBuffer(row_len=10), {"cropped": 0}
    for n, length in enumerate([5, 9, 3, 9, 12]):
        buffer.add(list(range(length)), (0, n))
    assert len(buffer.take(10, stats)) == 9 and stats["cropped"] == 0
    assert buffer.refs() == [[0, 0], [0, 2], [0, 3], [0, 4]]  # the older of the two 9s went first
    assert buffer.take(2, stats) == [0, 1]  # nothing fits 2: the shortest (3) is cropped to it
    assert stats["cropped"] == 1 and buffer.refs() == [[0, 0], [0, 3], [0, 4]]
    assert buffer.take(6, stats) == list(range(5)) and stats["cropped"] == 1

def test_best_fit_buffer_keeps_at_most_a_row_of_a_long_document():
    # a 5 MB record once sat whole in each of the buffer's 1000 slots (22 GB): only a row of it can be used
    buffer = BestFitBuffer(row_len=10)
    buffer.add(list(range(1_000_000)), (0, 0))
    buffer.add(list(range(4)), (0, 1))
    assert max(len(tokens) for tokens, _ in buffer.docs.values()) == 10
    stats = {"cropped": 0}
    assert buffer.take(10, stats) == [0, 1, 2, 3]
    assert buffer.take(10, stats) == list(range(10)) and stats["cropped"] == 1_000_000 - 10  # by the true length

def test_real_text_packs_well(shared_data, tiny_tokenizer):
    corpus = Corpus(str(shared_data / "pretrain" / "train"), txt_doc_chars=400)
    bos = tiny_tokenizer.get_bos_token_id()
    loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 8, 256, "train", data=corpus)
    for inputs, targets, state in take(loader, 20):
        assert (inputs[:, 0] == bos).all()
        assert all(len(split_at_bos(row, bos)) >= 1 for row in rows_of(inputs, targets))
    assert cropped_fraction(state) < 0.2

def test_a_book_sized_record_is_tokenized_only_as_far_as_a_row_can_use(tmp_path, tiny_tokenizer):
    # a corpus of one 2 MB record: each of the buffer's slots once held it tokenized whole (5 MB: 22 GB)
    (tmp_path / "book.jsonl").write_text(json.dumps({"text": "the cat sat on the mat. " * 80_000}) + "\n")
    corpus = Corpus(str(tmp_path / "book.jsonl"), val_fraction=0)
    longest, encode = [0], tiny_tokenizer.encode
    def spy(texts, *args, **kwargs):
        longest[0] = max([longest[0], *map(len, texts)])
        return encode(texts, *args, **kwargs)
    tiny_tokenizer.encode = spy
    try:
        loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, 2, 32, "train", data=corpus, buffer_size=50)
        batches = take(loader, 5)
    finally:
        del tiny_tokenizer.encode
    assert 0 < longest[0] <= 33 * max(tiny_tokenizer.token_bytes())
    # every row is still the book's first 33 tokens, cropped, as when it was tokenized whole
    book = tiny_tokenizer.encode("the cat sat on the mat. " * 20, prepend=tiny_tokenizer.get_bos_token_id())
    assert all(row == book[:33] for x, y, _ in batches for row in rows_of(x, y))

# -----------------------------------------------------------------------------
# Under torchrun, and when the data runs out

@pytest.mark.slow  # two fresh interpreters importing torch: ~10 s on 2 cores
def test_two_torchrun_ranks_read_disjoint_stripes_that_together_are_the_corpus(tmp_path, tiny_tokenizer):
    corpus_dir = rank_worker.make_corpus(tmp_path / "corpus")
    tiny_tokenizer.save(tmp_path / "base" / "tokenizer")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "dataset_rank_worker.py"), str(corpus_dir), str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    corpus = rank_worker.open_corpus(corpus_dir)
    one_process = {(corpus.files[p.file].key, p.doc): rank_worker.TAG.match(text).group(1)
                   for text, p in corpus.iter_documents("train", num_epochs=1)}
    docs = [{tuple(d) for d in r["docs"]} for r in ranks]
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    assert docs[0] | docs[1] == one_process.keys() and sum(len(r["docs"]) for r in ranks) == len(one_process)
    assert all({key for key, _ in d} == {"web.parquet", "notes.txt"} for d in docs)  # each file spread over both
    # the pretraining loader: each rank packs only its own documents, and together they pack (almost) all: only
    # the last unfinished row of each rank is dropped, and a tag cropped away is not seen
    assert [r["state_rank"] for r in ranks] == [0, 1] and all(r["batches"] for r in ranks)
    seen = [set(r["tags"]) for r in ranks]
    assert all(s <= {one_process[ref] for ref in d} for s, d in zip(seen, docs))
    assert len(seen[0] | seen[1]) >= 0.85 * len(one_process)

def test_training_loader_says_loudly_when_the_data_runs_out(corpus, tiny_tokenizer, capsys):
    B, T = 4, 48
    loader = tokenizing_distributed_data_loader_with_state(tiny_tokenizer, B, T, "train", data=corpus, buffer_size=16)
    while next(loader)[2]["epoch"] < 2:
        pass
    warnings = [line for line in capsys.readouterr().out.splitlines() if "data ran out" in line]
    assert len(warnings) == 2 and "pass 2 over the same documents starts now" in warnings[0] and "pass 3" in warnings[1]
    assert all("Add more text to --data" in w for w in warnings)
    # when pass 2 starts, every token of pass 1 has been read: all of the split's documents, tokenized
    one_pass = sum(map(len, all_documents(corpus, tiny_tokenizer, "train")))
    assert [int(re.search(r"after ~([\d,]+) tokens read", w).group(1).replace(",", "")) for w in warnings] == \
        [one_pass, 2 * one_pass]
    # a loader of a set number of passes (an evaluation) ends, and says nothing
    assert list(tokenizing_distributed_data_loader_with_state(tiny_tokenizer, B, T, "val", data=corpus, num_epochs=1))
    assert "ran out" not in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Measuring how many shards a token budget needs

def test_data_budget_matches_a_direct_count(tmp_path, tiny_tokenizer):
    # 600 identical documents of L tokens and rows of 2L + L/2: each row packs two whole and one cropped to L/2
    text = "the quiet cat sat on the mat while the dogs watched"
    L = len(tiny_tokenizer.encode(text, prepend=tiny_tokenizer.get_bos_token_id()))
    (tmp_path / "same.jsonl").write_text("\n".join([json.dumps({"text": text})] * 600) + "\n")
    corpus, room = Corpus(str(tmp_path / "same.jsonl"), val_fraction=0), L // 2
    budget = data_budget(tiny_tokenizer, corpus, T=2 * L + room - 1, tokens=1_000_000, num_rows=128)
    assert budget["tokens_per_doc"] == pytest.approx((2 * L + room) / 3)
    assert budget["cropped"] == pytest.approx((L - room) / (3 * L))
    per_pass = 600 * (2 * L + room) / 3
    assert budget["passes"] == pytest.approx(1_000_000 / per_pass)
    assert budget["shards"] == math.ceil(1.1 * 1_000_000 / per_pass)  # 1 file of 600 documents; +10 %
    assert "WARNING: this run will see its training data" in budget["summary"]
    assert "Add more text to --data" in budget["summary"]
    small = data_budget(tiny_tokenizer, corpus, T=2 * L + room - 1, tokens=per_pass / 2, num_rows=128)
    assert small["passes"] == pytest.approx(0.5) and small["shards"] == 1 and "WARNING" not in small["summary"]

def val_shard():  # the last shard of the corpus ($NANOCHAT_CORPUS, default fineweb-edu)
    return dataset.corpus_shards()[2] - 1

def test_budget_of_shards_counts_their_rows_from_the_metadata(base_dir, tiny_tokenizer, capsys):
    texts = [f"document {i}: " + "the cat sat on the mat " * (1 + i % 7) for i in range(40)]
    os.makedirs(dataset.get_data_dir())
    for index in (0, 1, val_shard()):  # two train shards of 40 rows in row groups of 16
        pq.write_table(pa.table({"text": texts}), os.path.join(dataset.get_data_dir(), dataset.shard_filename(index)),
                       row_group_size=16)
    tiny_tokenizer.save(base_dir / "tokenizer")
    dataloader.main(["--tokens", "200000", "--seq-len", "64", "--rows", "512"])
    out = capsys.readouterr().out.splitlines()
    budget = data_budget(tiny_tokenizer, Corpus(), 64, 200_000, num_rows=512)
    assert int(out[-1]) == budget["shards"] == math.ceil(1.1 * 200_000 / (budget["tokens_per_doc"] * 40))
    assert budget["passes"] == pytest.approx(200_000 / (budget["tokens_per_doc"] * 80))
    assert any(f"python -m nanochat.dataset -n {budget['shards']}" in line for line in out)  # > 1 pass: the fix

@pytest.mark.slow  # a fresh interpreter importing torch: a few seconds
def test_budget_cli_prints_the_shards_needed_last(tmp_path, tiny_tokenizer, shared_data):
    tiny_tokenizer.save(tmp_path / "tokenizer")
    flags = ["--tokens", "2e6", "--seq-len", "512", "--rows", "256", "--data", str(shared_data / "pretrain" / "train")]
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataloader", *flags], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *summary, last = proc.stdout.strip().splitlines()
    assert int(last) >= 1 and "passes over the train split" in summary[0]
