"""Resumable, verified downloads of the files a model record lists.

A file is written to `<file>.part` (resumed with a Range header after an interruption or a restart),
hashed while it streams, checked against the reference's sha256 and only then renamed into place. A
`<file>.sha256` sidecar (size + mtime + hash) lets a restart trust a verified file without rehashing GBs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from models.hub_snapshot import listing_url, select_files
from models.records import ModelRecord

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
PART_SUFFIX = ".part"
_CHUNK = 1 << 20
# Small network reads: urllib3 drops a partly filled read on a broken connection, so this bounds the loss.
_NET_CHUNK = 64 << 10
_MAX_BACKOFF_S = 60.0
# ldm `.yaml` configs are listed without a download entry; the legacy worker shipped them and skipped
# them when validating, and our loader ships its own component configs.
_OPTIONAL_CONFIG_SUFFIXES = (".yaml", ".yml")
_PER_CATEGORY_DIRS = frozenset(
    {"esrgan", "gfpgan", "codeformer", "rembg", "blip", "clip", "safety_checker", "controlnet",
     "miscellaneous"}
)


def model_dir(cache_home: Path, record: ModelRecord) -> Path:
    """Where a record's files live. Local custom records without downloads stay beside their reference
    file; checkpoints share `checkpoints/`; diffusers folders get `diffusers/<name>/`."""
    if record.base_dir is not None and not record.downloads:
        return record.base_dir
    if record.category == "diffusers" or (record.hf_path and not record.files):
        return cache_home / "diffusers" / _safe_dir_name(record.name)
    if record.category in _PER_CATEGORY_DIRS:
        return cache_home / record.category
    return cache_home / "checkpoints"


def _safe_dir_name(name: str) -> str:
    # Model names carry spaces, slashes ("ViT-L/14") and parentheses.
    return re.sub(r"[^A-Za-z0-9._ ()+-]", "_", name).strip() or "_"


# ---- verification --------------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _read_sidecar(path: Path, stat: os.stat_result) -> str | None:
    try:
        data = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("size") != stat.st_size or data.get("mtime_ns") != stat.st_mtime_ns:
        return None
    digest = data.get("sha256")
    return digest.lower() if isinstance(digest, str) else None


def write_sidecar(path: Path, digest: str, *, stat_of: Path | None = None) -> None:
    """Record `digest` as the sha256 of `path` as it is now (size + mtime; those of `stat_of` when given,
    the file about to be renamed onto `path`); best effort."""
    try:
        stat = (stat_of or path).stat()
        body = json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.lower()})
        tmp = _sidecar(path).with_name(_sidecar(path).name + ".tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, _sidecar(path))
    except OSError as exc:  # a read-only model dir must not make a good file unusable
        logger.debug("cannot write sha256 sidecar for %s: %s", path, exc)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256, from its sidecar when size and mtime still match, else hashed (and cached)."""
    stat = path.stat()
    cached = _read_sidecar(path, stat)
    if cached is not None:
        return cached
    logger.info("hashing %s (%.1f MB)", path, stat.st_size / 1e6)
    digest = hash_file(path)
    write_sidecar(path, digest)
    return digest


def verify_file(path: Path, sha256: str) -> bool:
    """True when `path` exists and its sha256 equals `sha256` (case-insensitive)."""
    path = Path(path)
    if not path.is_file():
        return False
    return file_sha256(path) == sha256.strip().lower()


# ---- what a record needs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    """One file of a record: where it goes, its expected hash, and its URL (empty: must be present)."""

    rel: str
    target: Path
    sha256: str | None
    url: str

    @property
    def optional(self) -> bool:
        return not self.url and not self.sha256 and self.target.suffix.lower() in _OPTIONAL_CONFIG_SUFFIXES


def _resolve(dest_dir: Path, rel: str, record: ModelRecord) -> Path:
    candidate = Path(rel)
    if record.base_dir is None and (candidate.is_absolute() or ".." in PurePosixPath(rel).parts):
        # Upstream records are not allowed to write outside the model directory.
        raise ValueError(f"path {rel!r} escapes the model directory")
    return dest_dir / candidate


def _plan(record: ModelRecord, dest_dir: Path) -> list[_Item]:
    by_rel = {d.relative_path: d for d in record.downloads}
    by_name = {d.file_name: d for d in record.downloads}
    items: list[_Item] = []
    used: set[str] = set()
    for spec in record.files:
        download = by_rel.get(spec.path) or by_name.get(PurePosixPath(spec.path).name)
        if download is not None:
            used.add(download.relative_path)
        url = download.file_url if download is not None else ""
        items.append(_Item(spec.path, _resolve(dest_dir, spec.path, record), spec.sha256sum, url))
    for rel, download in by_rel.items():
        if rel not in used:
            items.append(_Item(rel, _resolve(dest_dir, rel, record), None, download.file_url))
    return items


def _present(item: _Item) -> bool:
    if not item.target.is_file():
        return False
    return item.sha256 is None or verify_file(item.target, item.sha256)


def is_ready(record: ModelRecord, dest_dir: Path) -> bool:
    """Every listed file present and, where the reference gives a sha256, verified."""
    if not record.files and not record.downloads:
        # diffusers-shape (hf_path) records: a complete snapshot has its model_index.json.
        return record.hf_path is not None and (dest_dir / "model_index.json").is_file()
    try:
        items = _plan(record, dest_dir)
    except ValueError as exc:
        logger.warning("model %r: %s", record.name, exc)
        return False
    return all(_present(item) or (item.optional and not item.target.exists()) for item in items)


def hf_hub_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads on this machine (HF_HUB_CACHE, HF_HOME/hub, ~/.cache)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def hf_cached_file(record: ModelRecord, rel: str, cache_dirs: list[Path] | None = None) -> Path | None:
    """The file of a revision-pinned Hugging Face record in an existing hub cache, when it is there
    (`models--<org>--<name>/snapshots/<revision>/<file>`). `rel` is the record's path for it: the model's
    folder name first, then the path inside the repository."""
    revision = record.extra.get("hf_revision")
    if not record.hf_path or not isinstance(revision, str):
        return None
    inside = PurePosixPath(*PurePosixPath(rel).parts[1:]) if len(PurePosixPath(rel).parts) > 1 else None
    if inside is None:
        return None
    repo = "models--" + record.hf_path.replace("/", "--")
    for root in cache_dirs if cache_dirs is not None else hf_hub_cache_dirs():
        candidate = root / repo / "snapshots" / revision / inside
        if candidate.is_file():
            return candidate
    return None


def missing_bytes(record: ModelRecord, dest_dir: Path) -> int | None:
    """Bytes still to download for the record: 0 when ready, None when the reference gives no size."""
    if is_ready(record, dest_dir):
        return 0
    if not record.size_on_disk_bytes:
        return None
    have = 0
    try:
        items = _plan(record, dest_dir)
    except ValueError:
        return None
    for item in items:
        for path in (item.target, item.target.with_name(item.target.name + PART_SUFFIX)):
            if path.is_file():
                have += path.stat().st_size
    return max(0, record.size_on_disk_bytes - have)


class _Throttle:
    """download_rate_limit_kbps: one budget shared by every download thread (the cap is the aggregate)."""

    def __init__(self, bytes_per_s: float, sleep: Callable[[float], None]) -> None:
        self._rate = bytes_per_s
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def spend(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + size / self._rate
            wait = self._next - now
        if wait > 0:
            self._sleep(wait)


# ---- downloading ---------------------------------------------------------------------------------------
@dataclass
class DownloadOutcome:
    name: str
    ok: bool
    reason: str = ""
    downloaded: list[Path] = field(default_factory=list)


class DownloadError(Exception):
    """A download that cannot succeed by retrying (4xx, bad hash, no space, bad URL)."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def published_sha256(response: requests.Response) -> str | None:
    """The sha256 a Hugging Face server publishes for a large (LFS) file: its `X-Linked-Etag`, sent on the
    redirect to the CDN (or on the answer itself). Small files carry a git sha1 there, which is not used."""
    for answer in [*response.history, response]:
        etag = answer.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
    return None


def _disk_free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


class Downloader:
    """Downloads and verifies the files of model records, a few models at a time."""

    def __init__(
        self,
        dest_root: Path,
        *,
        session: requests.Session | None = None,
        max_parallel: int = 2,
        retry_attempts: int = 4,
        backoff_s: float = 1.0,
        progress: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        disk_free: Callable[[Path], int] = _disk_free,
        timeout: float = 30.0,
        rate_limit_kbps: int | None = None,
        hf_cache_dirs: list[Path] | None = None,
    ) -> None:
        self._dest_root = Path(dest_root)
        self._session = session
        self._local = threading.local()
        self._max_parallel = max(1, max_parallel)
        self._retry_attempts = max(0, retry_attempts)
        self._backoff_s = backoff_s
        self._progress = progress and sys.stderr.isatty()
        self._sleep = sleep
        self._disk_free = disk_free
        self._timeout = timeout
        self._locks: dict[Path, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._throttle = _Throttle(rate_limit_kbps * 1000, sleep) if rate_limit_kbps else None
        self._hf_cache_dirs = hf_cache_dirs

    def _http(self) -> requests.Session:
        if self._session is not None:
            return self._session
        # requests.Session is not documented as thread-safe: one per worker thread.
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    @contextmanager
    def _file_lock(self, path: Path) -> Iterator[None]:
        # Records share files (gfpgan's face detectors, controlnet yaml): one writer per target.
        with self._locks_guard:
            lock = self._locks.setdefault(path.resolve(), threading.Lock())
        with lock:
            yield

    def ensure_all(self, records: Iterable[ModelRecord]) -> dict[str, DownloadOutcome]:
        """Ensure each record under `model_dir(dest_root, record)`, `max_parallel` at a time."""
        records = list(records)
        with ThreadPoolExecutor(max_workers=self._max_parallel, thread_name_prefix="download") as pool:
            futures = {r.name: pool.submit(self.ensure, r, model_dir(self._dest_root, r)) for r in records}
        return {name: future.result() for name, future in futures.items()}

    def ensure(self, record: ModelRecord, dest_dir: Path) -> DownloadOutcome:
        """Download what is missing or corrupt; the outcome says whether the model is now ready."""
        dest_dir = Path(dest_dir)
        try:
            items = _plan(record, dest_dir)
            if not items:
                if is_ready(record, dest_dir):
                    return DownloadOutcome(record.name, True)
                if not record.hf_path:
                    return DownloadOutcome(record.name, False, "the reference lists no files for it")
                items = self._hub_items(record, dest_dir)
            todo = self._missing(record, items)
            self._check_space(record, dest_dir, todo)
            downloaded = [self._download(record, item) for item in todo]
        except DownloadError as exc:
            logger.error("model %r: %s", record.name, exc)
            return DownloadOutcome(record.name, False, str(exc))
        except (ValueError, OSError) as exc:
            logger.error("model %r: %s", record.name, exc)
            return DownloadOutcome(record.name, False, str(exc))
        if downloaded:
            logger.info("model %r: %d file(s) downloaded and verified", record.name, len(downloaded))
        return DownloadOutcome(record.name, True, downloaded=downloaded)

    def _hub_items(self, record: ModelRecord, dest_dir: Path) -> list[_Item]:
        """A diffusers-shape record: the repository's pipeline files, listed by the hub's API."""
        url = listing_url(str(record.hf_path))
        try:
            response = self._http().get(url, timeout=self._timeout)
            response.raise_for_status()
            files = select_files(str(record.hf_path), response.json())
        except (requests.RequestException, ValueError) as exc:
            raise DownloadError(f"could not list {record.hf_path} on the hub ({exc})") from exc
        return [_Item(f.path, _resolve(dest_dir, f.path, record), f.sha256, f.url) for f in files]

    def _missing(self, record: ModelRecord, items: list[_Item]) -> list[_Item]:
        todo: list[_Item] = []
        for item in items:
            with self._file_lock(item.target):
                if _present(item) or self._reuse_hf_cache(record, item):
                    continue
                if item.target.is_file():
                    actual = file_sha256(item.target)
                    if not item.url:
                        # Never delete what we cannot fetch again (an operator's own weights).
                        raise DownloadError(
                            f"{item.target} has sha256 {actual}, the reference says {item.sha256}, "
                            "and the reference gives no download for it"
                        )
                    logger.warning(
                        "model %r: %s has sha256 %s, the reference says %s; replacing it",
                        record.name,
                        item.target,
                        actual,
                        item.sha256,
                    )
                    item.target.unlink()
                    _sidecar(item.target).unlink(missing_ok=True)
            if item.url:
                todo.append(item)
            elif not item.optional:
                raise DownloadError(f"{item.target} is missing and the reference gives no download for it")
        return todo

    def _reuse_hf_cache(self, record: ModelRecord, item: _Item) -> bool:
        """Link the file from an existing Hugging Face hub cache instead of downloading it a second time;
        only a file whose sha256 matches the pinned one (when the reference gives one) is used."""
        if item.target.exists() or item.target.is_symlink():
            return False
        cached = hf_cached_file(record, item.rel, self._hf_cache_dirs)
        if cached is None:
            return False
        digest = hash_file(cached)  # no sidecar inside someone else's cache
        if item.sha256 is not None and digest != item.sha256:
            logger.warning("model %r: %s in the Hugging Face cache has sha256 %s, not the pinned %s",
                           record.name, cached, digest, item.sha256)
            return False
        item.target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(cached.resolve(), item.target)
        write_sidecar(item.target, digest)
        logger.info("model %r: %s used in place from the Hugging Face cache", record.name, cached)
        return True

    def _check_space(self, record: ModelRecord, dest_dir: Path, todo: list[_Item]) -> None:
        if not todo or not record.size_on_disk_bytes:
            return
        # Bytes already on disk (complete files and partial downloads) count against the model's size.
        have = 0
        for item in _plan(record, dest_dir):
            for path in (item.target, item.target.with_name(item.target.name + PART_SUFFIX)):
                if path.is_file():
                    have += path.stat().st_size
        self._require_space(record, dest_dir, max(0, record.size_on_disk_bytes - have))

    def _require_space(self, record: ModelRecord, where: Path, needed: int) -> None:
        free = self._disk_free(where)
        if needed > free:
            raise DownloadError(
                f"not enough disk space in {where} for {record.name!r}: need {needed / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free; free some space or choose fewer models"
            )

    def _download(self, record: ModelRecord, item: _Item) -> Path:
        scheme = urlparse(item.url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"{item.rel}: unsupported URL {item.url!r} (only http and https)")
        with self._file_lock(item.target):
            if _present(item):  # another record sharing the file fetched it meanwhile
                return item.target
            item.target.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(self._retry_attempts + 1):
                try:
                    digest, published = self._fetch_once(record, item)
                    break
                except _Retryable as exc:
                    if attempt == self._retry_attempts:
                        raise DownloadError(
                            f"{item.rel}: giving up after {attempt + 1} attempts: {exc}"
                        ) from exc
                    delay = min(_MAX_BACKOFF_S, self._backoff_s * 2**attempt)
                    delay = max(delay, min(exc.retry_after or 0.0, _MAX_BACKOFF_S))
                    logger.warning(
                        "model %r: %s failed (%s); retry %d/%d in %.1f s",
                        record.name,
                        item.rel,
                        exc,
                        attempt + 1,
                        self._retry_attempts,
                        delay,
                    )
                    self._sleep(delay)
            self._finish(record, item, digest, published)
        return item.target

    def _finish(self, record: ModelRecord, item: _Item, digest: str, published: str | None) -> None:
        """Check the download against the reference's sha256 or, where the reference has none, the one the
        hub published for the file at its pinned revision; a verified file gets its sidecar."""
        part = item.target.with_name(item.target.name + PART_SUFFIX)
        expected, source = (item.sha256, "the reference") if item.sha256 else (published, "the hub")
        if expected is not None and digest != expected:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{item.rel} from {item.url} has sha256 {digest}, {source} says {expected}; "
                "deleted the download"
            )
        if expected is not None:
            # Sidecar first: the rename keeps size and mtime, so the file is trusted the moment it appears.
            write_sidecar(item.target, digest, stat_of=part)
        os.replace(part, item.target)

    def _fetch_once(self, record: ModelRecord, item: _Item) -> tuple[str, str | None]:
        """One request: resume the .part if any, stream the rest while hashing; return the sha256 and the
        sha256 the server published for the file, if any."""
        part = item.target.with_name(item.target.name + PART_SUFFIX)
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self._http().get(item.url, headers=headers, stream=True, timeout=self._timeout)
        except requests.RequestException as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        with response:
            if response.status_code == 416 and offset:
                # The .part may already be whole (a crash before the rename); otherwise start over.
                if item.sha256 is not None and hash_file(part) == item.sha256:
                    return item.sha256, None
                part.unlink(missing_ok=True)
                raise _Retryable("server refused the resume range; restarting from zero")
            offset = self._check_response(record, item, response, part, offset)
            return self._stream(item, response, part, offset), published_sha256(response)

    def _check_response(
        self, record: ModelRecord, item: _Item, response: requests.Response, part: Path, offset: int
    ) -> int:
        """Validate the status; return the offset the body starts at (0 when the server ignored Range)."""
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}", _retry_after(response))
        if status not in (200, 206):
            raise DownloadError(f"{item.rel}: HTTP {status} from {item.url}")
        if status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        elif offset:
            logger.info(
                "model %r: server ignored the resume range for %s; downloading it whole",
                record.name,
                item.rel,
            )
            offset = 0
        remaining = response.headers.get("Content-Length")
        if remaining is not None and remaining.isdigit():
            self._require_space(record, part.parent, int(remaining))
        return offset

    def _stream(self, item: _Item, response: requests.Response, part: Path, offset: int) -> str:
        digest = hashlib.sha256()
        if offset:
            with part.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=item.target.name,
            disable=not self._progress,
            leave=False,
        )
        try:
            with part.open("ab" if offset else "wb") as fh:
                for chunk in response.iter_content(_NET_CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    if self._throttle is not None:
                        self._throttle.spend(len(chunk))
        except (requests.RequestException, ConnectionError) as exc:
            # Only network errors are retried; disk errors (OSError) propagate.
            raise _Retryable(f"interrupted at {part.stat().st_size} bytes: {exc}") from exc
        finally:
            bar.close()
        return digest.hexdigest()
