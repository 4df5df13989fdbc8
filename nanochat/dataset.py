"""
Pretraining corpora: download the default one, read the user's own, split train/val.

The default corpus is FineWeb-Edu, pre-shuffled into 1823 parquet shards of ~100 MB (a `text`
column). `python -m nanochat.dataset -n 8` downloads the first 8 shards plus the last one
(shard_01822), which is always the validation split, into $NANOCHAT_BASE_DIR/base_data/.

A user corpus is `--data PATH|GLOB`: a file, a folder (searched recursively) or a glob of
    .txt      plain UTF-8 text. Blocks separated by blank lines are joined (with "\\n\\n") into
              documents of up to `txt_doc_chars` characters (default 4000, ~1k tokens), so a
              book becomes a run of long contiguous passages that fit a training row; a block
              longer than that is cut at line breaks (a long line at a space).
              txt_doc_chars <= 0 makes each whole file one document.
    .jsonl    one {"text": "..."} object per line
    .parquet  a string column named `text`
Its validation split is either an explicit `val_data` (same formats), or a stable hash of
(file path relative to the corpus root, document index) below `val_fraction`, so the split
never changes between runs or machines; at least one document is always held out.

Everything iterates through `Corpus.iter_documents`, which yields every document with its
position (DocPosition). A position is all a reader needs to resume exactly where it left off,
and `fetch_documents` reads documents back by reference: together they let the dataloader
save and restore its state without storing any text.
"""
import argparse
import glob
import hashlib
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.parquet as pq
import requests

from nanochat.common import get_base_dir

# -----------------------------------------------------------------------------
# The default corpus: FineWeb-Edu shards

DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
NUM_SHARDS = 1823              # shard_00000 .. shard_01822
VAL_SHARD = NUM_SHARDS - 1     # the last shard is the validation split


class DataError(ValueError):
    """Bad or missing input data; the message names the file, line and field."""


class DownloadError(RuntimeError):
    """A shard could not be downloaded (after retries)."""


class OfflineError(DownloadError):
    """The server could not be reached at all."""


def get_data_url():
    """The shard URL template; $NANOCHAT_DATA_URL overrides it (a template with {index}, or a
    base URL the shard file name is appended to), e.g. for a mirror or a test server."""
    url = os.environ.get("NANOCHAT_DATA_URL") or DATA_URL
    if "{index" not in url:
        url = url.rstrip("/") + "/shard_{index:05d}.parquet"
    return url


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def list_parquet_files(data_dir=None):
    """Sorted paths of the downloaded shards (complete ones only: .tmp files are skipped)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    return sorted(os.path.join(data_dir, name) for name in os.listdir(data_dir) if name.endswith(".parquet"))


# -----------------------------------------------------------------------------
# Downloading, with retries, resume and validation

def _parquet_problem(path):
    """None if `path` is a readable parquet file with a `text` column, else what is wrong."""
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow raises several types for truncated/garbage files
        return f"not a readable parquet file: {e}"
    if "text" not in schema.names:
        return f"no 'text' column (columns: {', '.join(schema.names)})"
    return None


class _CannotConnect(Exception):
    """No HTTP response at all (DNS failure, refused, unreachable, connect timeout)."""


def _download_attempt(url, tmp, timeout):
    """One attempt: continue `tmp` with an HTTP Range request if it holds a partial download
    (start over when the server ignores Range), else fetch the whole file into it."""
    offset = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.ConnectionError as e:
        raise _CannotConnect(str(e)) from e
    with response:
        if response.status_code == 416 and offset:
            return  # nothing left to fetch: tmp is already complete (the caller validates it)
        response.raise_for_status()
        resumed = response.status_code == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        expected = response.headers.get("Content-Length")
        written = 0
        with open(tmp, "ab" if resumed else "wb") as f:
            for chunk in response.iter_content(chunk_size=1 << 16):  # a dropped connection loses < 64 KiB
                f.write(chunk)
                written += len(chunk)
        if expected is not None and written != int(expected):
            raise requests.exceptions.ChunkedEncodingError(f"got {written} of {expected} bytes")


def download_shard(index, data_dir=None, url_template=None, max_attempts=5, backoff=1.0, timeout=(10, 60)):
    """
    Download shard `index` into data_dir (default $NANOCHAT_BASE_DIR/base_data) and return its
    path. Skips a shard already present. Streams into `<name>.tmp`, validates that pyarrow can
    open it, then renames it into place, so a complete-looking shard is never corrupt. Network
    errors are retried with exponential backoff (backoff * 2^k seconds), resuming a partial
    .tmp (also one left by a killed run); a file that fails validation is deleted and fetched
    again. Raises OfflineError when the server never answered, DownloadError otherwise.
    """
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    url = (url_template or get_data_url()).format(index=index)
    path = os.path.join(data_dir, shard_filename(index))
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    problems = []
    for attempt in range(max_attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _download_attempt(url, tmp, timeout)
        except _CannotConnect as e:
            problems.append(("connect", str(e)))
            continue
        except requests.HTTPError as e:
            status = e.response.status_code
            if status != 429 and status < 500:  # 404 & co will not get better by retrying
                raise DownloadError(f"{url}: HTTP {status} {e.response.reason}") from None
            problems.append(("http", f"HTTP {status}"))
            continue
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            problems.append(("transfer", f"transfer interrupted ({e})"))  # keep tmp: next attempt resumes
            continue
        problem = _parquet_problem(tmp)
        if problem is None:
            os.replace(tmp, path)
            return path
        os.remove(tmp)  # never keep a corrupt download around, not even as .tmp
        problems.append(("corrupt", f"downloaded file is corrupt ({problem})"))
    if all(kind == "connect" for kind, _ in problems):
        host = urlparse(url).hostname or url
        raise OfflineError(f"cannot reach {host} — offline? Use --data PATH for local text")
    raise DownloadError(f"failed to download {url} after {max_attempts} attempts: {problems[-1][1]}")


def download_shards(indices, data_dir=None, num_workers=4, progress=True, **kwargs):
    """Download shards in parallel threads (network-bound work), with a progress bar.
    Returns the paths; raises OfflineError at once when offline, else DownloadError listing
    every shard that failed after its retries."""
    from tqdm import tqdm
    data_dir = data_dir or get_data_dir()
    paths = [os.path.join(data_dir, shard_filename(i)) for i in indices]
    todo = [i for i, p in zip(indices, paths) if not os.path.exists(p)]
    failures = []
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
    try:
        with tqdm(total=len(indices), initial=len(indices) - len(todo), unit="shard", disable=not progress) as bar:
            futures = {pool.submit(download_shard, i, data_dir, **kwargs): i for i in todo}
            for future in as_completed(futures):
                try:
                    future.result()
                except OfflineError:
                    raise  # every other shard would fail the same way: stop now
                except DownloadError as e:
                    failures.append(str(e))
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if failures:
        raise DownloadError(f"{len(failures)} of {len(todo)} shards failed:\n  " + "\n  ".join(failures))
    return paths


# -----------------------------------------------------------------------------
# Reading one file of a user corpus: yields (doc_index, text) with clear errors

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
DEFAULT_TXT_DOC_CHARS = 4000


def _cut_long_line(line, max_chars):
    """Pieces of at most max_chars, cut at the last space before the limit when there is one."""
    while len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        yield line[:cut]
        line = line[cut:].lstrip(" ")
    if line:
        yield line


def split_txt_documents(lines, max_chars=DEFAULT_TXT_DOC_CHARS):
    """
    Group the lines of a text into documents of at most max_chars characters. Blank lines end
    a block; consecutive blocks are joined with "\\n\\n" while they fit, so short paragraphs
    (books) become long passages. A block too long for one document is cut at line breaks,
    and a line too long at a space. Streams: memory stays O(max_chars) for any file size.
    """
    doc = ""     # whole blocks joined by blank lines
    block = []   # lines of the block being read
    block_len = 0

    def end_block():
        nonlocal doc, block, block_len
        text = "\n".join(block)
        block, block_len = [], 0
        if doc and len(doc) + 2 + len(text) > max_chars:
            finished, doc = doc, text
            return finished
        doc = f"{doc}\n\n{text}" if doc else text
        return None

    for line in lines:
        line = line.rstrip()  # trailing spaces and the newline; indentation (poems) is kept
        if not line:
            if block and (finished := end_block()):
                yield finished
            continue
        for piece in _cut_long_line(line, max_chars):
            if block and block_len + 1 + len(piece) > max_chars:
                # this block alone outgrows a document: emit what we have and continue it afresh
                if doc:
                    yield doc
                    doc = ""
                yield "\n".join(block)
                block, block_len = [], 0
            block_len += (1 if block else 0) + len(piece)
            block.append(piece)
    if block and (finished := end_block()):
        yield finished
    if doc:
        yield doc


def _utf8_error(path):
    """Locate the first invalid UTF-8 byte of a file as 'path:line: ...' (only called on error)."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = e.start  # relative to this chunk (plus at most 3 bytes held back from the last one)
                line += chunk[:max(0, bad)].count(b"\n")
                return DataError(f"{path}:{line}: not valid UTF-8 (byte offset ~{offset + bad}: {e.reason}); "
                                 f"convert the file to UTF-8")
            offset += len(chunk)
            line += chunk.count(b"\n")
    return DataError(f"{path}: not valid UTF-8; convert the file to UTF-8")


def _read_txt(path, txt_doc_chars, start):
    try:
        with open(path, encoding="utf-8-sig") as f:
            if txt_doc_chars <= 0:
                text = f.read().strip()
                if text and start <= 0:
                    yield 0, text
                return
            for i, doc in enumerate(split_txt_documents(f, txt_doc_chars)):
                if i >= start:
                    yield i, doc
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _read_jsonl(path, start):
    """Document index = index of the record (non-blank line); empty texts are skipped."""
    index = -1
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                index += 1
                if index < start:
                    continue  # resuming: records before `start` were checked when the corpus was opened
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f'{path}:{lineno}: expected an object like {{"text": "..."}}, '
                                    f"got a JSON {type(record).__name__}")
                if "text" not in record:
                    raise DataError(f"{path}:{lineno}: field 'text' is missing "
                                    f"(fields: {', '.join(map(str, record)) or 'none'})")
                text = record["text"]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
                if text:
                    yield index, text
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _open_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    kind = str(schema.field("text").type)
    if kind not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column 'text' must hold strings, got {kind}")
    return pf


def _read_parquet(path, start):
    """Document index = row index; null/empty rows are skipped. Whole row groups before
    `start` are never read, so resuming deep into a big shard is cheap."""
    pf = _open_parquet(path)
    first_row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first_row + n > start:
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            for i, text in enumerate(texts, first_row):
                if i >= start and text:
                    yield i, text
        first_row += n


def read_documents(path, txt_doc_chars=DEFAULT_TXT_DOC_CHARS, start=0):
    """Yield (doc_index, text) for the documents of one file, from index `start` on.
    Indices are stable: the same file and settings always give the same numbering."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            yield from _read_txt(path, txt_doc_chars, start)
        elif ext == ".jsonl":
            yield from _read_jsonl(path, start)
        elif ext == ".parquet":
            yield from _read_parquet(path, start)
        else:
            raise DataError(f"{path}: unsupported file type {ext or '(none)'} (expected {', '.join(SUPPORTED_EXTENSIONS)})")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def resolve_data_files(spec):
    """
    Expand a corpus spec (a path or glob, or a list of them) into sorted [(path, key)], where
    key is the path relative to the spec's root (the folder given, the glob's fixed prefix, or
    the file's own folder): the identity used by the hash split, stable if the corpus moves.
    Folders are searched recursively for supported files; hidden files are skipped.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found = {}
    for s in specs:
        s = os.path.expanduser(os.fspath(s))
        if os.path.isfile(s):
            ext = os.path.splitext(s)[1].lower()
            if ext not in SUPPORTED_EXTENSIONS:
                raise DataError(f"{s}: unsupported file type {ext or '(none)'} (expected {', '.join(SUPPORTED_EXTENSIONS)})")
            found[os.path.abspath(s)] = os.path.basename(s)
            continue
        if os.path.isdir(s):
            root, candidates = s, []
            for dirpath, dirnames, filenames in os.walk(s, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                candidates += [os.path.join(dirpath, n) for n in filenames if not n.startswith(".")]
        elif glob.has_magic(s):
            root = s
            while glob.has_magic(root):
                root = os.path.dirname(root)
            candidates = [p for p in glob.glob(s, recursive=True) if os.path.isfile(p)]
        else:
            raise DataError(f"{s}: no such file or folder")
        matched = [p for p in candidates if os.path.splitext(p)[1].lower() in SUPPORTED_EXTENSIONS]
        if not matched:
            raise DataError(f"{s}: no {'/'.join(SUPPORTED_EXTENSIONS)} files found")
        for p in matched:
            found[os.path.abspath(p)] = os.path.relpath(p, root or ".")
    return sorted(found.items())


def _hash_fraction(key, index):
    """A stable pseudo-random number in [0, 1) for a document (unlike hash(), never salted)."""
    digest = hashlib.blake2b(f"{key}\0{index}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


# -----------------------------------------------------------------------------
# The corpus: files, the train/val split, and resumable iteration

class SourceFile(NamedTuple):
    path: str
    key: str      # identity for the hash split (relative path or shard name)
    split: str    # "train", "val", or "hash" (per document, by _hash_fraction)
    num_docs: int # number of document indices (upper bound; some may be empty and skipped)


class DocPosition(NamedTuple):
    """Where a document sits in a split's stream, which is all it takes to resume after it."""
    epoch: int   # completed passes over the split before this one
    order: int   # index of its file in this epoch's file order
    file: int    # index of its file in corpus.files
    doc: int     # its index within the file
    count: int   # its index among the split's documents in this epoch (decides the rank)

    def resume_point(self):
        """The `start` of an iteration that continues right after this document."""
        return {"epoch": self.epoch, "order": self.order, "doc": self.doc + 1, "count": self.count + 1}


class Corpus:
    """
    A pretraining corpus with a train and a val split.

    Corpus()                   the downloaded FineWeb-Edu shards: the last one is val
    Corpus("books/")           a user corpus, val = documents whose stable hash < val_fraction
    Corpus("books/", val_data="held_out.txt")   an explicit val set (removed from train)

    A user corpus is read once on construction to check every file (so bad input fails before
    training, with file:line) and to count documents. `shuffle` (default: on for user corpora,
    off for the pre-shuffled shards) visits train files in a new seeded order every epoch.
    """

    def __init__(self, data=None, val_data=None, val_fraction=0.01, txt_doc_chars=DEFAULT_TXT_DOC_CHARS,
                 shuffle=None, seed=0):
        self.data, self.val_data = data, val_data
        self.val_fraction = val_fraction
        self.txt_doc_chars = txt_doc_chars
        self.shuffle = (data is not None) if shuffle is None else shuffle
        self.seed = seed
        self.forced_val = None  # (file, doc) held out when no document hashes below val_fraction
        if data is None:
            self._init_shards()
        else:
            self._init_user_corpus()
        identity = [(f.key, f.split, os.path.getsize(f.path)) for f in self.files]
        identity += [val_fraction, txt_doc_chars, self.shuffle, seed]
        self.fingerprint = hashlib.blake2b(json.dumps(identity).encode(), digest_size=8).hexdigest()

    def _init_shards(self):
        paths = list_parquet_files()
        where = get_data_dir()
        if not paths:
            raise DataError(f"no pretraining data in {where}: run `python -m nanochat.dataset -n 8` "
                            f"to download shards, or pass --data PATH for local text")
        if len(paths) < 2:
            raise DataError(f"only one shard in {where}, and the last shard is the validation split: "
                            f"download more with `python -m nanochat.dataset -n 8`")
        # the last shard is val: shard_01822 is always downloaded (first), so the split never moves
        self.files = [SourceFile(p, os.path.basename(p), "train", -1) for p in paths[:-1]]
        self.files.append(SourceFile(paths[-1], os.path.basename(paths[-1]), "val", -1))

    def _init_user_corpus(self):
        data_files = resolve_data_files(self.data)
        val_files = resolve_data_files(self.val_data) if self.val_data else []
        val_paths = {os.path.realpath(p) for p, _ in val_files}
        train_files = [(p, k) for p, k in data_files if os.path.realpath(p) not in val_paths]
        if not train_files:
            raise DataError(f"{self.data}: every file is also in val_data, nothing left to train on")
        split = "train" if self.val_data else "hash"
        files = [(p, k, split) for p, k in train_files] + [(p, k, "val") for p, k in val_files]
        # read everything once: errors surface now, and we learn how many documents there are
        self.files, self.num_chars = [], 0
        for path, key, file_split in files:
            if path.endswith(".parquet"):
                num_docs = _open_parquet(path).metadata.num_rows
            else:
                num_docs = 0
                for index, text in read_documents(path, self.txt_doc_chars):
                    num_docs = index + 1
                    self.num_chars += len(text)
            self.files.append(SourceFile(path, key, file_split, num_docs))
        if not any(f.num_docs for f in self.files if f.split != "val"):
            raise DataError(f"{self.data}: the corpus is empty (no text in {len(train_files)} file(s))")
        if self.val_data and not any(f.num_docs for f in self.files if f.split == "val"):
            raise DataError(f"{self.val_data}: the validation data is empty")
        if not self.val_data and self.val_fraction > 0:
            self._ensure_val_document()

    def _ensure_val_document(self):
        """Hold out the document with the smallest hash if none falls below val_fraction (only
        likely for tiny corpora), and make sure something is left to train on."""
        def all_docs():
            return ((i, d) for i, f in enumerate(self.files) for d in range(f.num_docs))
        if not any(_hash_fraction(self.files[i].key, d) < self.val_fraction for i, d in all_docs()):
            self.forced_val = min(all_docs(), key=lambda ref: _hash_fraction(self.files[ref[0]].key, ref[1]))
        if not any(self.in_split(i, d, "train") for i, d in all_docs()):
            raise DataError(f"{self.data}: every document is held out for validation "
                            f"({sum(f.num_docs for f in self.files)} in all): add text, lower val_fraction, or pass val_data")

    def in_split(self, file_index, doc_index, split):
        f = self.files[file_index]
        if f.split != "hash":
            return f.split == split
        is_val = _hash_fraction(f.key, doc_index) < self.val_fraction or (file_index, doc_index) == self.forced_val
        return is_val == (split == "val")

    def split_files(self, split):
        """Indices into self.files of the files that hold documents of `split`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return [i for i, f in enumerate(self.files) if f.split in (split, "hash")]

    def file_order(self, split, epoch):
        order = self.split_files(split)
        if self.shuffle and split == "train":
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def iter_documents(self, split, rank=0, world_size=1, start=None, num_epochs=None):
        """
        Yield (text, DocPosition) for this rank's documents of `split`: documents are dealt
        round-robin (the k-th document of the split in an epoch goes to rank k % world_size),
        so ranks get disjoint, balanced slices. Loops over epochs forever, or num_epochs.
        `start` (a DocPosition.resume_point() dict) continues a previous iteration exactly.
        """
        start = dict(start) if start else {"epoch": 0, "order": 0, "doc": 0, "count": 0}
        epoch, order_start, doc_start, count = start["epoch"], start["order"], start["doc"], start["count"]
        if not self.split_files(split):
            raise DataError(f"no {split} data in this corpus")
        while num_epochs is None or epoch < num_epochs:
            full_epoch = order_start == 0 and doc_start == 0
            yielded = 0
            for order, file_index in enumerate(self.file_order(split, epoch)):
                if order < order_start:
                    continue
                first = doc_start if order == order_start else 0
                for doc_index, text in read_documents(self.files[file_index].path, self.txt_doc_chars, first):
                    if not self.in_split(file_index, doc_index, split):
                        continue
                    if count % world_size == rank:
                        yield text, DocPosition(epoch, order, file_index, doc_index, count)
                        yielded += 1
                    count += 1
            if full_epoch and yielded == 0:
                if count == 0:
                    raise DataError(f"the {split} split has no documents")
                raise DataError(f"the {split} split has only {count} document(s), none for rank {rank} of "
                                f"{world_size}: use fewer ranks or more data")
            epoch, order_start, doc_start, count = epoch + 1, 0, 0, 0

    def fetch_documents(self, refs):
        """Texts of documents given as (file_index, doc_index) pairs, in the same order."""
        wanted = {}
        for file_index, doc_index in refs:
            wanted.setdefault(file_index, set()).add(doc_index)
        found = {}
        for file_index, doc_indices in wanted.items():
            if not 0 <= file_index < len(self.files):
                raise DataError(f"no file #{file_index} in the corpus: it changed since the state was saved")
            remaining = set(doc_indices)
            for doc_index, text in read_documents(self.files[file_index].path, self.txt_doc_chars, min(doc_indices)):
                if doc_index in remaining:
                    found[file_index, doc_index] = text
                    remaining.discard(doc_index)
                    if not remaining:
                        break
            if remaining:
                raise DataError(f"{self.files[file_index].path}: document {min(remaining)} not found: "
                                f"the file changed since the state was saved")
        return [found[tuple(ref)] for ref in refs]

    def summary(self):
        """Counts for a quick look (a full pass for the hash split of user corpora)."""
        lines = [f"{len(self.files)} file(s)"]
        if self.data is None:
            lines.append(f"train: {len(self.files) - 1} shard(s), val: {self.files[-1].key}")
        else:
            counts = {"train": 0, "val": 0}
            for i, f in enumerate(self.files):
                for split in counts:
                    counts[split] += sum(self.in_split(i, d, split) for d in range(f.num_docs))
            lines.append(f"documents: {counts['train']:,} train, {counts['val']:,} val")
            if self.num_chars:
                lines.append(f"characters in .txt/.jsonl files: {self.num_chars:,}")
        return "\n".join(lines)


def iter_documents(split, data=None, val_data=None, rank=0, world_size=1, start=None, num_epochs=None, **corpus_kwargs):
    """Shorthand: Corpus(data, val_data, **corpus_kwargs).iter_documents(split, ...)."""
    corpus = data if isinstance(data, Corpus) else Corpus(data, val_data=val_data, **corpus_kwargs)
    return corpus.iter_documents(split, rank=rank, world_size=world_size, start=start, num_epochs=num_epochs)


# -----------------------------------------------------------------------------
# Command line: download shards, or check a local corpus

def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards into "
                                     "$NANOCHAT_BASE_DIR/base_data, or check a local corpus with --data.")
    parser.add_argument("-n", "--num-files", type=int, default=8,
                        help=f"number of training shards to download (first N), -1 for all {NUM_SHARDS - 1}; "
                             f"the validation shard (the last, {VAL_SHARD}) is always added")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--data", default=None,
                        help="instead of downloading, check a local corpus (file, folder or glob of .txt/.jsonl/.parquet) and print its size")
    parser.add_argument("--val-data", default=None, help="with --data: explicit validation files")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="with --data: fraction of documents held out")
    parser.add_argument("--txt-doc-chars", type=int, default=DEFAULT_TXT_DOC_CHARS,
                        help="with --data: max characters per .txt document (<= 0: one document per file)")
    args = parser.parse_args(argv)
    try:
        if args.data:
            corpus = Corpus(args.data, val_data=args.val_data, val_fraction=args.val_fraction,
                            txt_doc_chars=args.txt_doc_chars)
            print(corpus.summary())
            return 0
        n = NUM_SHARDS - 1 if args.num_files < 0 else min(args.num_files, NUM_SHARDS - 1)
        indices = [VAL_SHARD] + list(range(n))  # val first: a training run can start before the rest arrive
        print(f"downloading {len(indices)} shard(s) ({n} train + the validation shard) to {get_data_dir()}")
        download_shards(indices, num_workers=args.num_workers, max_attempts=args.max_attempts)
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
