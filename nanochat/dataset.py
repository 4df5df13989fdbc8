"""Pretraining corpora: the shards of FineWeb-Edu or ClimbMix (downloaded here), or your own text, split train/val.

    python -m nanochat.dataset -n 8             # 8 training shards + the validation shard (NANOCHAT_CORPUS=climbmix)
    python -m nanochat.dataset --data books/    # check a corpus of your own and print its size"""
import argparse
import glob
import hashlib
import heapq
import itertools
import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from typing import NamedTuple

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import DataError, HelpFormatter, get_base_dir
from nanochat.download import DownloadError, OfflineError, download_file

# -----------------------------------------------------------------------------
# $NANOCHAT_CORPUS's shards: ~100 MB parquet files with a `text` column, the last one val. ClimbMix (NVIDIA's web
# mix) took nanochat's public record run to GPT-2 grade ~27 % faster than FineWeb-Edu (not yet measured here)
CORPORA = {"fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823), "climbmix": ("karpathy/climbmix-400b-shuffle", 6543)}

def corpus_shards():
    """(name, Hugging Face dataset, number of shards) of $NANOCHAT_CORPUS."""
    if (name := os.environ.get("NANOCHAT_CORPUS") or "fineweb-edu") not in CORPORA:
        raise DataError(f"NANOCHAT_CORPUS={name}: unknown corpus (choose from {', '.join(CORPORA)})")
    return name, *CORPORA[name]

def get_data_url():
    """The shard URL template: $NANOCHAT_DATA_URL (a mirror, a test server) or the corpus's Hugging Face files."""
    url = os.environ.get("NANOCHAT_DATA_URL") or f"https://huggingface.co/datasets/{corpus_shards()[1]}/resolve/main"
    # a template with {index}, or a base URL that the shard's file name is appended to
    return url if "{index" in url else url.rstrip("/") + "/shard_{index:05d}.parquet"

def get_data_dir():
    # a folder per corpus, never two corpora's shards mixed (FineWeb-Edu keeps the folder it always had)
    name = corpus_shards()[0]
    return os.path.join(get_base_dir(), "base_data" if name == "fineweb-edu" else f"base_data_{name}")

def shard_filename(index):
    return f"shard_{index:05d}.parquet"

def list_parquet_files():
    """Sorted paths of the downloaded shards (complete ones only: a download in progress is a .tmp)."""
    return sorted(glob.glob(os.path.join(glob.escape(get_data_dir()), "*.parquet")))

def _parquet_problem(path):
    try:
        _open_parquet(path)
    except DataError as e:
        return str(e)

def download_shard(index, **kwargs):
    """The path of shard `index`, downloaded (and checked) unless present; kwargs go to download_file."""
    path = os.path.join(get_data_dir(), shard_filename(index))
    try:
        return download_file(get_data_url().format(index=index), path, check=_parquet_problem, **kwargs)
    except OfflineError as e:
        raise OfflineError(f"{e} Use --data PATH for local text") from None

def download_shards(indices, num_workers=4, **kwargs):
    """Download shards in parallel threads; raises DownloadError listing every shard that failed."""
    failures = []
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers))  # threads: the work is waiting on the network
    try:
        futures = [pool.submit(download_shard, i, **kwargs) for i in indices]
        for future in tqdm(as_completed(futures), total=len(futures), unit="shard"):
            if isinstance(error := future.exception(), DownloadError) and not isinstance(error, OfflineError):
                failures.append(str(error))
            else:
                future.result()  # raises an OfflineError (every other shard would fail alike: stop now), or a bug
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on an error, do not wait for the others
    if failures:
        raise DownloadError(f"{len(failures)} of {len(indices)} shards failed:\n  " + "\n  ".join(sorted(failures)))

# -----------------------------------------------------------------------------
# Reading one file of a user corpus: .txt, .jsonl ({"text": ...} per line), .parquet (a `text` column). Documents are
# numbered the same way every time, so a (file, doc) pair points back into a file; bad input: DataError at file:line.
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# ~1k tokens: a .txt book becomes a run of long contiguous passages that fit a training row
TXT_DOC_CHARS = 4000
# a shuffled corpus is read this many files at a time, interleaved: few enough open files and decoded row groups
MIX_FILES = 16
_SPACES = re.compile(" *")

def _cut_long_line(line, max_chars):
    # pieces of at most max_chars, cut at the last space before the limit when there is one; walk an
    # offset rather than re-slicing the rest of the line, so that a 50 MB one-line file stays linear
    start = 0
    while len(line) - start > max_chars:
        cut = line.rfind(" ", start, start + max_chars + 1)
        cut = cut if cut > start else start + max_chars  # no space to cut at: cut mid-word
        yield line[start:cut]
        start = _SPACES.match(line, cut).end()  # the spaces at a cut belong to neither piece
    if start < len(line):
        yield line[start:]

def split_txt_documents(lines, max_chars=TXT_DOC_CHARS):
    """Group lines into documents of at most max_chars; streams (memory O(max_chars) for any file)."""
    doc, block = "", ""  # whole blocks joined by blank lines; the block being read
    for line in itertools.chain(lines, [""]):  # a blank line at the end ends the last block
        line = line.rstrip()  # trailing spaces and the newline; indentation (poems) is kept
        if not line:
            # a blank line ends a block, which joins the document while it fits: the short
            # paragraphs of a book become long passages
            if block and doc and len(doc) + 2 + len(block) > max_chars:
                yield doc
                doc = ""
            if block:
                doc, block = (f"{doc}\n\n{block}" if doc else block), ""
            continue
        # a block too long for one document is cut at line breaks, a line too long at a space
        for piece in _cut_long_line(line, max_chars):
            if block and len(block) + 1 + len(piece) > max_chars:
                yield from filter(None, (doc, block))  # the document so far, then the block so far
                doc, block = "", ""
            block += ("\n" if block else "") + piece
    if doc:
        yield doc

def _utf8_error(path):
    # a DataError naming the line of the first bad byte, called only after decoding failed: line by
    # line is exact, as the byte of "\n" never occurs inside a multi-byte UTF-8 character
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:  # f.tell() is where the line ends
                return DataError(f"{path}:{lineno}: not valid UTF-8 (byte offset {f.tell() - len(raw) + e.start}: "
                                 f"{e.reason}); convert the file to UTF-8")
    return DataError(f"{path}: not valid UTF-8; convert the file to UTF-8")

# The readers share one signature, (path, txt_doc_chars, start, (k, n)): read_documents picks one by extension
def _read_txt(path, txt_doc_chars, start, stripe):
    with open(path, encoding="utf-8-sig") as f:
        # txt_doc_chars <= 0: the whole file is one document
        docs = [f.read().strip()] if txt_doc_chars <= 0 else split_txt_documents(f, txt_doc_chars)
        yield from ((i, doc) for i, doc in enumerate(docs) if i >= start and doc and i % stripe[1] == stripe[0])

def _read_jsonl(path, _txt_doc_chars, start, stripe):
    with open(path, encoding="utf-8-sig") as f:
        # document index = index of the record (blank lines are not records); empty texts are skipped
        records = ((lineno, line) for lineno, line in enumerate(f, 1) if line.strip())
        # the records before `start`, and other ranks' (skipped unparsed), were checked when the corpus was opened
        mine = (r for r in itertools.islice(enumerate(records), start, None) if r[0] % stripe[1] == stripe[0])
        for index, (lineno, line) in mine:
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f'{where}: expected an object like {{"text": "..."}}, got {type(record).__name__}')
            if "text" not in record:
                raise DataError(f"{where}: field 'text' is missing (fields: {', '.join(map(str, record)) or 'none'})")
            if not isinstance(record["text"], str):
                raise DataError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}")
            if record["text"]:
                yield index, record["text"]

def _open_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for truncated or garbage files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    if (kind := str(schema.field("text").type)) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column 'text' must hold strings, got {kind}")
    return pf

def _read_parquet(path, _txt_doc_chars, start, stripe):
    # document index = row index; null and empty rows are skipped
    pf = _open_parquet(path)
    ends = itertools.accumulate(pf.metadata.row_group(rg).num_rows for rg in range(pf.num_row_groups))
    for rg, end in enumerate(ends):  # end: the index of the first row after row group rg
        # only the stripe's row groups are decoded, and none wholly before `start` (resuming deep in a shard is cheap)
        if end > start and rg % stripe[1] == stripe[0]:
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            yield from ((i, text) for i, text in enumerate(texts, end - len(texts)) if i >= start and text)

def read_documents(path, txt_doc_chars=TXT_DOC_CHARS, start=0, stripe=(0, 1)):
    """Yield (doc_index, text) for the documents of one file, from index `start` on, of stripe (k, n): those
    d with d % n == k, or in a .parquet file all those of its row groups g with g % n == k."""
    if (ext := os.path.splitext(path)[1].lower()) not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'} (expected {', '.join(SUPPORTED_EXTENSIONS)})")
    try:
        reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[ext]
        yield from reader(path, txt_doc_chars, start, stripe)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None

def resolve_data_files(spec):
    """A corpus spec (a path or glob, or a list of them) as sorted [(path, key)]."""
    # key = the path relative to the spec's root (the folder given, the glob's fixed prefix, or the
    # file's own folder): the identity the hash split uses, so the split survives moving the corpus
    found = {}
    for s in [spec] if isinstance(spec, (str, os.PathLike)) else spec:
        s = os.path.expanduser(os.fspath(s))
        if os.path.isfile(s):  # any file given by name: read_documents says if it cannot read it
            found[os.path.abspath(s)] = os.path.basename(s)
            continue
        if os.path.isdir(s):  # recursive: glob's "**" and "*" skip hidden files and folders (.git, editor backups)
            root, pattern = s, os.path.join(glob.escape(s), "**", "*")
        elif glob.has_magic(s):
            root = pattern = s
            while glob.has_magic(root):
                root = os.path.dirname(root)
        else:
            raise DataError(f"{s}: no such file or folder")
        # everything but folders: a dangling link is named as unreadable, not silently skipped
        candidates = [p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p)]
        if not (matched := [p for p in candidates if os.path.splitext(p)[1].lower() in SUPPORTED_EXTENSIONS]):
            raise DataError(f"{s}: no {'/'.join(SUPPORTED_EXTENSIONS)} files found")
        found.update((os.path.abspath(p), os.path.relpath(p, root or ".")) for p in matched)
    return sorted(found.items())

def _hash_fraction(key, index):
    # a stable pseudo-random number in [0, 1) for a document, below val_fraction means val; blake2b,
    # not hash(): that one is salted per process, and the split must never move
    return int.from_bytes(hashlib.blake2b(f"{key}\0{index}".encode("utf-8"), digest_size=8).digest(), "big") / 2.0 ** 64

# -----------------------------------------------------------------------------
# The corpus: files, the train/val split, and resumable iteration
class SourceFile(NamedTuple):
    path: str
    key: str      # identity for the hash split (relative path or shard name)
    split: str    # "train", "val", or "hash" (per document, by _hash_fraction)
    num_docs: int # number of document indices (upper bound; some may be empty and skipped)

# A position is all a reader needs to resume right after a document, and (file, doc) is all
# fetch_documents needs to read it back: the dataloader's state holds these, never text.
class DocPosition(NamedTuple):
    epoch: int   # completed passes over the split before this one
    order: int   # index of its file in this epoch's file order
    file: int    # index of its file in corpus.files
    doc: int     # its index within the file
    def resume_point(self):
        """The `start` of an iteration that continues right after this document."""
        return {"epoch": self.epoch, "order": self.order, "doc": self.doc + 1}

class Corpus:
    """Train and val splits of the downloaded shards (Corpus()) or of your own text (Corpus("books/"))."""
    def __init__(self, data=None, val_data=None, val_fraction=0.01, txt_doc_chars=TXT_DOC_CHARS, shuffle=None, seed=0):
        self.data, self.val_data, self.val_fraction, self.txt_doc_chars = data, val_data, val_fraction, txt_doc_chars
        # a new seeded file order every epoch for user corpora; the shards come pre-shuffled
        self.shuffle, self.seed = (data is not None) if shuffle is None else shuffle, seed
        self.forced_val = None  # lowest-hashing (file, doc), held out if none hashes below val_fraction (tiny corpora)
        self._init_shards() if data is None else self._init_user_corpus()
        # what a saved dataloader state must match to be resumed on this corpus
        identity = [(f.key, f.split, os.path.getsize(f.path)) for f in self.files]
        identity += [val_fraction, txt_doc_chars, self.shuffle, seed]
        self.fingerprint = hashlib.blake2b(json.dumps(identity).encode(), digest_size=8).hexdigest()
    def _init_shards(self):
        if len(paths := list_parquet_files()) < 2:
            raise DataError(f"{'only one shard' if paths else 'no pretraining data'} in {get_data_dir()} (the last "
                            f"shard is val): run `python -m nanochat.dataset -n 8`, or pass --data PATH for local text")
        # the last shard is val: it is always downloaded (first), so the split never moves
        self.files = [SourceFile(p, os.path.basename(p), "val" if p == paths[-1] else "train",
                                 _open_parquet(p).metadata.num_rows) for p in paths]
    def _init_user_corpus(self):
        val_files = resolve_data_files(self.val_data) if self.val_data else []
        val_paths = {os.path.realpath(p) for p, _ in val_files}
        train_files = [(p, k) for p, k in resolve_data_files(self.data) if os.path.realpath(p) not in val_paths]
        if not train_files:
            raise DataError(f"{self.data}: every file is also in val_data, nothing left to train on")
        # explicit val_data: whole files are val; otherwise each document's hash decides
        split = "train" if self.val_data else "hash"
        # read everything once: bad input fails now, before training, and we learn the document counts
        self.files, self.num_chars = [], 0
        jobs = [(p, k, split) for p, k in train_files] + [(p, k, "val") for p, k in val_files]
        # a progress line once it takes over 10 s (1 GB: ~20 s); characters counted as bytes, close enough
        total = sum(os.path.getsize(p) for p, _, _ in jobs if os.path.isfile(p) and not p.endswith(".parquet"))
        with tqdm(total=total, unit="B", unit_scale=True, desc="checking the corpus", delay=10, mininterval=10) as bar:
            for path, key, file_split in jobs:
                if path.endswith(".parquet"):  # it knows its row count
                    num_docs = _open_parquet(path).metadata.num_rows
                else:  # a text file is read through, and so checked
                    num_docs = 0
                    for index, text in read_documents(path, self.txt_doc_chars):
                        num_docs, self.num_chars = index + 1, self.num_chars + len(text)
                        bar.update(len(text))
                self.files.append(SourceFile(path, key, file_split, num_docs))
        if not any(f.num_docs for f in self.files if f.split != "val"):
            raise DataError(f"{self.data}: the corpus is empty (no text in {len(train_files)} file(s))")
        if self.val_data and not any(f.num_docs for f in self.files if f.split == "val"):
            raise DataError(f"{self.val_data}: the validation data is empty")
        if self.val_data or self.val_fraction <= 0:
            return  # else the hash split must hold out at least one document, and keep one to train on
        def all_docs():  # a generator, not a list: a big corpus has millions
            return ((i, d) for i, f in enumerate(self.files) for d in range(f.num_docs))
        if not any(_hash_fraction(self.files[i].key, d) < self.val_fraction for i, d in all_docs()):
            self.forced_val = min(all_docs(), key=lambda ref: _hash_fraction(self.files[ref[0]].key, ref[1]))
        if not any(self.in_split(i, d, "train") for i, d in all_docs()):
            total = sum(f.num_docs for f in self.files)
            raise DataError(f"{self.data}: every document is held out for validation ({total} in all): "
                            f"add text, lower val_fraction, or pass val_data")
    def in_split(self, file_index, doc_index, split):
        f = self.files[file_index]
        if f.split != "hash":
            return f.split == split
        is_val = _hash_fraction(f.key, doc_index) < self.val_fraction or (file_index, doc_index) == self.forced_val
        return is_val == (split == "val")
    def file_order(self, split, epoch):
        """Indices into self.files of the files that hold documents of `split`, in this epoch's order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        order = [i for i, f in enumerate(self.files) if f.split in (split, "hash")]
        if self.shuffle and split == "train":
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order
    def iter_documents(self, split, rank=0, world_size=1, start=None, num_epochs=None):
        """Yield (text, DocPosition) of this rank's `split`, num_epochs times (None: forever), from a resume_point().
        An epoch is read file after file, or, for a shuffled train split, MIX_FILES files at a time interleaved at an
        even pace, so that every stretch of training sees all of them (a folder of books read book after book would
        end training on the last book, and the model would be that book's)."""
        epoch, order_start, doc_start = (start["epoch"], start["order"], start["doc"]) if start else (0, 0, 0)
        while num_epochs is None or epoch < num_epochs:
            found = doc_start > 0  # a resumed epoch starts right after one of this rank's documents
            order = list(enumerate(self.file_order(split, epoch)))
            group = MIX_FILES if self.shuffle and split == "train" else 1
            # the cursor: right after document doc_start - 1 of the file at order_start, which has m documents
            m = max(1, self.files[order[order_start][1]].num_docs)
            for group_start in range(order_start // group * group, len(order), group):
                streams = []
                for o, file_index in order[group_start:group_start + group]:
                    n = self.files[file_index].num_docs
                    # resuming, a file of the cursor's group starts at its first document e whose merge key (2e+1)/2n
                    # is past the cursor's (2d+1)/2m (in integers; ties go to the earlier file), later groups at 0
                    x, later = (2 * doc_start - 1) * n - m, o > order_start
                    first = 0 if group_start > order_start else max(0, -(-x // (2 * m)) if later else x // (2 * m) + 1)
                    # rank r reads only its stripe of each file: the documents (row groups of a .parquet) g with
                    # (g + order) % world_size == r; the offset spreads files with fewer row groups than ranks
                    streams.append(self._keyed(o, file_index, n, first, ((rank - o) % world_size, world_size)))
                for _, o, file_index, doc_index, text in heapq.merge(*streams):
                    if self.in_split(file_index, doc_index, split):
                        found = True
                        yield text, DocPosition(epoch, o, file_index, doc_index)
            if not found:
                raise DataError(f"the {split} split has no documents" + (f" for rank {rank} of {world_size}: use "
                                f"fewer ranks or more data" if world_size > 1 else ""))
            epoch, order_start, doc_start = epoch + 1, 0, 0
    def _keyed(self, o, file_index, n, first, stripe):
        for d, text in read_documents(self.files[file_index].path, self.txt_doc_chars, first, stripe):
            # the merge key first: how far through its file a document is (its middle), then the file's order (unique)
            yield Fraction(2 * d + 1, 2 * n), o, file_index, d, text
    def fetch_documents(self, refs):
        """Texts of documents given as (file_index, doc_index) pairs, in the same order."""
        found = {}
        for file_index in sorted({f for f, _ in refs}):
            docs = {d for f, d in refs if f == file_index}
            # one pass over the file, from its first wanted document until it has them all
            for doc_index, text in read_documents(self.files[file_index].path, self.txt_doc_chars, min(docs)):
                if doc_index in docs:
                    found[file_index, doc_index] = text
                    docs.discard(doc_index)
                    if not docs:
                        break
            if docs:
                raise DataError(f"{self.files[file_index].path}: document {min(docs)} not found: "
                                f"the file changed since the state was saved")
        return [found[tuple(ref)] for ref in refs]
    def summary(self):
        """Counts for a quick look (a full pass for the hash split of user corpora)."""
        if self.data is None:
            return f"{len(self.files)} file(s)\ntrain: {len(self.files) - 1} shard(s), val: {self.files[-1].key}"
        counts = {split: sum(self.in_split(i, d, split) for i, f in enumerate(self.files) for d in range(f.num_docs))
                  for split in ("train", "val")}
        chars = f"\ncharacters in .txt/.jsonl files: {self.num_chars:,}" if self.num_chars else ""
        return f"{len(self.files)} file(s)\ndocuments: {counts['train']:,} train, {counts['val']:,} val" + chars

# -----------------------------------------------------------------------------
# Command line: download shards, or check a local corpus
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-n", "--num-files", type=int, default=8, help="training shards to download (-1: all)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--data", default=None, help="instead: check a corpus (file, folder, glob) and print its size")
    parser.add_argument("--val-data", default=None, help="with --data: explicit validation files")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="with --data: fraction of documents held out")
    parser.add_argument("--txt-doc-chars", type=int, default=TXT_DOC_CHARS,
                        help="with --data: max characters per .txt document (<= 0: one document per file)")
    args = parser.parse_args(argv)
    try:
        if args.data:
            print(Corpus(args.data, args.val_data, args.val_fraction, args.txt_doc_chars).summary())
            return 0
        name, _, num_shards = corpus_shards()
        n = num_shards - 1 if args.num_files < 0 else min(args.num_files, num_shards - 1)
        indices = [num_shards - 1] + list(range(n))  # val first: a training run can start before the rest arrive
        print(f"downloading {len(indices)} {name} shard(s) ({n} train + the validation shard) to {get_data_dir()}")
        download_shards(indices, num_workers=args.num_workers, attempts=args.max_attempts)
        print(f"done: {len(list_parquet_files())} shard(s) in {get_data_dir()}")
        return 0
    except (DataError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (partial downloads are kept as .tmp and resumed next time)", file=sys.stderr, flush=True)
        os._exit(130)  # do not wait for the download threads still running

if __name__ == "__main__":
    sys.exit(main())
