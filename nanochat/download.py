"""Downloading files, the one way nanochat does it: retried, resumed, checked, renamed into place whole.

    path = download_file(url, "/data/shard.parquet", check=lambda tmp: None if ok(tmp) else "why not")
    path = hf_dataset_file("openai/gsm8k", "main/test-00000-of-00001.parquet")
    python -m nanochat.download dev/cpu_data.json ~/.cache/nanochat/cpu_data   # a sha256-pinned manifest"""
import argparse
import hashlib
import json
import os
import sys
import time
from urllib.parse import quote, urlparse

import requests
from tqdm import tqdm

from nanochat.common import HelpFormatter, get_base_dir, print0

CHUNK_BYTES = 1 << 16      # a dropped connection loses at most this much of a resumable download
BAR_MIN_BYTES = 1 << 20    # smaller files arrive before a progress bar would say anything

class DownloadError(RuntimeError):
    """A file could not be downloaded; the message names the URL and why."""

class OfflineError(DownloadError):
    """No server ever answered: no network, no DNS, or the host is down."""

# one attempt failed in a way that another attempt may fix
class _TryAgain(Exception):
    def __init__(self, problem, answered=True):
        super().__init__(problem)
        self.answered = answered  # False: no HTTP response at all (maybe offline)

def _fetch(url, tmp, timeout, desc):
    # one attempt: a partial .tmp (from the last try, or a killed run) is continued with an HTTP Range request
    offset = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    try:
        response = requests.get(url, headers={"Range": f"bytes={offset}-"} if offset else {}, stream=True, timeout=timeout)
    except requests.ConnectionError as e:  # refused, unreachable, DNS, connect timeout
        raise _TryAgain(f"cannot connect ({e})", answered=False) from None
    except requests.Timeout as e:  # connected, but no headers in time
        raise _TryAgain(f"no response ({e})") from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            return  # nothing left to fetch: the partial file is whole (the caller's check decides)
        if status == 429 or status >= 500:
            raise _TryAgain(f"HTTP {status}")
        if status >= 400:  # 404 & co do not get better by retrying
            raise DownloadError(f"{url}: HTTP {status} {response.reason}")
        # a server that ignores Range answers 200 with the whole file: start the .tmp over
        resumed = status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        done = offset if resumed else 0
        length = response.headers.get("Content-Length")  # of this answer's body, not of the file
        total = done + int(length) if length else None
        try:
            with open(tmp, "ab" if resumed else "wb") as f, tqdm(total=total, initial=done, unit="B", unit_scale=True,
                    unit_divisor=1024, leave=False, desc=desc, disable=(total or 0) < BAR_MIN_BYTES) as bar:
                for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                    bar.update(f.write(chunk))
                f.flush()
                os.fsync(f.fileno())  # on disk before it gets its real name, so a power cut cannot tear it
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise _TryAgain(f"transfer interrupted ({e})") from None  # the .tmp stays: the next try resumes it
        # a server that hangs up early may not raise at all: only the byte count tells
        if total is not None and os.path.getsize(tmp) != total:
            raise _TryAgain(f"transfer interrupted at {os.path.getsize(tmp)} of {total} bytes")

def download_file(url, path, check=None, attempts=5, backoff=1.0, timeout=(10, 60), tmp=None):
    """`path`, downloaded from `url` unless it is already there. check(tmp) -> None or what is wrong.
    Raises OfflineError when no server ever answered, DownloadError for every other failure."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # <path>.tmp outlives a killed run on purpose: the next run resumes it
    tmp = tmp or path + ".tmp"
    # offline only if no attempt got any HTTP answer: a single 500 means the host is up
    answered = False
    for attempt in range(1, attempts + 1):
        try:
            _fetch(url, tmp, timeout, desc=os.path.basename(path))
            if check is None or (problem := check(tmp)) is None:
                # the real name appears only now, complete and checked: a file that exists is whole
                os.replace(tmp, path)
                return path
            os.remove(tmp)  # never resume a corrupt file: the next try fetches it whole
            raise _TryAgain(f"corrupt download ({problem})")
        except _TryAgain as e:
            problem, answered = str(e), answered or e.answered
        if attempt < attempts:
            # exponential backoff: a rate-limited or restarting server gets ever more room
            delay = backoff * 2 ** (attempt - 1)
            # and say so: with connect timeouts and backoff, the retries of one file can take minutes
            print0(f"{url}: {problem}; retrying in {delay:g}s ({attempt}/{attempts})", file=sys.stderr)
            time.sleep(delay)
    if not answered:
        raise OfflineError(f"no answer from {url} after {attempts} attempts: "
                           f"cannot reach {urlparse(url).hostname or url} — offline?")
    raise DownloadError(f"failed to download {url} after {attempts} attempts: {problem}")

def hf_dataset_file(repo_id, filename, revision="main", **kwargs):
    """The local copy of `filename` of HF dataset `repo_id`, downloaded on first use; kwargs go to download_file."""
    path = os.path.join(get_base_dir(), "hf_datasets", repo_id, revision, filename)
    # $NANOCHAT_HF_URL replaces huggingface.co: a mirror, or a loopback server in tests
    base_url = os.environ.get("NANOCHAT_HF_URL", "https://huggingface.co").rstrip("/")
    url = f"{base_url}/datasets/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
    # one .tmp per process: DDP ranks fetch the same file at once and must not append to each other's
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        return download_file(url, path, tmp=tmp, **kwargs)
    except DownloadError as e:
        if os.path.exists(tmp):
            os.remove(tmp)  # no later process would ever resume this one's .tmp
        # the user cannot fix the network from here, but can fetch the file elsewhere or use their own
        raise type(e)(f"{e}\nFetch it elsewhere and put it at\n  {path}\nor give the task a local file (data_path=..., "
                      "or a --mixture path like 'gsm8k:train:/path/train.jsonl'; python -m tasks.specs --help lists them).") from None

def sha256_problem(path, entry):
    """None if the file at `path` is the manifest entry's bytes, else what differs."""
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()  # whole: a manifest's files are a few MB each
    return None if got == entry["sha256"] else f"sha256 {got[:12]}… instead of {entry['sha256'][:12]}…"

def fetch_manifest(manifest, dest, base_url=None):
    """Every file of `manifest` ({"files": [{"path", "sha256", "bytes", "url"?}, ...]}) at dest/<path>,
    sha256-checked: from base_url/<path> (a mirror laid out like the manifest) or else from the entry's own
    upstream "url" (entries without one are skipped). Returns the skipped entries."""
    with open(manifest, encoding="utf-8") as f:
        entries = json.load(f)["files"]
    wanted = entries if base_url else [e for e in entries if e.get("url")]
    for i, entry in enumerate(wanted, 1):
        path = os.path.join(dest, entry["path"])
        # a file from an earlier run is trusted only if it still has the pinned bytes
        if os.path.exists(path) and (problem := sha256_problem(path, entry)):
            print0(f"{path}: {problem}, fetching it again")
            os.remove(path)
        if not os.path.exists(path):
            url = f"{base_url.rstrip('/')}/{quote(entry['path'])}" if base_url else entry["url"]
            print0(f"[{i}/{len(wanted)}] {entry['path']} ({entry['bytes'] / 1e6:.1f} MB) from {url}")
            # a corrupt copy is thrown away and fetched again, up to download_file's attempts
            download_file(url, path, check=lambda tmp, e=entry: sha256_problem(tmp, e))
    return [e for e in entries if e not in wanted]

def main(argv=None):
    parser = argparse.ArgumentParser(description=fetch_manifest.__doc__, formatter_class=HelpFormatter)
    parser.add_argument("manifest", help="the manifest json, e.g. dev/cpu_data.json")
    parser.add_argument("dest", help="the folder to fill, e.g. ~/.cache/nanochat/cpu_data")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_DATA_URL"),
                        help="a mirror laid out like the manifest's paths (default: $NANOCHAT_DATA_URL)")
    args = parser.parse_args(argv)
    try:
        skipped = fetch_manifest(args.manifest, args.dest, args.base_url)
    except DownloadError as e:
        raise SystemExit(f"error: {e}\nOr use files you have: NANOCHAT_DATA=<a folder laid out like the manifest's "
                         "paths>, or a mirror of them: NANOCHAT_DATA_URL=<base URL>") from None
    print0(f"{args.dest}: the manifest's files are in place and match their sha256"
           + (f" ({len(skipped)} converted ones need a mirror, NANOCHAT_DATA_URL, and were skipped)" if skipped else ""))

if __name__ == "__main__":
    main()
