"""In-flight job ids on disk, so that a killed worker hands its jobs back at the next start.

Every popped id is written here before any work starts and removed once its one submit is done (or the
horde dropped it). The file is replaced atomically (write, fsync, rename): a kill -9 at any moment leaves
either the old or the new list, never a torn one. The journal is also the single arbiter of "who submits
this id": `claim` succeeds once per id, so a cold shutdown and a job finishing at the same moment never
submit twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from bridge.families import ALCHEMY, GENERATION

__all__ = ["ALCHEMY", "GENERATION", "Journal"]

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
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

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self._entries, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def add(self, ids: list[str], family: str) -> None:
        with self._lock:
            for job_id in ids:
                self._entries[job_id] = {"family": family, "since": time.time()}
            self._write()

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
            if self._entries.pop(job_id, None) is not None:
                self._write()

    def unclaimed(self) -> dict[str, str]:
        """id -> family of every in-flight id nobody has claimed yet."""
        with self._lock:
            return {i: str(e["family"]) for i, e in self._entries.items() if i not in self._claimed}

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def forget_leftovers(self) -> None:
        self.leftovers = {}
