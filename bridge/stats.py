"""What the worker has done: per-stage timings, kudos and jobs per hour, faults by family, and per job
family its jobs, submits, kudos and how long its jobs waited for a run slot.

A submit whose answer was lost and whose retry met DuplicateGen was delivered: it counts as a submit with
its reward unknown (the reward was in the lost answer), never as a drop, and the summary says how many.

Thread-safe; the daemon records (the family is the job's `family` key), the summary logger and the
terminal status read.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field

from bridge.jobs.base import JobTimings

log = logging.getLogger(__name__)

STAGES = (
    "pop_wait", "queue_wait", "source_download", "model_load", "inference", "post_processing",
    "safety", "upload", "submit",
)


@dataclass
class FamilySnapshot:
    jobs_done: int
    submits: int
    faulted: int
    dropped: int
    reward_unknown: int  # delivered, but the answer carrying the reward was lost
    kudos: float
    wait_mean_s: float  # popped and ready -> running (the run-slot wait), over the last jobs
    wait_p95_s: float


@dataclass
class _Family:
    jobs: int = 0
    submits: int = 0
    faulted: int = 0
    dropped: int = 0
    reward_unknown: int = 0
    kudos: float = 0.0
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def snapshot(self) -> FamilySnapshot:
        waits = sorted(self.waits)
        p95 = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0
        return FamilySnapshot(self.jobs, self.submits, self.faulted, self.dropped, self.reward_unknown,
                              self.kudos, statistics.fmean(waits) if waits else 0.0, p95)


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
    features: dict[str, int] = field(default_factory=dict)  # jobs per feature (controlnet:canny, ...)
    reward_unknown: int = 0
    families: dict[str, FamilySnapshot] = field(default_factory=dict)


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
        self._features: Counter[str] = Counter()
        self._families: defaultdict[str, _Family] = defaultdict(_Family)
        self._reward_unknown = 0
        self._stages: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=200))
        self._last_job = ""
        self.in_flight = 0

    def job_finished(self, family: str, description: str, timings: JobTimings) -> None:
        with self._lock:
            self._jobs += 1
            self._last_job = description
            self._features.update(timings.features)
            self._families[family].jobs += 1
            self._families[family].waits.append(timings.queue_wait)
            for stage in STAGES:
                self._stages[stage].append(getattr(timings, stage))

    def submitted(self, family: str, state: str, reward: float | None) -> None:
        """One accepted submit; `reward` None: delivered, but the answer with the reward was lost."""
        with self._lock:
            counts = self._families[family]
            self._submissions += 1
            counts.submits += 1
            if reward is None:
                self._reward_unknown += 1
                counts.reward_unknown += 1
            else:
                self._kudos += reward
                counts.kudos += reward
            if state == "faulted":
                self._faulted += 1
                counts.faulted += 1
                self._faults_by_kind[family] += 1

    @property
    def jobs_done(self) -> int:
        """Jobs whose every submit is done (cheap: no snapshot)."""
        return self._jobs

    def dropped(self, family: str) -> None:
        with self._lock:
            self._dropped += 1
            self._families[family].dropped += 1

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
                features=dict(self._features),
                reward_unknown=self._reward_unknown,
                families={name: counts.snapshot() for name, counts in sorted(self._families.items())},
            )

    def summary_line(self) -> str:
        snap = self.snapshot()
        stages = " ".join(f"{k}={v:.2f}s" for k, v in snap.stage_means_s.items() if v)
        faults = ", ".join(f"{k}: {v}" for k, v in snap.faults_by_kind.items()) or "none"
        used = "".join(f", {k} {v}" for k, v in sorted(snap.features.items()))
        unknown = (f" ({snap.reward_unknown} delivered with reward unknown: the horde's answer was lost)"
                   if snap.reward_unknown else "")
        families = "".join(f"; {name}: {family_line(f)}" for name, f in snap.families.items())
        return (
            f"stats: {snap.jobs_done} jobs, {snap.images_done} submits, {snap.kudos:.1f} kudos{unknown} "
            f"({snap.kudos_per_hour:.0f}/h, {snap.jobs_per_hour:.0f} jobs/h), faulted {snap.faulted} "
            f"({faults}), dropped {snap.dropped}, in flight {snap.in_flight}{used}{families}; "
            f"mean {stages or 'n/a'}"
        )

    def as_dict(self) -> dict:
        return asdict(self.snapshot())


def family_line(family: FamilySnapshot) -> str:
    """One family's figures, for the summary line and the status panel."""
    unknown = f" (+{family.reward_unknown} reward unknown)" if family.reward_unknown else ""
    return (f"{family.jobs_done} jobs, {family.submits} submits, {family.kudos:.1f} kudos{unknown}, "
            f"faulted {family.faulted}, dropped {family.dropped}, slot wait mean {family.wait_mean_s:.2f}s "
            f"p95 {family.wait_p95_s:.2f}s")
