"""The LoRA/TI files on disk: downloaded once, sha256-verified, kept within `max_lora_cache_size`.

Layout: `<cache_home>/lora/loras/` and `<cache_home>/lora/embeddings/`, plus `index.json` recording every file
this worker downloaded (version, sha256, size, uses, last use). Downloads go through `models.downloads` (a
`.part` resumed with a Range header, hashed while it streams, checked against CivitAI's sha256, renamed into
place only then). When a download would pass the budget, the least recently used downloaded files go first;
files in use by a job are never evicted, and files the operator put there by hand (not in the index) are never
touched nor counted: they are served by their file name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bridge.lora.civitai import (
    FINAL_STATUSES,
    CivitaiClient,
    CivitaiError,
    LoginRequired,
    RedactTokens,
    Resolved,
    redact,
)
from models.downloads import SIDECAR_SUFFIX, Downloader, verify_file
from models.records import DownloadSpec, FileSpec, ModelRecord

logger = logging.getLogger(__name__)

GB = 1024**3
MAX_FILE_BYTES = {"lora": 400 * 1024**2, "ti": 20 * 1024**2}  # ad-hoc files larger than this are refused
FOLDERS = {"lora": "loras", "ti": "embeddings"}
FILE_SUFFIXES = (".safetensors", ".pt", ".bin")
_STATUS = re.compile(r"HTTP (\d{3})")


class _OutOfTime(Exception):
    """The job's ttl would pass before the next retry."""


@dataclass(frozen=True)
class Entry:
    kind: str
    version_id: int
    file: str
    sha256: str
    size: int
    name: str
    last_used: float
    uses: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.version_id}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "file"


def _login_guard(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    location = response.headers.get("Location", "") if response.is_redirect else ""
    if "download-auth" in location or "/login" in location or "download-auth" in response.url:
        raise LoginRequired(
            "CivitAI redirected the download to its login page (an account or token is needed)"
        )


class LoraStore:
    def __init__(
        self,
        root: Path,
        budget_bytes: int,
        civitai: CivitaiClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        retry_attempts: int = 6,
    ) -> None:
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.civitai = civitai
        self._clock = clock
        self._sleep = sleep
        self._retry_attempts = retry_attempts
        self._lock = threading.RLock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        self._index: dict[str, Entry] = self._load_index()
        logging.getLogger("models.downloads").addFilter(RedactTokens())

    # --- what is here ---------------------------------------------------------------------------------------

    def folder(self, kind: str) -> Path:
        return self.root / FOLDERS[kind]

    def writable(self) -> bool:
        try:
            for kind in FOLDERS:
                self.folder(kind).mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError:
            return False

    def entries(self) -> list[Entry]:
        """Downloaded files, least recently used first."""
        with self._lock:
            return sorted(self._index.values(), key=lambda e: e.last_used)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._index.values())

    def hand_placed(self, kind: str) -> list[Path]:
        """Files in the folder that this worker did not download (never evicted, served by file name)."""
        with self._lock:
            ours = {e.file for e in self._index.values() if e.kind == kind}
        folder = self.folder(kind)
        if not folder.is_dir():
            return []
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in FILE_SUFFIXES and p.name not in ours
        )

    def local(self, kind: str, name: str) -> Path | None:
        """A hand-placed file named like `name` (case-insensitive, with or without its extension)."""
        wanted = name.strip().lower()
        for path in self.hand_placed(kind):
            if wanted in (path.name.lower(), path.stem.lower()):
                return path
        return None

    def is_empty(self) -> bool:
        return not self._index and not any(self.hand_placed(k) for k in FOLDERS)

    def most_used(self, kind: str, count: int) -> list[Entry]:
        with self._lock:
            ours = [e for e in self._index.values() if e.kind == kind]
        return sorted(ours, key=lambda e: (-e.uses, -e.last_used))[:count]

    # --- use ------------------------------------------------------------------------------------------------

    @contextmanager
    def in_use(self, keys: list[str]) -> Iterator[None]:
        """Files a job is reading: not evicted meanwhile."""
        with self._lock:
            for key in keys:
                self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    self._in_use[key] -= 1
                    if not self._in_use[key]:
                        del self._in_use[key]

    def ensure(self, resolved: Resolved, *, deadline: float | None = None) -> Path:
        """The verified file of `resolved`, downloaded if needed. Raises CivitaiError (final or not)."""
        key = f"{resolved.kind}:{resolved.version_id}"
        limit = MAX_FILE_BYTES[resolved.kind]
        if resolved.size_bytes > limit:
            raise CivitaiError(
                f"{resolved.name!r} is {resolved.size_bytes / 1024**2:.0f} MB, over the "
                f"{limit / 1024**2:.0f} MB limit for ad-hoc downloads",
                final=True,
            )
        remembered = self.civitai.remembered("download:" + key)
        if remembered is not None:
            raise CivitaiError(f"{remembered} (remembered)", final=True, status=remembered.status)
        with self._file_lock(key):
            path = self._present(key, resolved)
            if path is None:
                path = self._download(key, resolved, deadline)
            self._touch(key)
            return path

    def touch_local(self, path: Path) -> None:
        """Hand-placed files are not tracked; nothing to record."""

    # --- internals ------------------------------------------------------------------------------------------

    @contextmanager
    def _file_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            lock = self._file_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _present(self, key: str, resolved: Resolved) -> Path | None:
        with self._lock:
            entry = self._index.get(key)
        if entry is None:
            return None
        path = self.folder(entry.kind) / entry.file
        if verify_file(path, resolved.sha256):
            return path
        logger.warning("%s %s changed or vanished on disk: downloading it again", entry.kind, path)
        self._forget(key)
        return None

    def _download(self, key: str, resolved: Resolved, deadline: float | None) -> Path:
        file = (
            f"{_safe(resolved.name)}_{resolved.version_id}{Path(resolved.file_name).suffix or '.safetensors'}"
        )
        self._make_room(resolved.size_bytes, keep=key)
        record = ModelRecord(
            name=f"{resolved.kind} {resolved.name} ({resolved.version_id})",
            files=[FileSpec(path=file, sha256sum=resolved.sha256)],
            downloads=[DownloadSpec(file_name=file, file_url=self.civitai.download_url(resolved))],
            size_on_disk_bytes=resolved.size_bytes or None,
        )
        session = requests.Session()
        session.hooks["response"] = [_login_guard]
        downloader = Downloader(
            self.root,
            session=session,
            retry_attempts=self._retry_attempts,
            progress=False,
            sleep=self._deadline_sleep(deadline),
            # A stalled transfer must not outlive the job: no read waits longer than the time left.
            timeout=30.0 if deadline is None else min(30.0, max(2.0, deadline - self._clock())),
        )
        started = time.monotonic()
        try:
            outcome = downloader.ensure(record, self.folder(resolved.kind))
        except LoginRequired as exc:
            raise self._final(key, str(exc), 401) from exc
        except _OutOfTime as exc:
            self.civitai.note_failure("download retries ran out of time")
            raise CivitaiError(
                f"download of {resolved.name!r} did not finish within the job's time", final=False
            ) from exc
        finally:
            session.close()
        if not outcome.ok:
            reason = redact(outcome.reason)  # the URL in it carries the token; this text reaches gen_metadata
            status = _STATUS.search(reason)
            code = int(status.group(1)) if status else None
            if code in FINAL_STATUSES or "sha256" in reason:
                raise self._final(key, reason, code)
            self.civitai.note_failure(reason)
            raise CivitaiError(reason, final=False, status=code)
        path = self.folder(resolved.kind) / file
        size = path.stat().st_size
        logger.info(
            "%s %r downloaded and verified (%.1f MB in %.1f s)",
            resolved.kind,
            resolved.name,
            size / 1024**2,
            time.monotonic() - started,
        )
        with self._lock:
            self._index[key] = Entry(
                resolved.kind, resolved.version_id, file, resolved.sha256, size, resolved.name, time.time(), 0
            )
        self._make_room(0, keep=key)
        return path

    def _final(self, key: str, reason: str, status: int | None) -> CivitaiError:
        error = CivitaiError(reason, final=True, status=status)
        self.civitai.remember_final("download:" + key, error)
        return error

    def _deadline_sleep(self, deadline: float | None) -> Callable[[float], None]:
        def sleep(seconds: float) -> None:
            if deadline is not None and self._clock() + seconds >= deadline:
                raise _OutOfTime()
            self._sleep(seconds)

        return sleep

    def _make_room(self, nbytes: int, *, keep: str) -> None:
        """Evict least recently used downloads (not in use, not `keep`) until `nbytes` more fit."""
        if nbytes > self.budget_bytes:
            raise CivitaiError(
                f"a file of {nbytes / 1024**2:.0f} MB does not fit max_lora_cache_size "
                f"({self.budget_bytes / GB:.1f} GB)",
                final=True,
            )
        with self._lock:
            for entry in self.entries():
                if self.used_bytes() + nbytes <= self.budget_bytes:
                    return
                if entry.key == keep or entry.key in self._in_use:
                    continue
                logger.info(
                    "LoRA cache: evicting %s %r (%.1f MB, last used %s)",
                    entry.kind,
                    entry.name,
                    entry.size / 1024**2,
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
                )
                path = self.folder(entry.kind) / entry.file
                path.unlink(missing_ok=True)
                path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)
                self._forget(entry.key)
            if self.used_bytes() + nbytes > self.budget_bytes:
                logger.warning("LoRA cache over max_lora_cache_size: the rest is in use")

    def _touch(self, key: str) -> None:
        with self._lock:
            entry = self._index.get(key)
            if entry is not None:
                self._index[key] = Entry(
                    **{**entry.__dict__, "last_used": time.time(), "uses": entry.uses + 1}
                )
                self._save_index()

    def _forget(self, key: str) -> None:
        with self._lock:
            if self._index.pop(key, None) is not None:
                self._save_index()

    def _load_index(self) -> dict[str, Entry]:
        try:
            data = json.loads((self.root / "index.json").read_text(encoding="utf-8"))
            entries = [Entry(**row) for row in data.get("files", [])]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("LoRA cache index unreadable (%s): starting a new one", exc)
            return {}
        return {e.key: e for e in entries if (self.folder(e.kind) / e.file).is_file()}

    def _save_index(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / "index.json.tmp"
            tmp.write_text(
                json.dumps({"files": [e.__dict__ for e in self._index.values()]}, indent=1), encoding="utf-8"
            )
            os.replace(tmp, self.root / "index.json")
        except OSError as exc:
            logger.warning("could not write the LoRA cache index: %s", exc)
