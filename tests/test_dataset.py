"""
nanochat.dataset: shard downloads (the CLI, checks, offline; the downloader itself is tested in
test_download.py), user corpora in every format with every kind of bad input, the train/val
split, resumable iteration, ranks that decode only their own stripe of every file.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (Corpus, DataError, _cut_long_line, download_shard, list_parquet_files, read_documents,
                              resolve_data_files, split_txt_documents)
from nanochat.download import DownloadError, OfflineError

REPO_ROOT = Path(__file__).resolve().parents[1]

def write_shard(path, texts, row_group_size=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)

def val_shard():  # the last shard of the corpus ($NANOCHAT_CORPUS, default fineweb-edu)
    return dataset.corpus_shards()[2] - 1

def shard_texts(index, n=10):
    return [f"shard {index} document {i}: " + "some text " * (i + 1) for i in range(n)]

@pytest.fixture
def shards(file_server, base_dir, monkeypatch):
    """Shards 0, 1, 2 and the validation shard, served on loopback; NANOCHAT_DATA_URL points there."""
    for index in (0, 1, 2, val_shard()):
        write_shard(file_server.root / dataset.shard_filename(index), shard_texts(index))
    monkeypatch.setenv("NANOCHAT_DATA_URL", file_server.url)
    return file_server

def shard_path(index):
    return Path(dataset.get_data_dir()) / dataset.shard_filename(index)

# -----------------------------------------------------------------------------
# Downloads

def test_download_cli_happy_path_and_skip(shards):
    assert dataset.main(["-n", "2", "-w", "2"]) == 0
    data_dir = Path(dataset.get_data_dir())
    assert sorted(os.listdir(data_dir)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    for index in (0, 1, val_shard()):
        assert shard_path(index).read_bytes() == (shards.root / dataset.shard_filename(index)).read_bytes()
    # the last shard is the validation split
    corpus = Corpus()
    assert [texts for texts, _ in corpus.iter_documents("val", num_epochs=1)] == shard_texts(val_shard())
    assert len(list(corpus.iter_documents("train", num_epochs=1))) == 20
    # shards already present are not fetched again
    seen = len(shards.requests)
    assert dataset.main(["-n", "2"]) == 0
    assert len(shards.requests) == seen

def test_climbmix_shards_have_a_folder_of_their_own(file_server, base_dir, monkeypatch):
    """NANOCHAT_CORPUS=climbmix: its 6543 shards (the last one val, shard_06542) from its own Hugging Face files,
    into base_data_climbmix, so that FineWeb-Edu shards already in base_data are never mixed in."""
    monkeypatch.setenv("NANOCHAT_CORPUS", "climbmix")
    assert dataset.get_data_url().format(index=6542) == \
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_06542.parquet"
    for index in (0, 1, 6542):
        write_shard(file_server.root / dataset.shard_filename(index), shard_texts(index))
    monkeypatch.setenv("NANOCHAT_DATA_URL", file_server.url)
    (base_dir / "base_data").mkdir(parents=True, exist_ok=True)
    write_shard(base_dir / "base_data" / "shard_00000.parquet", ["a fineweb-edu document"])
    assert dataset.main(["-n", "2"]) == 0
    assert sorted(os.listdir(base_dir / "base_data_climbmix")) == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    corpus = Corpus()
    assert [texts for texts, _ in corpus.iter_documents("val", num_epochs=1)] == shard_texts(6542)
    assert len(list(corpus.iter_documents("train", num_epochs=1))) == 20
    monkeypatch.setenv("NANOCHAT_CORPUS", "fineweb")
    with pytest.raises(DataError, match="NANOCHAT_CORPUS=fineweb: unknown corpus .choose from fineweb-edu, climbmix"):
        dataset.get_data_dir()

def test_data_url_env_forms(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", "http://mirror/x/")
    assert dataset.get_data_url().format(index=7) == "http://mirror/x/shard_00007.parquet"
    monkeypatch.setenv("NANOCHAT_DATA_URL", "http://mirror/s{index}.pq")
    assert dataset.get_data_url().format(index=7) == "http://mirror/s7.pq"
    monkeypatch.delenv("NANOCHAT_DATA_URL")
    assert dataset.get_data_url().format(index=1822).endswith("/resolve/main/shard_01822.parquet")

def test_shard_that_is_not_parquet_is_rejected(shards):
    """Shards are checked before they get their name: a file pyarrow cannot read is deleted and
    fetched again, and never kept, not even as .tmp (the generic cases are in test_download.py)."""
    (shards.root / "shard_00005.parquet").write_bytes(b"<html>not a shard</html>")
    with pytest.raises(DownloadError, match="after 2 attempts: corrupt download .*not a readable parquet file"):
        download_shard(5, attempts=2, backoff=0)
    assert len(shards.requests) == 2
    assert list(Path(dataset.get_data_dir()).iterdir()) == []
    pq.write_table(pa.table({"content": ["a"]}), shards.root / "shard_00005.parquet")
    with pytest.raises(DownloadError, match=r"no 'text' column \(columns: content\)"):
        download_shard(5, attempts=1)
    assert list_parquet_files() == []

def test_shards_download_in_parallel_and_failures_are_listed(shards):
    with pytest.raises(DownloadError, match=r"(?s)2 of 4 shards failed:.*shard_00005.*HTTP 404.*shard_00006.*HTTP 404"):
        dataset.download_shards([0, 1, 5, 6], num_workers=2, backoff=0)
    assert [Path(p).name for p in list_parquet_files()] == ["shard_00000.parquet", "shard_00001.parquet"]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def test_unreachable_server_says_offline(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OfflineError, match=r"cannot reach 127\.0\.0\.1 — offline\? Use --data PATH"):
        download_shard(0, attempts=2, backoff=0)
    assert dataset.main(["-n", "1", "--max-attempts", "1"]) == 1
    assert "offline? Use --data PATH for local text" in capsys.readouterr().err

@pytest.mark.slow  # a fresh interpreter importing torch: a few seconds
def test_offline_cli_exits_nonzero_without_traceback(base_dir):
    env = dict(os.environ, NANOCHAT_DATA_URL=f"http://127.0.0.1:{free_port()}")
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1", "--max-attempts", "1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot reach 127.0.0.1 — offline? Use --data PATH for local text" in proc.stderr
    assert "Traceback" not in proc.stderr

def test_missing_shards_error(base_dir):
    with pytest.raises(DataError, match="python -m nanochat.dataset"):
        Corpus()
    Path(dataset.get_data_dir()).mkdir(parents=True)
    write_shard(shard_path(val_shard()), ["x"])
    with pytest.raises(DataError, match="only one shard"):
        Corpus()

# -----------------------------------------------------------------------------
# .txt splitting

def test_txt_blocks_are_joined_into_passages():
    paragraphs = [f"Paragraph {i} " + "word " * 20 for i in range(30)]  # ~130 chars each
    text = "\n\n".join(paragraphs)
    docs = list(split_txt_documents(text.splitlines(keepends=True), max_chars=500))
    assert all(len(d) <= 500 for d in docs)
    assert all(len(d) > 500 - 140 for d in docs[:-1])  # greedy: nothing else would have fit
    assert "\n\n".join(docs) == "\n\n".join(p.rstrip() for p in paragraphs)  # nothing lost or reordered

def test_txt_long_blocks_and_lines_are_cut_without_losing_words():
    poem = "\n".join(f"    line {i} of a long stanza" for i in range(100))  # one block, indented lines
    prose = " ".join(f"w{i}" for i in range(2000))                           # one huge line
    text = f"Title\n\n{poem}\n\n\n{prose}\n"
    docs = list(split_txt_documents(text.splitlines(keepends=True), max_chars=300))
    assert all(0 < len(d) <= 300 for d in docs)
    assert " ".join(docs).split() == text.split()
    assert any(d.startswith("    line") for d in docs)  # indentation survives

class CountingStr(str):
    """A str that counts the characters copied by slicing it (or the strs sliced or stripped from it)."""
    copied = 0
    def __getitem__(self, key):
        piece = CountingStr(super().__getitem__(key))
        CountingStr.copied += len(piece)
        return piece
    def lstrip(self, chars=None):
        return CountingStr(super().lstrip(chars))

def test_cutting_a_long_line_copies_each_character_once():
    # time-independent: re-slicing the rest of the line for every piece (the old, quadratic code) copies
    # ~len(line)**2 / (2 * max_chars) characters, here ~150x the line; walking an offset copies each once
    CountingStr.copied, line = 0, CountingStr(" ".join(f"w{i % 1000}" for i in range(250_000)))
    pieces = _cut_long_line(line, 4000)
    assert len(next(pieces)) <= 4000 and CountingStr.copied <= 4000  # lazily, a piece at a time
    assert sum(map(len, pieces)) < len(line) and CountingStr.copied <= len(line)

def test_a_huge_single_line_is_cut_in_linear_time(tmp_path):
    """A one-line 20 MB .txt (a dump without newlines): cutting it used to re-slice the rest of the
    line for every piece, quadratic, so a file like this never finished."""
    line = " ".join(f"w{i % 1000}" for i in range(4_000_000))
    pieces = list(_cut_long_line(line, 4000))
    assert all(3990 < len(p) <= 4000 for p in pieces[:-1]) and " ".join(pieces) == line
    assert [len(p) for p in _cut_long_line("x" * 10_001, 4000)] == [4000, 4000, 2001]  # no space: cut mid-word
    (tmp_path / "dump.txt").write_text(line + "\n")
    assert [text for _, text in read_documents(str(tmp_path / "dump.txt"))] == pieces

def test_txt_whole_file_mode_and_blank_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert list(read_documents(str(tmp_path / "a.txt"), txt_doc_chars=0)) == [(0, "one\n\ntwo\n\nthree")]
    assert list(read_documents(str(tmp_path / "a.txt"), txt_doc_chars=8)) == [(0, "one\n\ntwo"), (1, "three")]
    assert list(read_documents(str(tmp_path / "blank.txt"))) == []

def test_real_books_split_into_passages(shared_data):
    book = shared_data / "pretrain" / "train" / "gutenberg" / "pg84_frankenstein.txt"
    text = book.read_text(encoding="utf-8")
    docs = [d for _, d in read_documents(str(book), txt_doc_chars=4000)]
    assert all(len(d) <= 4000 for d in docs)
    assert sum(len(d) for d in docs) / len(docs) > 3000  # long passages, not paragraphs
    assert " ".join(docs).split() == text.split()

# -----------------------------------------------------------------------------
# User corpora: formats, specs and errors

def make_corpus(root):
    """One file of each format in a folder tree, plus files that must be ignored."""
    (root / "books").mkdir(parents=True)
    (root / "books" / "a.txt").write_text("Alpha one.\n\nAlpha two.\n", encoding="utf-8")
    (root / "books" / "b.txt").write_text("Beta.\n", encoding="utf-8")
    (root / "web.jsonl").write_text('{"text": "Gamma."}\n\n{"text": "Delta.", "url": "x"}\n{"text": ""}\n', encoding="utf-8")
    write_shard(root / "table.parquet", ["Epsilon.", None, "Zeta."])
    (root / "README.md").write_text("not data")
    (root / ".hidden.txt").write_text("hidden")
    return root

def all_texts(corpus, split=None):
    splits = [split] if split else ["train", "val"]
    return sorted(text for s in splits for text, _ in corpus.iter_documents(s, num_epochs=1))

def test_folder_is_read_recursively_in_every_format(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    corpus = Corpus(str(root), txt_doc_chars=0)
    assert [f.key for f in corpus.files] == ["books/a.txt", "books/b.txt", "table.parquet", "web.jsonl"]
    assert all_texts(corpus) == sorted(["Alpha one.\n\nAlpha two.", "Beta.", "Gamma.", "Delta.", "Epsilon.", "Zeta."])

def test_file_and_glob_specs(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    assert [k for _, k in resolve_data_files(str(root / "web.jsonl"))] == ["web.jsonl"]
    assert [k for _, k in resolve_data_files(str(root / "books" / "*.txt"))] == ["a.txt", "b.txt"]
    assert [k for _, k in resolve_data_files(str(root / "**" / "*.txt"))] == ["books/a.txt", "books/b.txt"]
    assert len(resolve_data_files([str(root / "web.jsonl"), str(root / "books")])) == 3
    assert all_texts(Corpus(str(root / "books" / "*.txt"), txt_doc_chars=0)) == ["Alpha one.\n\nAlpha two.", "Beta."]

@pytest.mark.parametrize("spec, message", [
    ("nowhere", "no such file or folder"),
    ("*.nothing", "no .txt/.jsonl/.parquet files found"),
    ("README.md", "unsupported file type .md"),
])
def test_specs_that_match_nothing(tmp_path, monkeypatch, spec, message):
    make_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message):
        Corpus(spec)

@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "fine"}', '{"text": "broken'], r"bad\.jsonl:3: malformed JSON"),
    (['{"text": "ok"}', '', '{"body": "no text"}'], r"bad\.jsonl:3: field 'text' is missing \(fields: body\)"),
    (['{"text": 42}'], r"bad\.jsonl:1: field 'text' must be a string, got int"),
    (['["text"]'], r"bad\.jsonl:1: expected an object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        Corpus(str(tmp_path))

def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: no 'text' column \(columns: content\)"):
        Corpus(str(tmp_path))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="column 'text' must hold strings"):
        Corpus(str(tmp_path))

def test_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("first line\n\nsecond line\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:4: not valid UTF-8"):
        Corpus(str(tmp_path))

def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("text\n")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with pytest.raises(DataError, match=r"dangling\.txt: cannot read"):
        Corpus(str(tmp_path))

def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n\n   \n")
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="the corpus is empty"):
        Corpus(str(tmp_path))

# -----------------------------------------------------------------------------
# The train/val split

def numbered_corpus(root, num_files=4, docs_per_file=100):
    root.mkdir(parents=True, exist_ok=True)
    for f in range(num_files):
        lines = [json.dumps({"text": f"file {f} doc {d}"}) for d in range(docs_per_file)]
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root

def test_hash_split_is_stable_disjoint_and_sized(tmp_path):
    corpus = Corpus(str(numbered_corpus(tmp_path / "a")), val_fraction=0.1)
    train, val = all_texts(corpus, "train"), all_texts(corpus, "val")
    assert not set(train) & set(val) and len(train) + len(val) == 400
    assert 20 <= len(val) <= 60
    # the same split after the corpus moved (keys are relative paths)
    assert all_texts(Corpus(str(numbered_corpus(tmp_path / "b")), val_fraction=0.1), "val") == val

def test_split_hash_never_changes():
    """Golden values: a new hash function would silently move documents between train and val
    of every existing corpus (and unlike hash(), blake2b does not depend on PYTHONHASHSEED)."""
    assert dataset._hash_fraction("part0.jsonl", 0) == 0.41686543153849914
    assert dataset._hash_fraction("books/a.txt", 17) == 0.10329722296100714
    assert dataset._hash_fraction("shard_00000.parquet", 123456) == 0.24075421730230548

def test_tiny_corpus_still_gets_one_val_document(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    corpus = Corpus(str(tmp_path), val_fraction=0.01)
    assert len(all_texts(corpus, "val")) == 1 and len(all_texts(corpus, "train")) == 2
    (tmp_path / "a.jsonl").write_text('{"text": "alone"}\n')
    with pytest.raises(DataError, match="every document is held out"):
        Corpus(str(tmp_path))

def test_explicit_val_data_is_removed_from_train(tmp_path):
    root = numbered_corpus(tmp_path / "corpus", num_files=3, docs_per_file=5)
    corpus = Corpus(str(root), val_data=str(root / "part2.jsonl"))
    assert all_texts(corpus, "val") == sorted(f"file 2 doc {d}" for d in range(5))
    assert all_texts(corpus, "train") == sorted(f"file {f} doc {d}" for f in range(2) for d in range(5))

def test_real_corpus_with_held_out_val(shared_data):
    pretrain = shared_data / "pretrain"
    corpus = Corpus(str(pretrain), val_data=str(pretrain / "val"))
    assert [f.key for f in corpus.files if f.split == "val"] == ["wikitext2_valid.txt"]
    assert len(corpus.files) == 11  # 10 training files + the validation file, which is not trained on
    val_docs = list(corpus.iter_documents("val", num_epochs=1))
    assert len(val_docs) > 100 and all(corpus.files[p.file].split == "val" for _, p in val_docs)

# -----------------------------------------------------------------------------
# Iteration: ranks, epochs, exact resume

def test_ranks_get_disjoint_balanced_slices(tmp_path):
    corpus = Corpus(str(numbered_corpus(tmp_path)), val_fraction=0.1)
    everything = all_texts(corpus, "train")
    slices = [[t for t, _ in corpus.iter_documents("train", rank=r, world_size=3, num_epochs=1)] for r in range(3)]
    assert sorted(sum(slices, [])) == everything
    # striped by document index before the hash split: balanced up to the split's randomness
    assert max(map(len, slices)) - min(map(len, slices)) <= len(everything) // 20

def striped_corpus(root):
    """a.parquet: 5 row groups of 3 rows, b.parquet: 1 row group of 2, c.txt: 7 documents of one paragraph."""
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "a.parquet", [f"a {i}" for i in range(15)], row_group_size=3)
    write_shard(root / "b.parquet", ["b 0", "b 1"], row_group_size=3)
    (root / "c.txt").write_text("\n\n".join(f"c {i}" for i in range(7)) + "\n")
    return Corpus(str(root), txt_doc_chars=4, val_fraction=0.1)

def uneven_corpus(root, val_fraction=0.1):
    """20 files of 1..39 documents: two groups of interleaved files (MIX_FILES = 16)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in range(20):
        (root / f"part{f:02d}.jsonl").write_text("".join(json.dumps({"text": f"{f} {d}"}) + "\n" for d in range(1 + 2 * f)))
    return Corpus(str(root), val_fraction=val_fraction)

@pytest.mark.parametrize("make", [lambda root: Corpus(str(numbered_corpus(root)), val_fraction=0.1), striped_corpus,
                                  uneven_corpus], ids=["jsonl", "parquet+txt", "uneven"])
def test_resume_from_any_position_is_exact(tmp_path, make):
    corpus = make(tmp_path)
    reference = list(corpus.iter_documents("train", rank=1, world_size=2, num_epochs=3))
    n = len(reference)
    for k in sorted({k for k in (0, 1, 5, 57, 179, n // 3, n - 1) if k < n}):
        resumed = corpus.iter_documents("train", rank=1, world_size=2, num_epochs=3,
                                        start=json.loads(json.dumps(reference[k][1].resume_point())))
        assert list(resumed) == reference[k + 1:]

def test_a_shuffled_corpus_interleaves_its_files_at_an_even_pace(tmp_path):
    corpus = uneven_corpus(tmp_path, val_fraction=0)
    for epoch in range(2):
        docs = [(p.order, p.file, p.doc) for _, p in corpus.iter_documents("train", start={"epoch": epoch, "order": 0,
                                                                                           "doc": 0}, num_epochs=epoch + 1)]
        assert sorted((f, d) for _, f, d in docs) == sorted((i, d) for i, f in enumerate(corpus.files)
                                                            for d in range(f.num_docs) if corpus.in_split(i, d, "train"))
        # the first 16 files of this epoch's order come first, mixed: each is a quarter through by a quarter of the way
        first, second = [x for x in docs if x[0] < 16], [x for x in docs if x[0] >= 16]
        assert docs == first + second
        quarter = first[:len(first) // 4]
        for i in {f for _, f, _ in first}:
            n = corpus.files[i].num_docs
            assert abs(sum(f == i for _, f, _ in quarter) - n / 4) <= 1, (i, n)
    # a new order of the files every epoch
    assert corpus.file_order("train", 0) != corpus.file_order("train", 1)

def test_a_rank_decodes_only_its_own_row_groups(tmp_path, monkeypatch):
    striped_corpus(tmp_path)
    corpus = Corpus(str(tmp_path), txt_doc_chars=4, val_fraction=0, shuffle=False)  # a, b, c: orders 0, 1, 2
    decoded, read_row_group = [], pq.ParquetFile.read_row_group
    def recording_read_row_group(self, i, *args, **kwargs):  # the real read; a file told by its row count
        decoded.append(({15: "a", 2: "b"}[self.metadata.num_rows], i))
        return read_row_group(self, i, *args, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording_read_row_group)
    def read(rank, start=None):
        decoded.clear()
        texts = [t for t, _ in corpus.iter_documents("train", rank=rank, world_size=3, start=start, num_epochs=1)]
        return decoded[:], texts
    # rank r: row groups (documents of c.txt) g with (g + order) % 3 == r: b's only row group goes to rank 1
    assert read(0) == ([("a", 0), ("a", 3)], ["a 0", "a 1", "a 2", "a 9", "a 10", "a 11", "c 1", "c 4"])
    assert read(1) == ([("a", 1), ("a", 4), ("b", 0)], ["a 3", "a 4", "a 5", "a 12", "a 13", "a 14", "b 0", "b 1",
                                                        "c 2", "c 5"])
    assert read(2) == ([("a", 2)], ["a 6", "a 7", "a 8", "c 0", "c 3", "c 6"])
    # resuming after "a 5", the last row of row group 1: that one is not decoded again
    assert read(1, {"epoch": 0, "order": 0, "doc": 6}) == ([("a", 4), ("b", 0)],
                                                           ["a 12", "a 13", "a 14", "b 0", "b 1", "c 2", "c 5"])

def test_fetch_documents_by_reference(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    corpus = Corpus(str(root), txt_doc_chars=0, val_fraction=0)
    docs = list(corpus.iter_documents("train", num_epochs=1))
    refs = [(p.file, p.doc) for _, p in reversed(docs)]
    assert corpus.fetch_documents(refs) == [t for t, _ in reversed(docs)]

def test_rank_without_documents_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    corpus = Corpus(str(tmp_path / "a.jsonl"), val_fraction=0)
    with pytest.raises(DataError, match="the train split has no documents for rank 2 of 3"):
        next(corpus.iter_documents("train", rank=2, world_size=3))
