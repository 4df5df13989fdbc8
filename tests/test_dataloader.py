"""
nanochat.dataloader: rows are BOS-aligned, packed from whole documents (only the last one in a
row may be cropped, nothing is padded), ranks read disjoint documents, and a state_dict resumes
the exact same batches, across epoch boundaries too.
"""
import json
import random

import pytest
import torch

from nanochat.dataloader import (BestFitBuffer, cropped_fraction, gather_state_dicts,
                                 tokenizing_distributed_data_loader_with_state)
from nanochat.dataset import Corpus, DataError

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
        saved = json.loads(json.dumps(gather_state_dicts(reference[k][2])))  # as it comes back from a checkpoint
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

def test_best_fit_buffer_picks_largest_fitting_then_shortest():
    buffer = BestFitBuffer(row_len=10)
    for n, length in enumerate([5, 9, 3, 9, 12]):
        buffer.add(list(range(length)), (0, n))
    assert len(buffer.pop_largest_fitting(10)) == 9
    assert buffer.refs() == [[0, 0], [0, 2], [0, 3], [0, 4]]  # the older of the two 9s went first
    assert buffer.pop_largest_fitting(2) is None
    length, tokens = buffer.pop_shortest()
    assert length == 3 and tokens == [0, 1, 2]

def test_best_fit_buffer_keeps_at_most_a_row_of_a_long_document():
    # a 5 MB record once sat whole in each of the buffer's 1000 slots (22 GB): only a row of it can be used
    buffer = BestFitBuffer(row_len=10)
    buffer.add(list(range(1_000_000)), (0, 0))
    buffer.add(list(range(4)), (0, 1))
    assert max(len(tokens) for tokens, _ in buffer.docs.values()) == 10
    assert buffer.pop_largest_fitting(10) == [0, 1, 2, 3]
    length, tokens = buffer.pop_shortest()
    assert length == 1_000_000 and tokens == list(range(10))  # cropped counted by the true length

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
