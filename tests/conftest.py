"""
Shared test fixtures: a loopback HTTP file server (tests never touch the internet), a tiny
real tokenizer, the path of the shared real datasets, and an isolated $NANOCHAT_BASE_DIR.
"""
import random
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

@pytest.fixture
def shared_data():
    """/work/shared/data (../shared/data from the repo root), or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA

@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box spinning OpenMP
    workers make them many times slower. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh $NANOCHAT_BASE_DIR, so no test writes to ~/.cache."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path

# -----------------------------------------------------------------------------
# A loopback HTTP server that can misbehave on purpose

class FileServer:
    """
    Serves the files of `root` on 127.0.0.1 (GET, with HTTP Range support when
    `support_range`). `faults` is a queue of misbehaviours for the next requests, one each:
        "500"       answer HTTP 500
        "truncate"  announce the full Content-Length, send half the body, hang up
        "garbage"   send random bytes of the right length
    `requests` records (path, Range header, status) for every request.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.faults = deque()
        self.support_range = True
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server._handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def _handle(self, handler):
        range_header = handler.headers.get("Range")
        fault = self.faults.popleft() if self.faults else None
        path = self.root / handler.path.lstrip("/")
        if fault == "500":
            status = 500
        elif not path.is_file():
            status = 404
        else:
            status = 200
        if status != 200:
            self.requests.append((handler.path, range_header, status))
            handler.send_error(status)
            return
        body = path.read_bytes()
        if fault == "garbage":
            body = random.Random(0).randbytes(len(body))
        start = 0
        if range_header and self.support_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.requests.append((handler.path, range_header, 416))
                handler.send_error(416)
                return
            status = 206
        self.requests.append((handler.path, range_header, status))
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        payload = body[start:]
        if fault == "truncate":
            payload = payload[:len(payload) // 2]
        handler.wfile.write(payload)
        handler.wfile.flush()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

@pytest.fixture
def file_server(tmp_path):
    """A FileServer over a fresh folder (tmp_path/"served"): put files there, then GET them."""
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.close()

# -----------------------------------------------------------------------------
# A tiny real tokenizer (vocab 512, trained in well under a second)

def sample_texts():
    """Real English if the shared data is there, else seeded pseudo-text (still real bytes)."""
    shakespeare = SHARED_DATA / "pretrain" / "train" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        return [shakespeare.read_text(encoding="utf-8")[:200_000]]
    rng = random.Random(0)
    words = "the of and to in is was that for it with as his on be at by had are but from or have an they which one you were her all she there would their we him been has when who will more no if out so said what up its about into than them can only other new some could time these two may then do first any my now such like our over man me even most made after also did many before must through back years where much your way well down should because each just those people how too little state good very make world still own see men work long get here between both life being under never day same another know while last might us great old year off come since against go came right used take three".split()
    return [" ".join(rng.choice(words) for _ in range(30_000))]

@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(sample_texts()), vocab_size=512)
