"""The one poll / prepare / execute / send loop, for every job kind.

Each popped job gets a daemon thread that prepares it at once (source downloads overlap with the jobs
running now), waits for a run slot on its device lane, executes, and hands its submissions to the sender
threads so the next job starts at once. Popping stops when `max_threads + queue_size` jobs are waiting or
running; jobs still downloading count only beyond as many again, so slow source hosts cannot stop the
popping. The job families (generation, alchemy) share the slots and those places by their `family_shares`:
every family that is on is popped each round, an idle family lends its share, and a family that comes back
pops its own share at once (briefly going over the limit by what it lent) (bridge/scheduling.py). The loop
knows a family only as the key its sources and jobs declare. A job settled without running (its payload
unreadable, its form not served, its source unfetchable) needs no slot; one whose ttl ran out while it
waited does not take one, and one whose ttl runs out while it runs stops at its next check point
(`Job.interrupt`, models.interrupt: a denoising step, an image, a pass, a tile) and is faulted, its slot
free at once. Every popped id ends in exactly one submit or a logged drop: the journal
arbitrates, and keeps finished results until they are sent.

Shutdown: the first request_stop() (SIGINT/SIGTERM) stops popping and lets everything in flight finish and
submit (warm); the second faults every unsubmitted id back to the horde and returns (cold).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from bridge.api_models import GenerationSubmit, InterrogationSubmit
from bridge.config import family_weights
from bridge.errors import HordeError, MaintenanceError, Policy, WorkerStopError, already_delivered
from bridge.horde_api import HordeClient
from bridge.jobs.base import Job, JobSource, Placement, Submission
from bridge.journal import GENERATION, Journal
from bridge.resend import resend_saved
from bridge.runtime import Runtime
from bridge.scheduling import DeviceLanes, Devices, RunSlots, family_quotas, pop_capacity
from bridge.stats import Stats
from models.heap import long_lived_heap
from models.interrupt import Interrupted

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
    slow_download_s: float = 2.0  # a source download this old stops holding popping back


def family_of(job: Job) -> str:
    return job.family


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
        devices: Devices | None = None,
    ):
        self.client = client
        self.runtime = runtime
        self.sources = list(sources)
        self.journal = journal
        self.stats = stats or Stats()
        self.timings = timings
        config = runtime.config
        self._capacity = config.max_threads + config.queue_size
        weights = family_weights(config)
        self._quotas = family_quotas(weights, (s.family for s in self.sources), self._capacity)
        self._slots = RunSlots(config.max_threads, weights, devices or DeviceLanes.of(runtime))
        self._wake = threading.Event()  # interrupts every wait of the loop
        self._state = threading.Condition()
        self._waiting = 0  # popped, its submissions not yet queued for sending (a warm shutdown waits)
        # per family: popped, not yet executed: the places of max_threads + queue_size that popping fills
        self._in_flight: Counter[str] = Counter()
        self._found_work: dict[str, bool] = {}  # family -> whether its last pop brought jobs
        self._rounds = 0
        # id(job) -> (its family, when its prepare (source download) began)
        self._downloads: dict[int, tuple[str, float]] = {}
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
        self._slots.interrupt()

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code (0, or 2 when the horde refused us)."""
        with long_lived_heap():  # no full GC pass over the libraries and models built before the loop
            return self._serve()

    def _serve(self) -> int:
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
            if not self._any_capacity():
                self._wait_for_capacity()
                continue
            popped = self._pop_round()
            if not popped and not self.stopping:
                self._wait(self.timings.idle_poll_s)
        self._drain()
        for _ in senders:
            self._outbox.put(None)
        if not self.cold:
            for thread in senders:
                thread.join()
        return 2 if self.stop_reason else 0

    def _pop_round(self) -> int:
        """One pop per ready source with room, each round starting with the next source: no family waits
        for another's pops."""
        popped = 0
        self._rounds += 1
        turn = self._rounds % max(1, len(self.sources))
        for source in self.sources[turn:] + self.sources[:turn]:
            free = self._pop_capacity(source.family)
            if self.stopping or free <= 0 or not self._ready(source):
                continue
            try:
                asked = time.monotonic()
                jobs = source.pop(self.client, self.runtime, free)
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
            self._found_work[source.family] = bool(jobs)
            for job in jobs:
                self._start(job)
            popped += len(jobs)
        return popped

    def _ready(self, source: JobSource) -> bool:
        if source.ready(self.runtime):
            return True
        self._found_work[source.family] = False  # nothing it could serve: its places are free to lend
        return False

    def _start(self, job: Job) -> None:
        self.journal.add(job.ids, job.family)
        with self._state:
            self._waiting += 1
            self._in_flight[job.family] += 1
            self.stats.in_flight = self._waiting
        log.info("popped %s", job.describe())
        thread = threading.Thread(target=self._process, args=(job,), name=f"job-{job.ids[0][:8]}",
                                  daemon=True)
        thread.start()

    # ---- one job ------------------------------------------------------------------------------------------

    def _process(self, job: Job) -> None:
        try:
            try:
                submissions = self._prepare_and_execute(job)
            finally:
                self._free_place(job)
            self._note_outcome(job, submissions)
            self._keep_for_restart(job, submissions)
            with self._state:
                self._unsent[id(job)] = len(submissions)
            # Queued before the job stops counting as waiting: a warm shutdown drains the outbox only once
            # nothing waits, and must not end the senders ahead of these.
            for submission in submissions:
                self._outbox.put((job, submission))
        finally:
            with self._state:
                self._waiting -= 1
                self.stats.in_flight = self._waiting
                self._state.notify_all()
            self._wake.set()

    def _free_place(self, job: Job) -> None:
        """A job that has run holds no place any more: its replacement is popped (and its source fetched)
        while this one's result is saved and queued, not after (that write is the slowest step left)."""
        with self._state:
            self._in_flight[job.family] -= 1
            self._state.notify_all()
        self._wake.set()

    def _prepare_and_execute(self, job: Job) -> list[Submission]:
        try:
            started = time.monotonic()
            with self._downloading(job):
                job.prepare(self.runtime)
            job.timings.source_download = time.monotonic() - started
            settled = job.settled()
            if settled is not None:  # handed back unrun: no run slot needed
                return self._one_per_id(job, settled)
            held = self._slots.run(job.family, self._placement(job), stop=lambda: self.cold)
            slot = _RunSlot(held, job, lambda: self.cold)
            submissions = job.execute_in_slot(self.runtime, slot)
            job.timings.inference = time.monotonic() - slot.entered - job.timings.model_load \
                - job.timings.post_processing - job.timings.safety
            return self._one_per_id(job, submissions)
        except _ShutDown:
            return job.fault("the worker shut down before this job ran")
        except _Expired:  # the horde has given it to someone else: don't spend the slot
            log.warning("%s: its ttl ran out while it waited for a run slot; not run", job.describe())
            return job.fault("the job's ttl ran out while it waited for a run slot")
        except Interrupted as stop:  # the same, found while it ran: its slot was released as it unwound
            log.warning("%s interrupted: %s; run slot released, faulting it back", job.describe(),
                        stop.reason)
            return self._safe_fault(job, stop.reason)
        except Exception as err:  # any failure of a job is that job's fault, never the daemon's
            log.exception("%s failed: %s", job.describe(), err)
            return self._safe_fault(job, f"{type(err).__name__}: {err}"[:250])

    def _placement(self, job: Job) -> Placement:
        try:
            return job.placement(self.runtime)
        except Exception:  # a wrong estimate must not cost the job: it just runs in a slot
            log.exception("%s: placement failed; it waits for a slot on the worker's device", job.describe())
            return Placement()

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
                        fault_orphan(self.client, job_id, job.family, reason)
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
        if job.rejected:
            return  # what the horde or a requester sent, not a failure of this worker: no pause for it
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
            self.stats.submitted(job.family, submission.state, reward)
            log.info("submitted %s %s: %s, %.2f kudos", job.kind, submission.job_id[:8], submission.state,
                     reward)
        except HordeError as err:
            if already_delivered(err):
                # A faulted submit earns nothing; any other's reward was in the answer that was lost.
                reward = 0.0 if submission.state == "faulted" else None
                self.stats.submitted(job.family, submission.state, reward)
                log.info("submitted %s %s: %s; the horde's answer was lost and the retry met %s, so the "
                         "horde has it: delivered, reward unknown", job.kind, submission.job_id[:8],
                         submission.state, err.rc)
            elif err.policy is Policy.FAULT and submission.state != "faulted":
                log.warning("submit of %s refused (%s): submitting it as faulted", submission.job_id[:8], err)
                self._send(job, job.fault(f"submit refused: {err}"[:250])[job.ids.index(submission.job_id)])
                return
            else:
                self.stats.dropped(job.family)
                why = " (retried until the job's ttl ran out)" if err.policy is Policy.RETRY else ""
                log.warning("dropped %s %s: %s%s", job.kind, submission.job_id[:8], err, why)
        except Exception:
            self.stats.dropped(job.family)
            log.exception("dropped %s %s: sending raised", job.kind, submission.job_id[:8])
        job.timings.submit += time.monotonic() - started
        self.journal.finish(submission.job_id)
        with self._state:
            self._unsent[id(job)] -= 1
            finished = self._unsent[id(job)] == 0
            if finished:
                del self._unsent[id(job)]
        if finished:
            self.stats.job_finished(job.family, job.describe(), job.timings)

    # ---- shutdown and recovery ----------------------------------------------------------------------------

    def _drain(self) -> None:
        while not self.cold:
            with self._state:
                if self._waiting == 0:
                    break
                self._state.wait(0.5)
        if self.cold:
            self._fault_unclaimed("the worker was stopped")

    def _keep_for_restart(self, job: Job, submissions: list[Submission]) -> None:
        """Finished results are saved until sent: a restart within their ttl sends them (bridge.resend)."""
        deadline = job.deadline
        if deadline is None:
            return
        expires_at = time.time() + deadline - time.monotonic()
        for submission in submissions:
            if submission.state != "faulted":
                record = submission.to_record()
                self.journal.keep_result(submission.job_id, family_of(job), expires_at, record)

    def _fault_back_leftovers(self) -> None:
        leftovers = {i: str(e.get("family", GENERATION)) for i, e in self.journal.leftovers.items()}
        if not leftovers:
            resend_saved(self.client, self.journal, self.stats, fault_orphan_with(self.client))  # strays
            return
        log.warning("%d job(s) were in flight when the worker last died: sending the results that were "
                    "finished, faulting the rest back to the horde", len(leftovers))
        for job_id, family in leftovers.items():
            self.journal.add([job_id], family)
        self.journal.forget_leftovers()
        resend_saved(self.client, self.journal, self.stats, fault_orphan_with(self.client))
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

    def _occupied(self) -> Counter[str]:
        """Jobs per family that hold popping back: those waiting or running, less slow downloads (at most as
        many again in all): a source host that takes its time must not stop the worker from popping."""
        now = time.monotonic()
        occupied = Counter(self._in_flight)
        allowance = self._capacity
        for family, began in self._downloads.values():
            if allowance and now - began >= self.timings.slow_download_s:
                occupied[family] -= 1
                allowance -= 1
        return occupied

    @contextlib.contextmanager
    def _downloading(self, job: Job) -> Iterator[None]:
        with self._state:
            self._downloads[id(job)] = (job.family, time.monotonic())
        try:
            yield
        finally:
            with self._state:
                del self._downloads[id(job)]

    def _pop_capacity(self, family: str) -> int:
        with self._state:
            busy = {f: self._in_flight[f] > 0 or self._found_work.get(f, False) for f in self._quotas}
            return pop_capacity(family, quotas=self._quotas, in_flight=self._occupied(), busy=busy,
                                places=self._capacity)

    def _any_capacity(self) -> bool:
        return any(self._pop_capacity(source.family) > 0 for source in self.sources)

    def _wait_for_capacity(self) -> None:
        with self._state:
            self._state.wait_for(lambda: self._any_capacity() or self.stopping, timeout=1.0)

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


class _Expired(Exception):
    """The job's ttl ran out while it waited for its run slot."""


class _RunSlot:
    """A run slot on the job's device lane (`RunSlots.run`), entered by the job (`Job.execute_in_slot`) for
    the steps that need it."""

    def __init__(self, held: AbstractContextManager[bool], job: Job, cold: Callable[[], bool]) -> None:
        self._held, self._job, self._cold = held, job, cold
        self.entered = time.monotonic()

    def __enter__(self) -> _RunSlot:
        queued = time.monotonic()
        self._held.__enter__()
        self.entered = time.monotonic()
        self._job.timings.queue_wait = self.entered - queued
        for refused, error in ((self._cold(), _ShutDown), (self._job.expired(), _Expired)):
            if refused:
                self._held.__exit__(None, None, None)
                raise error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._held.__exit__(*exc_info)


def fault_orphan(client: HordeClient, job_id: str, family: str, reason: str) -> float:
    """Hand an id back to the horde without its Job object (crash recovery, cold shutdown)."""
    if family == GENERATION:
        return client.submit_generation(GenerationSubmit(
            id=job_id, generation="faulted", state="faulted", seed=0,
            gen_metadata=[{"type": "information", "value": "see_ref", "ref": reason[:255]}]))
    return client.submit_interrogation(InterrogationSubmit(id=job_id, result={}, state="faulted"))


def fault_orphan_with(client: HordeClient) -> Callable[[str, str, str], float]:
    return lambda job_id, family, reason: fault_orphan(client, job_id, family, reason)


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
