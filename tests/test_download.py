"""
nanochat.download against a loopback server that misbehaves on purpose: retries, permanent
errors, Range resume, a server that ignores Range, stale and corrupt files, dropped connections,
offline; and Hugging Face dataset files (layout, cache, the offline message).
"""
import random
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.download import DownloadError, OfflineError, download_file, hf_dataset_file

BODY = random.Random(1).randbytes(200_000)  # incompressible (and not the "garbage" fault, seed 0), and big enough to be cut midway

@pytest.fixture
def served(file_server, tmp_path):
    """file_server serving BODY as /data.bin; returns (server, url, where it is downloaded to)."""
    (file_server.root / "data.bin").write_bytes(BODY)
    return file_server, f"{file_server.url}/data.bin", tmp_path / "downloads" / "data.bin"

def same_as_served(tmp):
    """A check: the bytes of BODY, or what is wrong."""
    return None if Path(tmp).read_bytes() == BODY else "not the served bytes"

def free_port():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# -----------------------------------------------------------------------------
# download_file

def test_download_and_skip_when_present(served):
    server, url, path = served
    assert download_file(url, str(path)) == str(path) and path.read_bytes() == BODY
    assert download_file(url, str(path)) == str(path) and len(server.requests) == 1  # present: no request
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]  # no .tmp left

def test_server_errors_are_retried(served, capsys):
    server, url, path = served
    server.faults.extend(["500", "500"])
    download_file(url, str(path), backoff=0)
    assert [status for _, _, status in server.requests] == [500, 500, 200]
    assert path.read_bytes() == BODY
    assert "HTTP 500; retrying" in capsys.readouterr().err  # a retry is never silent

def test_permanent_http_error_is_not_retried(served):
    server, url, path = served
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(url.replace("data.bin", "missing.bin"), str(path), backoff=0)
    assert len(server.requests) == 1
    assert list(path.parent.iterdir()) == []

def test_partial_tmp_is_resumed_with_range(served):
    server, url, path = served
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(BODY[:1000])  # what a killed download leaves behind
    download_file(url, str(path), check=same_as_served, backoff=0)
    assert server.requests == [("/data.bin", "bytes=1000-", 206)]
    assert path.read_bytes() == BODY and not tmp.exists()

def test_whole_tmp_is_checked_and_kept(served):
    """A .tmp that already holds the whole file: the server answers 416, nothing is fetched."""
    server, url, path = served
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(BODY)
    download_file(url, str(path), check=same_as_served, backoff=0)
    assert [status for _, _, status in server.requests] == [416]
    assert path.read_bytes() == BODY

def test_partial_tmp_restarts_when_server_ignores_range(served):
    server, url, path = served
    server.support_range = False
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"x" * 1000)
    download_file(url, str(path), check=same_as_served, backoff=0)
    assert [status for _, _, status in server.requests] == [200]
    assert path.read_bytes() == BODY

def test_stale_tmp_that_does_not_match_is_replaced(served):
    """A .tmp from some other file: resuming it gives a corrupt file, which is thrown away
    and fetched whole."""
    server, url, path = served
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"\0" * 1000)
    download_file(url, str(path), check=same_as_served, backoff=0)
    assert [(rng, status) for _, rng, status in server.requests] == [("bytes=1000-", 206), (None, 200)]
    assert path.read_bytes() == BODY

def test_connection_dropped_midway_resumes(served):
    server, url, path = served
    server.faults.append("truncate")
    download_file(url, str(path), check=same_as_served, backoff=0)
    (_, first_range, first_status), (_, second_range, second_status) = server.requests
    assert (first_range, first_status) == (None, 200)
    assert second_range.startswith("bytes=") and second_status == 206
    assert path.read_bytes() == BODY

def test_corrupt_body_leaves_nothing_behind(served):
    server, url, path = served
    server.faults.extend(["garbage"] * 3)
    with pytest.raises(DownloadError, match=r"after 3 attempts: corrupt download \(not the served bytes\)"):
        download_file(url, str(path), check=same_as_served, attempts=3, backoff=0)
    assert len(server.requests) == 3
    assert list(path.parent.iterdir()) == []  # no file, no .tmp

def test_unreachable_server_says_offline(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/data.bin"
    with pytest.raises(OfflineError, match=r"no answer from .*/data\.bin after 2 attempts: cannot reach 127\.0\.0\.1 — offline\?"):
        download_file(url, str(tmp_path / "data.bin"), attempts=2, backoff=0)
    assert not (tmp_path / "data.bin").exists()

def test_big_transfers_show_progress(file_server, tmp_path, capsys):
    (file_server.root / "big.bin").write_bytes(b"b" * (3 << 20))
    download_file(f"{file_server.url}/big.bin", str(tmp_path / "big.bin"))
    assert "big.bin" in capsys.readouterr().err  # the tqdm bar, labelled with the file name

# -----------------------------------------------------------------------------
# Hugging Face dataset files

@pytest.fixture
def hf_server(file_server, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", file_server.url)
    return file_server

def serve(server, url_path, body):
    (server.root / url_path).parent.mkdir(parents=True, exist_ok=True)
    (server.root / url_path).write_bytes(body)

def requests_for(server, url_path):
    return [p for p, _, _ in server.requests].count("/" + url_path)

def test_hf_file_downloads_caches_and_retries(hf_server, base_dir):
    serve(hf_server, "datasets/org/data/resolve/main/dir/a.bin", b"x" * 5000)
    path = hf_dataset_file("org/data", "dir/a.bin")
    assert path == str(base_dir / "hf_datasets" / "org/data" / "main" / "dir" / "a.bin")
    assert Path(path).read_bytes() == b"x" * 5000
    assert hf_dataset_file("org/data", "dir/a.bin") == path and len(hf_server.requests) == 1  # cached
    assert not list(Path(path).parent.glob("*.tmp*"))
    # a server error is retried
    serve(hf_server, "datasets/org/data/resolve/v2/b.bin", b"second")
    hf_server.faults.extend(["500", "500"])
    assert Path(hf_dataset_file("org/data", "b.bin", revision="v2", backoff=0.01)).read_bytes() == b"second"
    assert requests_for(hf_server, "datasets/org/data/resolve/v2/b.bin") == 3
    # a connection that drops mid-file is retried; the half file never appears under the real name
    serve(hf_server, "datasets/org/data/resolve/main/c.bin", bytes(range(256)) * 100)
    hf_server.faults.append("truncate")
    assert Path(hf_dataset_file("org/data", "c.bin", backoff=0.01)).read_bytes() == bytes(range(256)) * 100
    assert requests_for(hf_server, "datasets/org/data/resolve/main/c.bin") == 2
    # a missing file is not retried, and nothing is left behind
    with pytest.raises(DownloadError, match="HTTP 404"):
        hf_dataset_file("org/data", "missing.bin", backoff=0.01)
    assert requests_for(hf_server, "datasets/org/data/resolve/main/missing.bin") == 1
    assert not list((base_dir / "hf_datasets" / "org/data" / "main").glob("missing.bin*"))

def test_hf_file_offline_error_says_what_to_fetch_and_where(monkeypatch, base_dir):
    port = free_port()
    monkeypatch.setenv("NANOCHAT_HF_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError) as info:
        hf_dataset_file("openai/gsm8k", "main/test-00000-of-00001.parquet", attempts=2, backoff=0.01)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet" in message
    assert str(base_dir / "hf_datasets" / "openai/gsm8k" / "main" / "main" / "test-00000-of-00001.parquet") in message
    assert "after 2 attempts" in message and "data_path" in message

def test_default_datasets_come_from_hugging_face(hf_server, base_dir, tmp_path):
    """The files the tasks fetch by default, at the URLs and cache paths of Hugging Face's layout."""
    pq.write_table(pa.table({"question": ["1+1?"], "answer": ["1+1=<<1+1=2>>2\n#### 2"]}), tmp_path / "t.parquet")
    body = (tmp_path / "t.parquet").read_bytes()
    for repo, filename in [("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet"),
                           ("HuggingFaceH4/ultrafeedback_binarized", "data/test_prefs-00000-of-00001.parquet"),
                           ("openai/gsm8k", "main/test-00000-of-00001.parquet")]:
        serve(hf_server, f"datasets/{repo}/resolve/main/{filename}", body)
        path = hf_dataset_file(repo, filename)
        assert path == str(base_dir / "hf_datasets" / repo / "main" / filename)
        assert pq.read_table(path).column("question").to_pylist() == ["1+1?"]
        assert requests_for(hf_server, f"datasets/{repo}/resolve/main/{filename}") == 1

# -----------------------------------------------------------------------------
# A sha256-pinned manifest (the CPU preset's data, dev/cpu_data.json)

@pytest.fixture
def manifest(file_server, tmp_path, monkeypatch):
    """Three files laid out like shared/data on a mirror, one also at its own upstream URL; the manifest."""
    import hashlib
    import json
    monkeypatch.setattr("nanochat.download.time.sleep", lambda s: None)  # the retries' backoff, not waited for
    files = {"pretrain/train/a.txt": b"Once upon a time.\n\nThe end.\n", "chat/b.jsonl": b'{"messages": []}\n',
             "eval/core/c.jsonl": BODY}
    entries = []
    for path, body in files.items():
        (file_server.root / "mirror" / path).parent.mkdir(parents=True, exist_ok=True)
        (file_server.root / "mirror" / path).write_bytes(body)
        entries.append({"path": path, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "licence": "MIT"})
    (file_server.root / "upstream.txt").write_bytes(files["pretrain/train/a.txt"])
    entries[0]["url"] = f"{file_server.url}/upstream.txt"  # byte for byte an upstream file
    (tmp_path / "manifest.json").write_text(json.dumps({"files": entries}))
    return file_server, str(tmp_path / "manifest.json"), tmp_path / "cpu_data", files

def test_manifest_from_a_mirror_is_fetched_once_and_checked(manifest, monkeypatch, capsys):
    from nanochat import download
    server, path, dest, files = manifest
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"{server.url}/mirror/")
    download.main([path, str(dest)])
    assert {p: (dest / p).read_bytes() for p in files} == files
    assert "match their sha256" in capsys.readouterr().out
    download.main([path, str(dest)])  # a second run checks the files and fetches nothing
    assert len(server.requests) == 3
    (dest / "chat/b.jsonl").write_bytes(b"edited\n")  # a changed file is not trusted: fetched again
    download.main([path, str(dest)])
    assert (dest / "chat/b.jsonl").read_bytes() == files["chat/b.jsonl"] and len(server.requests) == 4
    assert "sha256" in capsys.readouterr().out

def test_manifest_corrupt_download_is_fetched_again_then_a_clear_error(manifest, monkeypatch):
    from nanochat import download
    server, path, dest, files = manifest
    server.faults.extend([None, None, "garbage"])  # the third file arrives corrupt once: fetched again
    download.fetch_manifest(path, str(dest), base_url=f"{server.url}/mirror")
    assert [r[0] for r in server.requests].count("/mirror/eval/core/c.jsonl") == 2
    assert (dest / "eval/core/c.jsonl").read_bytes() == BODY
    # a mirror whose copy never matches the pinned sha256: every attempt fails, the error says why
    (server.root / "mirror/chat/b.jsonl").write_bytes(b"not the pinned bytes\n")
    (dest / "chat/b.jsonl").unlink()
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"{server.url}/mirror")
    with pytest.raises(SystemExit, match=r"(?s)chat/b\.jsonl.*corrupt download \(sha256 .*NANOCHAT_DATA="):
        download.main([path, str(dest)])
    assert sorted(p.name for p in (dest / "chat").iterdir()) == []  # no corrupt file, no .tmp

def test_manifest_without_a_mirror_takes_the_upstream_files_only(manifest, monkeypatch, capsys):
    from nanochat import download
    server, path, dest, files = manifest
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    download.main([path, str(dest)])
    assert [r[0] for r in server.requests] == ["/upstream.txt"]
    assert (dest / "pretrain/train/a.txt").read_bytes() == files["pretrain/train/a.txt"]
    assert not (dest / "chat").exists() and "2 converted ones need a mirror" in capsys.readouterr().out

def test_manifest_offline_names_the_local_alternatives(manifest, monkeypatch):
    from nanochat import download
    _, path, dest, _ = manifest
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit, match=r"(?s)offline\?.*NANOCHAT_DATA=.*NANOCHAT_DATA_URL="):
        download.main([path, str(dest)])

def test_the_cpu_preset_manifest_pins_what_shared_data_holds():
    """dev/cpu_data.json: every entry has a path, size, sha256, licence and source; where ../shared/data
    exists, its files are exactly those bytes (the manifest is the way to get them elsewhere)."""
    import json
    from conftest import SHARED_DATA
    from nanochat.download import sha256_problem
    entries = json.loads((Path(__file__).resolve().parents[1] / "dev" / "cpu_data.json").read_text())["files"]
    assert all(e["path"] and e["bytes"] > 0 and len(e["sha256"]) == 64 and e["licence"] and e["source"] for e in entries)
    assert all(e["url"].startswith("https://raw.githubusercontent.com/") for e in entries if "url" in e)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    assert all(sha256_problem(SHARED_DATA / e["path"], e) is None for e in entries)
    assert len(entries) == sum(1 for p in SHARED_DATA.rglob("*") if p.is_file() and p.name != "README.md")
