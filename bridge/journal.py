"""In-flight job ids on disk, so that a killed worker hands its jobs back at the next start.

Every popped id is written here before any work starts and removed once its one submit is done (or the
horde dropped it). The file is replaced atomically (write, fsync, rename): a kill -9 at any moment leaves
either the old or the new list, never a torn one. The write happens outside the lock that guards the ids:
`claim` never waits for a disk, and a write that finds a later one already on disk (which holds its
change) is skipped, so concurrent adds and finishes share one fsync. The journal is also the single arbiter
of "who submits this id": `claim` succeeds once per id, so a cold shutdown and a job finishing at the same
moment never submit twice.

A finished result that is not submitted yet is kept beside it (`<journal>-results/`, one file per id, named
by a hash: ids come from the server and must not choose file names), with the wall-clock time its ttl ends:
a worker restarted within that time sends the result instead of faulting the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from bridge.families import ALCHEMY, GENERATION

__all__ = ["ALCHEMY", "GENERATION", "Journal"]

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer of the file at a time, in version order
        self._version = 0  # of self._entries, raised by every change
        self._written = 0  # the version on disk
        self._entries: dict[str, dict[str, object]] = {}
        self._claimed: set[str] = set()
        self.leftovers: dict[str, dict[str, object]] = self._read()

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("journal %s unreadable (%s): starting with an empty one", self.path, err)
            return {}
        return {str(k): dict(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _changed(self) -> int:
        """Called with self._lock held after a change of self._entries: its version, for `_persist`."""
        self._version += 1
        return self._version

    def _persist(self, version: int) -> None:
        """Return once the file holds `version` of the entries or a later one (called without self._lock)."""
        with self._write_lock:
            with self._lock:
                if self._written >= version:
                    return  # a later write, which holds this change too, is already on disk
                version, snapshot = self._version, dict(self._entries)
            _write_atomic(self.path, snapshot)
            self._written = version

    # ---- results not sent yet ------------------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        return self.path.with_name(self.path.stem + "-results")

    def _result_path(self, job_id: str) -> Path:
        digest = hashlib.sha256(job_id.encode("utf-8", "replace")).hexdigest()[:32]
        return self.results_dir / f"{digest}.json"

    def keep_result(self, job_id: str, family: str, expires_at: float, submission: dict[str, Any]) -> None:
        """Save an unsent result (a Submission record) until `expires_at` (time.time()). Best effort: a full
        disk must not cost the result its first submit."""
        record = {"job_id": job_id, "family": family, "expires_at": expires_at, "submission": submission}
        try:
            _write_atomic(self._result_path(job_id), record)
        except OSError as err:
            log.warning("could not keep the result of %s for a restart: %s", job_id[:8], err)

    def saved_results(self) -> dict[str, dict[str, Any]]:
        """id -> saved record, as found on disk (read at start, before anything new is kept)."""
        found: dict[str, dict[str, Any]] = {}
        for path in sorted(self.results_dir.glob("*.json")) if self.results_dir.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                found[str(record["job_id"])] = record
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("saved result %s unreadable (%s): removed", path.name, err)
                path.unlink(missing_ok=True)
        return found

    def forget_result(self, job_id: str) -> None:
        self._result_path(job_id).unlink(missing_ok=True)

    def add(self, ids: list[str], family: str) -> None:
        """Returns once the ids are on disk."""
        with self._lock:
            for job_id in ids:
                self._entries[job_id] = {"family": family, "since": time.time()}
            version = self._changed()
        self._persist(version)

    def claim(self, job_id: str) -> bool:
        """True exactly once per id: the caller is the one that submits it."""
        with self._lock:
            if job_id in self._claimed or job_id not in self._entries:
                return False
            self._claimed.add(job_id)
            return True

    def finish(self, job_id: str) -> None:
        with self._lock:
            # A finished id can never be claimed again (claim needs an entry), so its claim can go too:
            # a long-running daemon must not keep every id it ever served.
            self._claimed.discard(job_id)
            version = self._changed() if self._entries.pop(job_id, None) is not None else None
        if version is not None:
            self._persist(version)
        self.forget_result(job_id)

    def unclaimed(self) -> dict[str, str]:
        """id -> family of every in-flight id nobody has claimed yet."""
        with self._lock:
            return {i: str(e["family"]) for i, e in self._entries.items() if i not in self._claimed}

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def forget_leftovers(self) -> None:
        self.leftovers = {}


def _write_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a kill at any moment leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
