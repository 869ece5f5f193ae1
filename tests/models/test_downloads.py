"""Verified, resumable downloads against a real Range-capable HTTP server on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.downloads import Downloader, is_ready, model_dir, verify_file
from models.records import ModelRecord

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class FileServer:
    """Serves files from `root`, honours `Range: bytes=N-`, and plays scripted faults per path."""

    root: Path
    url: str = ""
    # path -> actions consumed one per request: "503", "404", "truncate:N", "ignore-range",
    # "linked-etag:HEX" (the header a Hugging Face server sends with a large file's sha256)
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self, path: str) -> str | None:
        with self.lock:
            queue = self.faults.get(path) or []
            return queue.pop(0) if queue else None


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0].lstrip("/")
            with state.lock:
                state.requests.append((path, self.headers.get("Range")))
            fault = state.next_fault(path)
            target = state.root / path
            if fault in ("503", "404") or not target.is_file():
                self.send_error(int(fault or 404))
                return
            self._send(target.read_bytes(), fault)

        def _send(self, data: bytes, fault: str | None) -> None:
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            start = int(match.group(1)) if match and fault != "ignore-range" else 0
            if start >= len(data) and match:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            if fault and fault.startswith("linked-etag:"):
                self.send_header("X-Linked-Etag", f'"{fault.split(":")[1]}"')
            self.end_headers()
            body = data[start:]
            if fault and fault.startswith("truncate:"):
                body = body[: int(fault.split(":")[1])]  # then the connection closes short
            with state.lock:  # counted before writing: the client may finish before this thread resumes
                state.bytes_sent += len(body)
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "model.safetensors").write_bytes(PAYLOAD)
    state = FileServer(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _record(
    server: FileServer, *, sha: str | None = PAYLOAD_SHA, name: str = "Test Model", **kw: object
) -> ModelRecord:
    data = {
        "name": name,
        "baseline": "stable diffusion 1",
        "config": {
            "files": [{"path": "model.safetensors", "sha256sum": sha}, {"path": "v1-inference.yaml"}],
            "download": [
                {
                    "file_name": "model.safetensors",
                    "file_path": "",
                    "file_url": f"{server.url}/model.safetensors",
                }
            ],
        },
        **kw,
    }
    return ModelRecord.from_entry(name, data, category="stable_diffusion")


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def downloader(tmp_path: Path, sleeps: Sleeps) -> Downloader:
    return Downloader(tmp_path / "cache", progress=False, sleep=sleeps, backoff_s=1.0)


def test_fresh_download_is_verified_and_renamed(
    tmp_path: Path, server: FileServer, downloader: Downloader
) -> None:
    record, dest = _record(server), tmp_path / "models"
    assert not is_ready(record, dest)
    outcome = downloader.ensure(record, dest)
    assert outcome.ok and outcome.downloaded == [dest / "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == PAYLOAD
    assert not (dest / "model.safetensors.part").exists()
    sidecar = json.loads((dest / "model.safetensors.sha256").read_text())
    assert sidecar["sha256"] == PAYLOAD_SHA and sidecar["size"] == len(PAYLOAD)
    # The legacy ldm yaml (no download entry, no hash) is not required, as in the legacy worker.
    assert is_ready(record, dest)
    again = downloader.ensure(record, dest)
    assert again.ok and again.downloaded == [] and len(server.requests) == 1


def test_resume_from_part_file_uses_range(tmp_path: Path, server: FileServer, downloader: Downloader) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "model.safetensors.part").write_bytes(PAYLOAD[:120_000])
    outcome = downloader.ensure(_record(server), dest)
    assert outcome.ok
    assert server.requests == [("model.safetensors", "bytes=120000-")]
    assert server.bytes_sent == len(PAYLOAD) - 120_000
    assert (dest / "model.safetensors").read_bytes() == PAYLOAD


def test_interrupted_transfer_resumes_on_retry(
    tmp_path: Path, server: FileServer, downloader: Downloader, sleeps: Sleeps
) -> None:
    server.faults["model.safetensors"] = ["truncate:100000"]
    dest = tmp_path / "models"
    outcome = downloader.ensure(_record(server), dest)
    assert outcome.ok, outcome.reason
    (first, no_range), (second, resume) = server.requests
    assert no_range is None and resume is not None
    # It resumed where the bytes it kept end (urllib3 drops the last partial read), not from zero.
    offset = int(resume.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 100_000 and server.bytes_sent == 100_000 + len(PAYLOAD) - offset
    assert sleeps == [1.0]
    assert (dest / "model.safetensors").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(
    tmp_path: Path, server: FileServer, downloader: Downloader
) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "model.safetensors.part").write_bytes(b"garbage from another version")
    server.faults["model.safetensors"] = ["ignore-range"]
    outcome = downloader.ensure(_record(server), dest)
    assert outcome.ok, outcome.reason
    assert server.requests[0][1] is not None  # we asked for a resume; a 200 made us start over
    assert (dest / "model.safetensors").read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_refetching(
    tmp_path: Path, server: FileServer, downloader: Downloader
) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "model.safetensors.part").write_bytes(PAYLOAD)  # a crash between the last byte and the rename
    assert downloader.ensure(_record(server), dest).ok
    assert server.bytes_sent == 0 and (dest / "model.safetensors").read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_and_reports(
    tmp_path: Path, server: FileServer, downloader: Downloader, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "AB" * 32
    record, dest = _record(server, sha=wrong, name="Broken Model"), tmp_path / "models"
    with caplog.at_level(logging.ERROR, logger="models.downloads"):
        outcome = downloader.ensure(record, dest)
    assert not outcome.ok
    assert (
        PAYLOAD_SHA in outcome.reason
        and wrong.lower() in outcome.reason
        and "model.safetensors" in outcome.reason
    )
    assert not (dest / "model.safetensors").exists() and not (dest / "model.safetensors.part").exists()
    assert not is_ready(record, dest)
    assert any("Broken Model" in r.getMessage() and PAYLOAD_SHA in r.getMessage() for r in caplog.records)


def test_a_file_without_a_reference_sha256_is_checked_against_the_hubs(
    tmp_path: Path, server: FileServer, downloader: Downloader
) -> None:
    record, dest = _record(server, sha=None), tmp_path / "models"
    server.faults["model.safetensors"] = [f"linked-etag:{PAYLOAD_SHA}"]
    assert downloader.ensure(record, dest).ok
    assert json.loads((dest / "model.safetensors.sha256").read_text())["sha256"] == PAYLOAD_SHA

    other = tmp_path / "other"
    server.faults["model.safetensors"] = ["linked-etag:" + "cd" * 32]
    outcome = downloader.ensure(record, other)
    assert not outcome.ok and "the hub says " + "cd" * 32 in outcome.reason
    assert not (other / "model.safetensors").exists() and not (other / "model.safetensors.part").exists()


def test_corrupt_existing_file_is_replaced(
    tmp_path: Path, server: FileServer, downloader: Downloader
) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"x" * 10)
    assert not is_ready(_record(server), dest)
    assert downloader.ensure(_record(server), dest).ok
    assert (dest / "model.safetensors").read_bytes() == PAYLOAD


def test_5xx_is_retried_with_backoff(
    tmp_path: Path, server: FileServer, downloader: Downloader, sleeps: Sleeps
) -> None:
    server.faults["model.safetensors"] = ["503", "503"]
    outcome = downloader.ensure(_record(server), tmp_path / "models")
    assert outcome.ok and sleeps == [1.0, 2.0] and len(server.requests) == 3


def test_retries_give_up_and_4xx_is_not_retried(tmp_path: Path, server: FileServer, sleeps: Sleeps) -> None:
    downloader = Downloader(tmp_path / "cache", progress=False, sleep=sleeps, retry_attempts=2, backoff_s=0.5)
    server.faults["model.safetensors"] = ["503"] * 5
    outcome = downloader.ensure(_record(server), tmp_path / "models")
    assert not outcome.ok and "giving up after 3 attempts" in outcome.reason and sleeps == [0.5, 1.0]

    sleeps.clear()
    server.faults["model.safetensors"] = ["404"]
    outcome = downloader.ensure(_record(server), tmp_path / "models")
    assert not outcome.ok and "HTTP 404" in outcome.reason and sleeps == []


def test_connection_refused_is_retried_then_reported(tmp_path: Path, sleeps: Sleeps) -> None:
    downloader = Downloader(tmp_path / "cache", progress=False, sleep=sleeps, retry_attempts=1)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    record = ModelRecord.from_entry(
        "Gone",
        {
            "config": {
                "files": [{"path": "a.bin", "sha256sum": PAYLOAD_SHA}],
                "download": [{"file_name": "a.bin", "file_url": f"http://127.0.0.1:{port}/a.bin"}],
            }
        },
        category="esrgan",
    )
    outcome = downloader.ensure(record, tmp_path / "models")
    assert not outcome.ok and "ConnectionError" in outcome.reason and sleeps == [1.0]


def test_disk_space_refusal_before_any_request(tmp_path: Path, server: FileServer, sleeps: Sleeps) -> None:
    downloader = Downloader(tmp_path / "cache", progress=False, sleep=sleeps, disk_free=lambda _p: 50_000)
    record = _record(server, size_on_disk_bytes=len(PAYLOAD))
    outcome = downloader.ensure(record, tmp_path / "models")
    assert not outcome.ok and "not enough disk space" in outcome.reason and "Test Model" in outcome.reason
    assert server.requests == []


def test_disk_space_refusal_from_content_length(tmp_path: Path, server: FileServer, sleeps: Sleeps) -> None:
    downloader = Downloader(tmp_path / "cache", progress=False, sleep=sleeps, disk_free=lambda _p: 50_000)
    dest = tmp_path / "models"
    outcome = downloader.ensure(_record(server), dest)  # no size_on_disk_bytes: the reply's length decides
    assert not outcome.ok and "not enough disk space" in outcome.reason and sleeps == []
    assert len(server.requests) == 1 and not (dest / "model.safetensors.part").exists()


def test_files_without_download_must_be_present(tmp_path: Path, downloader: Downloader) -> None:
    data = {"config": {"files": [{"path": "weights.bin", "sha256sum": PAYLOAD_SHA}, {"path": "config.json"}]}}
    record = ModelRecord.from_entry("Local", data, category="stable_diffusion", base_dir=tmp_path / "mine")
    dest = model_dir(tmp_path / "cache", record)
    assert dest == tmp_path / "mine"
    outcome = downloader.ensure(record, dest)
    assert not outcome.ok and "weights.bin is missing" in outcome.reason
    dest.mkdir()
    (dest / "weights.bin").write_bytes(PAYLOAD)
    assert not is_ready(record, dest)  # config.json (no hash, not a yaml) is still required
    (dest / "config.json").write_text("{}")
    assert is_ready(record, dest) and downloader.ensure(record, dest).ok
    (dest / "weights.bin").write_bytes(b"tampered")
    outcome = downloader.ensure(record, dest)
    assert not outcome.ok and PAYLOAD_SHA in outcome.reason
    assert (dest / "weights.bin").read_bytes() == b"tampered"  # an operator's file is never deleted


def test_local_record_may_use_absolute_paths(tmp_path: Path, downloader: Downloader) -> None:
    weights = tmp_path / "elsewhere" / "w.bin"
    weights.parent.mkdir()
    weights.write_bytes(PAYLOAD)
    data = {"config": {"files": [{"path": str(weights), "sha256sum": PAYLOAD_SHA}]}}
    record = ModelRecord.from_entry("Abs", data, category="stable_diffusion", base_dir=tmp_path / "ref")
    assert is_ready(record, model_dir(tmp_path / "cache", record))
    assert downloader.ensure(record, model_dir(tmp_path / "cache", record)).ok


def test_only_http_urls_and_no_escaping_paths(tmp_path: Path, downloader: Downloader) -> None:
    bad_url = ModelRecord.from_entry(
        "F",
        {"config": {"download": [{"file_name": "passwd", "file_url": "file:///etc/passwd"}]}},
        category="esrgan",
    )
    assert "only http and https" in downloader.ensure(bad_url, tmp_path / "m").reason
    escaping = ModelRecord.from_entry(
        "E", {"config": {"files": [{"path": "../../evil.bin"}]}}, category="esrgan"
    )
    outcome = downloader.ensure(escaping, tmp_path / "m")
    assert not outcome.ok and "escapes" in outcome.reason and not is_ready(escaping, tmp_path / "m")


def test_ensure_all_places_files_by_category_and_shares_files(tmp_path: Path, server: FileServer) -> None:
    cache = tmp_path / "cache"
    downloader = Downloader(cache, progress=False, max_parallel=2)
    checkpoint = _record(server, name="Ckpt A")
    upscaler = ModelRecord.from_entry(
        "Up",
        {
            "config": {
                "files": [{"path": "model.safetensors", "sha256sum": PAYLOAD_SHA.upper()}],
                "download": [
                    {"file_name": "model.safetensors", "file_url": f"{server.url}/model.safetensors"}
                ],
            }
        },
        category="esrgan",
    )
    twin = _record(server, name="Ckpt B")  # same file as Ckpt A: fetched once
    outcomes = downloader.ensure_all([checkpoint, upscaler, twin])
    assert all(o.ok for o in outcomes.values()) and set(outcomes) == {"Ckpt A", "Up", "Ckpt B"}
    assert (cache / "checkpoints" / "model.safetensors").read_bytes() == PAYLOAD
    assert (cache / "esrgan" / "model.safetensors").read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_model_dir_layout(tmp_path: Path) -> None:
    diffusers = ModelRecord.from_entry("Stable Diffusion 2 Depth", {"hf_path": "x/y"}, category="diffusers")
    assert model_dir(tmp_path, diffusers) == tmp_path / "diffusers" / "Stable Diffusion 2 Depth"
    clip = ModelRecord.from_entry("ViT-L/14", {}, category="clip")
    assert model_dir(tmp_path, clip) == tmp_path / "clip"
    assert model_dir(tmp_path, ModelRecord(name="c")) == tmp_path / "checkpoints"
    # A diffusers snapshot is ready once its model_index.json is there.
    assert not is_ready(diffusers, model_dir(tmp_path, diffusers))
    model_dir(tmp_path, diffusers).mkdir(parents=True)
    (model_dir(tmp_path, diffusers) / "model_index.json").write_text("{}")
    assert is_ready(diffusers, model_dir(tmp_path, diffusers))


def test_sidecar_cache_avoids_rehash(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(PAYLOAD)
    assert verify_file(path, PAYLOAD_SHA.upper())  # case-insensitive
    assert json.loads((tmp_path / "big.bin.sha256").read_text())["sha256"] == PAYLOAD_SHA
    # Same size and mtime, different bytes: trusting the sidecar proves no rehash happened.
    stat = path.stat()
    path.write_bytes(b"\0" * len(PAYLOAD))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verify_file(path, PAYLOAD_SHA)
    # Any change of mtime invalidates the sidecar and the real content is hashed again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not verify_file(path, PAYLOAD_SHA)
    assert verify_file(path, hashlib.sha256(b"\0" * len(PAYLOAD)).hexdigest())
    assert not verify_file(tmp_path / "missing.bin", PAYLOAD_SHA)


# ---- interrogator records: pinned revision, Hugging Face cache reuse, wrong sha256 re-fetched -------------
def _pinned_record(server: FileServer, sha: str | None = PAYLOAD_SHA) -> ModelRecord:
    """Shaped as interrogators/reference.json: `<name>/<file>` paths, an hf_path and a pinned revision."""
    data = {
        "name": "clip-vit-large-patch14",
        "type": "clip",
        "hf_path": "openai/clip-vit-large-patch14",
        "hf_revision": "32bd64288804d66eefd0ccbe215aa642df71cc41",
        "config": {
            "files": [{"path": "clip-vit-large-patch14/model.safetensors", "sha256sum": sha}],
            "download": [
                {
                    "file_name": "model.safetensors",
                    "file_path": "clip-vit-large-patch14",
                    "file_url": f"{server.url}/model.safetensors",
                }
            ],
        },
    }
    return ModelRecord.from_entry("clip-vit-large-patch14", data, category="clip")


def _hf_cache(tmp_path: Path, content: bytes) -> Path:
    root = tmp_path / "hf-hub"
    repo = root / "models--openai--clip-vit-large-patch14"
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    snapshot = repo / "snapshots" / "32bd64288804d66eefd0ccbe215aa642df71cc41"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    return root


def test_existing_hugging_face_cache_is_used_in_place(tmp_path: Path, server: FileServer) -> None:
    hub = _hf_cache(tmp_path, PAYLOAD)
    downloader = Downloader(tmp_path / "cache", progress=False, hf_cache_dirs=[hub])
    record, dest = _pinned_record(server), tmp_path / "cache" / "clip"
    outcome = downloader.ensure(record, dest)
    assert outcome.ok and not outcome.downloaded and not server.requests  # no second download
    target = dest / "clip-vit-large-patch14" / "model.safetensors"
    assert target.is_symlink() and target.read_bytes() == PAYLOAD and is_ready(record, dest)
    assert not list((hub / "models--openai--clip-vit-large-patch14" / "blobs").glob("*.sha256"))


def test_a_hugging_face_cache_file_of_another_sha256_is_not_used(
    tmp_path: Path, server: FileServer
) -> None:
    hub = _hf_cache(tmp_path, b"not the pinned weights")
    downloader = Downloader(tmp_path / "cache", progress=False, hf_cache_dirs=[hub])
    record, dest = _pinned_record(server), tmp_path / "cache" / "clip"
    outcome = downloader.ensure(record, dest)
    assert outcome.ok and len(server.requests) == 1
    assert not (dest / "clip-vit-large-patch14" / "model.safetensors").is_symlink()


def test_interrogator_file_with_a_wrong_sha256_is_fetched_again(tmp_path: Path, server: FileServer) -> None:
    downloader = Downloader(tmp_path / "cache", progress=False, hf_cache_dirs=[])
    record, dest = _pinned_record(server), tmp_path / "cache" / "clip"
    target = dest / "clip-vit-large-patch14" / "model.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a truncated or tampered file")
    assert not is_ready(record, dest)
    outcome = downloader.ensure(record, dest)
    assert outcome.ok and outcome.downloaded == [target] and target.read_bytes() == PAYLOAD


def test_every_shipped_interrogator_record_is_pinned_to_a_revision() -> None:
    import json

    from interrogators.reference import REFERENCE_PATH

    for name, raw in json.loads(REFERENCE_PATH.read_text()).items():
        if name == "blip-image-captioning-base":
            continue  # the optional low-memory caption model: not pinned yet (see the README)
        if "hf_revision" not in raw:  # a single file from a release page: pinned by its published sha256
            assert all(len(f.get("sha256sum") or "") == 64 for f in raw["config"]["files"]), name
            continue
        revision = raw["hf_revision"]
        assert len(revision) == 40, name
        assert all(f"/resolve/{revision}/" in d["file_url"] for d in raw["config"]["download"]), name


def test_download_rate_limit_is_one_budget_for_every_thread() -> None:
    from models.downloads import _Throttle

    throttle = _Throttle(100_000.0, time.sleep)  # 100 kB/s shared by two threads
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [throttle.spend(10_000) for _ in range(2)]) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0.35 <= time.monotonic() - started <= 1.0  # 40 kB at 100 kB/s, whatever the thread count
