"""dynamic_models: follow the horde's queue.

Every `interval_s` the worker asks the horde which models have the most queued work, and downloads and
serves up to `number_of_dynamic_models` of them beyond its configured list (the legacy worker's rule).
Downloads run in this thread, never in the job loop; a model is advertised only once its files verify.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from bridge.errors import HordeError

log = logging.getLogger(__name__)


class DynamicModels:
    def __init__(self, *, client: Any, manager: Any, reference: Any, downloader: Any, cache_home: Path,
                 number: int, interval_s: float = 600.0):
        self.client = client
        self.manager = manager
        self.reference = reference
        self.downloader = downloader
        self.cache_home = Path(cache_home)
        self.number = number
        self.interval_s = interval_s
        self.added: list[str] = []
        self._said_unservable: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dynamic-models", daemon=True)

    def refresh_once(self) -> list[str]:
        """Add the most-queued models this worker lacks, up to the limit; returns the names added now."""
        from models.downloads import model_dir
        from models.reference import dynamic_models

        room = self.number - len(self.added)
        if room <= 0:
            return []
        try:
            queue = self.client.model_status()
        except HordeError as err:
            log.warning("dynamic_models: could not read the horde's model queue (%s)", err)
            return []
        known = [r.name for r in self.reference.servable_models()]
        self._say_unservable(queue, known)
        added = []
        for name in dynamic_models(queue, self.manager.models, room, known=known):
            record = self.reference.get(name)
            outcome = self.downloader.ensure(record, model_dir(self.cache_home, record))
            if not outcome.ok:
                log.warning("dynamic_models: %s not added: %s", name, outcome.reason)
            elif self.manager.add_model(name):
                log.info("dynamic_models: now serving %s (queued on the horde)", name)
                added.append(name)
        self.added += added
        return added

    def _say_unservable(self, queue: list, known: list[str]) -> None:
        """Queued models of baselines this worker cannot run (Flux, Cascade): never chosen, said once each."""
        servable = {name.lower() for name in known}
        generation = {r.name.lower(): r for r in self.reference.generation_models()}
        new = []
        for entry in queue:
            name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
            record = generation.get(name.lower())
            if record is not None and name.lower() not in servable and name not in self._said_unservable:
                self._said_unservable.add(name)
                new.append(f"{name} ({record.baseline})")
        if new:
            log.info("dynamic_models: queued but of baselines this worker cannot run, never chosen: %s",
                     ", ".join(new))

    def __enter__(self) -> DynamicModels:
        if self.number > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh_once()
            self._stop.wait(self.interval_s)
