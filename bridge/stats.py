"""What the worker has done: per-stage timings, kudos and jobs per hour, faults by kind.

Thread-safe; the daemon records, the summary logger and the terminal status read.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass

from bridge.jobs.base import JobTimings

log = logging.getLogger(__name__)

STAGES = (
    "pop_wait", "queue_wait", "source_download", "model_load", "inference", "post_processing",
    "safety", "upload", "submit",
)


@dataclass
class Snapshot:
    uptime_s: float
    jobs_done: int
    images_done: int
    faulted: int
    dropped: int
    kudos: float
    kudos_per_hour: float
    jobs_per_hour: float
    faults_by_kind: dict[str, int]
    stage_means_s: dict[str, float]
    in_flight: int
    last_job: str


class Stats:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._jobs = 0
        self._submissions = 0
        self._faulted = 0
        self._dropped = 0
        self._kudos = 0.0
        self._faults_by_kind: Counter[str] = Counter()
        self._stages: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=200))
        self._last_job = ""
        self.in_flight = 0

    def job_finished(self, kind: str, description: str, timings: JobTimings) -> None:
        with self._lock:
            self._jobs += 1
            self._last_job = description
            for stage in STAGES:
                self._stages[stage].append(getattr(timings, stage))

    def submitted(self, kind: str, state: str, reward: float) -> None:
        with self._lock:
            self._submissions += 1
            self._kudos += reward
            if state == "faulted":
                self._faulted += 1
                self._faults_by_kind[kind] += 1

    @property
    def jobs_done(self) -> int:
        """Jobs whose every submit is done (cheap: no snapshot)."""
        return self._jobs

    def dropped(self, kind: str) -> None:
        with self._lock:
            self._dropped += 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            uptime = max(self._clock() - self._started, 1e-9)
            hours = uptime / 3600
            means = {s: statistics.fmean(v) if v else 0.0 for s, v in self._stages.items()}
            return Snapshot(
                uptime_s=uptime,
                jobs_done=self._jobs,
                images_done=self._submissions,
                faulted=self._faulted,
                dropped=self._dropped,
                kudos=self._kudos,
                kudos_per_hour=self._kudos / hours,
                jobs_per_hour=self._jobs / hours,
                faults_by_kind=dict(self._faults_by_kind),
                stage_means_s={s: means.get(s, 0.0) for s in STAGES},
                in_flight=self.in_flight,
                last_job=self._last_job,
            )

    def summary_line(self) -> str:
        snap = self.snapshot()
        stages = " ".join(f"{k}={v:.2f}s" for k, v in snap.stage_means_s.items() if v)
        faults = ", ".join(f"{k}: {v}" for k, v in snap.faults_by_kind.items()) or "none"
        return (
            f"stats: {snap.jobs_done} jobs, {snap.images_done} submits, {snap.kudos:.1f} kudos "
            f"({snap.kudos_per_hour:.0f}/h, {snap.jobs_per_hour:.0f} jobs/h), faulted {snap.faulted} "
            f"({faults}), dropped {snap.dropped}, in flight {snap.in_flight}; mean {stages or 'n/a'}"
        )

    def as_dict(self) -> dict:
        return asdict(self.snapshot())
