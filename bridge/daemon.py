"""The one poll / prepare / execute / send loop, for every job kind.

Each popped job gets a daemon thread that prepares it at once (source downloads overlap with the jobs
running now), waits for one of `max_threads` run slots, executes, and hands its submissions to the sender
threads so the next job starts at once. Popping stops when `max_threads + queue_size` jobs are waiting or
running. Every popped id ends in exactly one submit or a logged drop: the journal arbitrates.

Shutdown: the first request_stop() (SIGINT/SIGTERM) stops popping and lets everything in flight finish and
submit (warm); the second faults every unsubmitted id back to the horde and returns (cold).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.api_models import GenerationSubmit, InterrogationSubmit
from bridge.errors import HordeError, MaintenanceError, Policy, WorkerStopError
from bridge.horde_api import HordeClient
from bridge.jobs.base import Job, JobSource, Submission
from bridge.journal import ALCHEMY, GENERATION, Journal
from bridge.runtime import Runtime
from bridge.stats import Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopTimings:
    """The loop's waits, in one place (no scattered sleeps)."""

    idle_poll_s: float = 1.0  # after an empty pop
    error_poll_s: float = 5.0  # after a failed pop (the client already retried)
    maintenance_poll_s: float = 5.0
    fault_streak: int = 5  # consecutive faulted jobs that pause popping
    fault_pause_s: float = 60.0
    sender_threads: int = 4
    cold_fault_timeout_s: float = 10.0


def family_of(job: Job) -> str:
    return GENERATION if job.kind == "generation" else ALCHEMY


class Daemon:
    def __init__(
        self,
        *,
        client: HordeClient,
        runtime: Runtime,
        sources: Sequence[JobSource],
        journal: Journal,
        stats: Stats | None = None,
        timings: LoopTimings = LoopTimings(),
    ):
        self.client = client
        self.runtime = runtime
        self.sources = list(sources)
        self.journal = journal
        self.stats = stats or Stats()
        self.timings = timings
        config = runtime.config
        self._capacity = config.max_threads + config.queue_size
        self._run_slots = threading.BoundedSemaphore(config.max_threads)
        self._wake = threading.Event()  # interrupts every wait of the loop
        self._state = threading.Condition()
        self._waiting = 0  # popped, not yet executed
        self._unsent: dict[int, int] = {}  # id(job) -> submissions not yet sent
        self._outbox: queue.Queue[tuple[Job, Submission] | None] = queue.Queue()
        self._stop_requests = 0
        self._fault_streak = 0
        self._paused_until = 0.0
        self._maintenance_warned = False
        self.stop_reason: str | None = None

    # ---- control ------------------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_requests > 0

    @property
    def cold(self) -> bool:
        return self._stop_requests > 1

    def request_stop(self, reason: str = "signal") -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            log.warning("warm shutdown (%s): no more pops; finishing %d job(s) in flight. "
                        "Stop again to hand them back to the horde now.", reason, self._waiting)
        else:
            log.warning("cold shutdown: faulting every unsubmitted job back to the horde")
            # A retry backoff in progress ends now; from here each call gets one attempt.
            self.client.retry.cancel.set()
        self._wake.set()
        with self._state:
            self._state.notify_all()

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code (0, or 2 when the horde refused us)."""
        self._fault_back_leftovers()
        senders = [threading.Thread(target=self._sender, name=f"sender-{i}", daemon=True)
                   for i in range(self.timings.sender_threads)]
        for thread in senders:
            thread.start()
        while not self.stopping:
            paused_for = self._paused_until - time.monotonic()
            if paused_for > 0:
                self._wait(paused_for)
                continue
            free = self._free_capacity()
            if free <= 0:
                self._wait_for_capacity()
                continue
            popped = self._pop_round(free)
            if not popped and not self.stopping:
                self._wait(self.timings.idle_poll_s)
        self._drain()
        for _ in senders:
            self._outbox.put(None)
        if not self.cold:
            for thread in senders:
                thread.join()
        return 2 if self.stop_reason else 0

    def _pop_round(self, free: int) -> int:
        popped = 0
        for source in self.sources:
            if self.stopping or free - popped <= 0 or not source.ready(self.runtime):
                continue
            try:
                asked = time.monotonic()
                jobs = source.pop(self.client, self.runtime, free - popped)
                for job in jobs:
                    job.timings.pop_wait = time.monotonic() - asked
            except MaintenanceError as err:
                self._on_maintenance(err)
                continue
            except WorkerStopError as err:
                self.stop_reason = str(err)
                log.error("the horde refused this worker: %s. Stopping.", err)
                self.request_stop("refused by the horde")
                self.request_stop("refused by the horde")
                return popped
            except HordeError as err:
                log.warning("%s pop failed: %s; trying again in %.0f s", source.name, err,
                            self.timings.error_poll_s)
                self._wait(self.timings.error_poll_s)
                continue
            except Exception:  # a bug in a source must not kill the daemon
                log.exception("%s pop raised; trying again in %.0f s", source.name, self.timings.error_poll_s)
                self._wait(self.timings.error_poll_s)
                continue
            self._maintenance_warned = False
            for job in jobs:
                self._start(job)
            popped += len(jobs)
        return popped

    def _start(self, job: Job) -> None:
        self.journal.add(job.ids, family_of(job))
        with self._state:
            self._waiting += 1
            self.stats.in_flight = self._waiting
        log.info("popped %s", job.describe())
        thread = threading.Thread(target=self._process, args=(job,), name=f"job-{job.ids[0][:8]}",
                                  daemon=True)
        thread.start()

    # ---- one job ------------------------------------------------------------------------------------------

    def _process(self, job: Job) -> None:
        try:
            submissions = self._prepare_and_execute(job)
        finally:
            with self._state:
                self._waiting -= 1
                self.stats.in_flight = self._waiting
                self._state.notify_all()
            self._wake.set()
        self._note_outcome(job, submissions)
        with self._state:
            self._unsent[id(job)] = len(submissions)
        for submission in submissions:
            self._outbox.put((job, submission))

    def _prepare_and_execute(self, job: Job) -> list[Submission]:
        try:
            started = time.monotonic()
            job.prepare(self.runtime)
            job.timings.source_download = time.monotonic() - started
            slot = _RunSlot(self._run_slots, job, lambda: self.cold)
            submissions = job.execute_in_slot(self.runtime, slot)
            job.timings.inference = time.monotonic() - slot.entered - job.timings.model_load \
                - job.timings.post_processing - job.timings.safety
            return self._one_per_id(job, submissions)
        except _ShutDown:
            return job.fault("the worker shut down before this job ran")
        except Exception as err:  # any failure of a job is that job's fault, never the daemon's
            log.exception("%s failed: %s", job.describe(), err)
            return self._safe_fault(job, f"{type(err).__name__}: {err}"[:250])

    def _safe_fault(self, job: Job, reason: str) -> list[Submission]:
        """job.fault(), or, if even that is broken, hand the ids back without the job object."""
        try:
            return job.fault(reason)
        except Exception:
            log.exception("%s could not build its faulted submissions: faulting its ids directly",
                          job.describe())
            for job_id in job.ids:
                if self.journal.claim(job_id):
                    try:
                        fault_orphan(self.client, job_id, family_of(job), reason)
                    except HordeError as err:
                        log.warning("could not fault %s back (%s)", job_id[:8], err)
                    self.journal.finish(job_id)
            return []

    def _one_per_id(self, job: Job, submissions: list[Submission]) -> list[Submission]:
        by_id = {s.job_id: s for s in submissions}
        if sorted(by_id) == sorted(job.ids) and len(submissions) == len(job.ids):
            return submissions
        log.error("%s returned submissions for %s, expected %s: faulting it", job.describe(),
                  sorted(by_id), sorted(job.ids))
        return self._safe_fault(job, "internal error: the job did not produce one result per id")

    def _note_outcome(self, job: Job, submissions: list[Submission]) -> None:
        if submissions and all(s.state == "faulted" for s in submissions):
            self._fault_streak += 1
            if self._fault_streak >= self.timings.fault_streak:
                log.error("%d jobs in a row faulted: pausing pops for %.0f s (check the log above)",
                          self._fault_streak, self.timings.fault_pause_s)
                self._fault_streak = 0
                self._paused_until = time.monotonic() + self.timings.fault_pause_s
        else:
            self._fault_streak = 0

    # ---- sending ------------------------------------------------------------------------------------------

    def _sender(self) -> None:
        while (item := self._outbox.get()) is not None:
            job, submission = item
            if self.journal.claim(submission.job_id):
                self._send(job, submission)

    def _send(self, job: Job, submission: Submission) -> None:
        started = time.monotonic()
        try:
            reward = job.send(self.client, submission)
            self.stats.submitted(job.kind, submission.state, reward)
            log.info("submitted %s %s: %s, %.2f kudos", job.kind, submission.job_id[:8], submission.state,
                     reward)
        except HordeError as err:
            if err.policy is Policy.FAULT and submission.state != "faulted":
                log.warning("submit of %s refused (%s): submitting it as faulted", submission.job_id[:8], err)
                self._send(job, job.fault(f"submit refused: {err}"[:250])[job.ids.index(submission.job_id)])
                return
            self.stats.dropped(job.kind)
            log.warning("dropped %s %s: %s", job.kind, submission.job_id[:8], err)
        except Exception:
            self.stats.dropped(job.kind)
            log.exception("dropped %s %s: sending raised", job.kind, submission.job_id[:8])
        job.timings.submit += time.monotonic() - started
        self.journal.finish(submission.job_id)
        with self._state:
            self._unsent[id(job)] -= 1
            finished = self._unsent[id(job)] == 0
            if finished:
                del self._unsent[id(job)]
        if finished:
            self.stats.job_finished(job.kind, job.describe(), job.timings)

    # ---- shutdown and recovery ----------------------------------------------------------------------------

    def _drain(self) -> None:
        while not self.cold:
            with self._state:
                if self._waiting == 0:
                    break
                self._state.wait(0.5)
        if self.cold:
            self._fault_unclaimed("the worker was stopped")

    def _fault_back_leftovers(self) -> None:
        leftovers = {i: str(e.get("family", GENERATION)) for i, e in self.journal.leftovers.items()}
        if not leftovers:
            return
        log.warning("%d job(s) were in flight when the worker last died: faulting them back to the horde",
                    len(leftovers))
        for job_id, family in leftovers.items():
            self.journal.add([job_id], family)
        self.journal.forget_leftovers()
        self._fault_unclaimed("the worker crashed while running this job")

    def _fault_unclaimed(self, reason: str) -> None:
        for job_id, family in self.journal.unclaimed().items():
            if not self.journal.claim(job_id):
                continue
            try:
                fault_orphan(self.client, job_id, family, reason)
                log.info("faulted %s back to the horde", job_id[:8])
            except HordeError as err:
                log.warning("could not fault %s back (%s): the horde will requeue it after its ttl",
                            job_id[:8], err)
            self.journal.finish(job_id)

    # ---- waits --------------------------------------------------------------------------------------------

    def _free_capacity(self) -> int:
        with self._state:
            return self._capacity - self._waiting

    def _wait_for_capacity(self) -> None:
        with self._state:
            self._state.wait_for(lambda: self._waiting < self._capacity or self.stopping, timeout=1.0)

    def _wait(self, seconds: float) -> None:
        self._wake.clear()
        self._wake.wait(seconds)

    def _on_maintenance(self, err: MaintenanceError) -> None:
        if not self._maintenance_warned:
            log.warning("this worker is in maintenance mode: no jobs are offered (%s). Clear it on the "
                        "horde's worker page or with remove_maintenance_on_init: true.", err)
            self._maintenance_warned = True
        self._wait(self.timings.maintenance_poll_s)


class _ShutDown(Exception):
    """A cold shutdown came while the job waited for its run slot."""


class _RunSlot:
    """One of the `max_threads` run slots, entered by the job (`Job.execute_in_slot`) for the steps that
    need it."""

    def __init__(self, slots: threading.BoundedSemaphore, job: Job, cold: Callable[[], bool]) -> None:
        self._slots, self._job, self._cold = slots, job, cold
        self.entered = time.monotonic()

    def __enter__(self) -> _RunSlot:
        queued = time.monotonic()
        self._slots.acquire()
        self.entered = time.monotonic()
        self._job.timings.queue_wait = self.entered - queued
        if self._cold():
            self._slots.release()
            raise _ShutDown
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._slots.release()


def fault_orphan(client: HordeClient, job_id: str, family: str, reason: str) -> float:
    """Hand an id back to the horde without its Job object (crash recovery, cold shutdown)."""
    if family == GENERATION:
        return client.submit_generation(GenerationSubmit(
            id=job_id, generation="faulted", state="faulted", seed=0,
            gen_metadata=[{"type": "information", "value": "see_ref", "ref": reason[:255]}]))
    return client.submit_interrogation(InterrogationSubmit(id=job_id, result={}, state="faulted"))


def install_signal_handlers(daemon: Daemon, signal_module=None) -> Callable[[], None]:
    """First SIGINT/SIGTERM: warm shutdown; second: cold. Returns a function restoring the old handlers."""
    import signal as default_signal

    sig = signal_module or default_signal
    previous = {s: sig.getsignal(s) for s in (sig.SIGINT, sig.SIGTERM)}
    for signum in previous:
        sig.signal(signum, lambda num, _frame: daemon.request_stop(sig.Signals(num).name))

    def restore() -> None:
        for signum, handler in previous.items():
            sig.signal(signum, handler)

    return restore
