"""The daemon loop against the local horde over real HTTP, with real alchemy jobs on tiny models.

Exactly-once is asserted from the local horde's own accounting: every id it handed out ends in one accepted
submit, or a drop/requeue the horde itself recorded.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from bridge.stats import Stats
from local_horde import DEFAULT_API_KEY, FaultKind, LocalHorde
from models.device import DevicePolicy
from tests.interrogators.helpers import cpu_cache, tiny_models_dir, tiny_set

REPO = Path(__file__).resolve().parents[2]
FAST = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05, maintenance_poll_s=0.05, fault_pause_s=0.2)


def webp(color: str = "purple") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, format="WEBP")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def interrogators(tmp_path_factory):
    return tiny_set(tiny_models_dir(tmp_path_factory), cpu_cache(), forms=("nsfw", "caption"))


@pytest.fixture
def horde():
    with LocalHorde() as local:
        yield local


def make_runtime(interrogators, **overrides) -> Runtime:
    settings = {
        "alchemist_name": "daemon-test-alchemist",
        "forms": ["nsfw", "caption"],
        "max_threads": 2,
        "queue_size": 2,
        **overrides,
    }
    config = build_config(settings, environ={}).config
    return Runtime(
        config=config,
        device=DevicePolicy.cpu(),
        fetcher=SourceFetcher(timeout=2.0, allow_private=True),  # the local horde is on loopback
        interrogators=interrogators,
    )


def make_client(horde: LocalHorde, key: str = DEFAULT_API_KEY) -> HordeClient:
    retry = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, max_retry_after=0.1)
    return HordeClient(
        horde.base_url, key, client_agent="test:1:none", retry=retry, timeout=2.0, upload_timeout=2.0
    )


class GatedSource(AlchemySource):
    """The real alchemy source; each job's execute waits on `gate` (test instrumentation only)."""

    def __init__(self, gate: threading.Event, started: threading.Event):
        super().__init__()
        self.gate, self.started = gate, started

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            real = job.execute

            def gated(rt, real=real):
                self.started.set()
                self.gate.wait(30)
                return real(rt)

            job.execute = gated
        return jobs


def run_in_thread(daemon: Daemon) -> threading.Thread:
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return thread


def start_daemon(horde, interrogators, tmp_path, *, source=None, runtime=None, timings=FAST):
    daemon = Daemon(
        client=make_client(horde),
        runtime=runtime or make_runtime(interrogators),
        sources=[source or AlchemySource()],
        journal=Journal(tmp_path / "inflight.json"),
        stats=Stats(),
        timings=timings,
    )
    return daemon, run_in_thread(daemon)


def stop(daemon: Daemon, thread: threading.Thread) -> None:
    daemon.request_stop("test")
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_serves_forms_end_to_end_and_never_logs_the_key(horde, interrogators, tmp_path, caplog):
    url = horde.host_image(webp(), "cat.webp")
    ids = [horde.request_interrogation(url, ["nsfw", "caption"]) for _ in range(3)]
    with caplog.at_level(logging.DEBUG):
        daemon, thread = start_daemon(horde, interrogators, tmp_path)
        statuses = horde.wait_done(ids, timeout=60)
        stop(daemon, thread)
    for status in statuses.values():
        results = {f["form"]: f["result"] for f in status["forms"]}
        assert isinstance(results["nsfw"]["nsfw"], bool)
        assert isinstance(results["caption"]["caption"], str)
    books = horde.accounting()
    assert len(books.handed_out) == 6
    assert all(len(horde.submits(i)) == 1 for i in books.handed_out)
    assert daemon.stats.snapshot().images_done == 6
    assert DEFAULT_API_KEY not in caplog.text
    assert not (tmp_path / "inflight.json").exists() or Journal(tmp_path / "inflight.json").leftovers == {}


def test_a_lost_submit_answer_met_by_duplicate_counts_as_delivered(horde, interrogators, tmp_path, caplog):
    url = horde.host_image(webp(), "lost.webp")
    request_id = horde.request_interrogation(url, ["nsfw"])
    horde.faults.drop("*/interrogate/submit", count=1, after=True)  # accepted; the answer never arrives
    with caplog.at_level(logging.INFO, logger="bridge.daemon"):
        daemon, thread = start_daemon(horde, interrogators, tmp_path)
        horde.wait_done([request_id], timeout=30)
        deadline = time.monotonic() + 10
        while daemon.stats.jobs_done < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop(daemon, thread)
    job_id = horde.accounting().handed_out[0]
    assert [s["state"] for s in horde.submits(job_id)] == ["ok", "ok"]  # the retry met DuplicateGen
    assert horde.accounting().rewards[job_id] == 1.0  # the horde paid the first, lost, answer
    snap = daemon.stats.snapshot()
    assert (snap.images_done, snap.dropped, snap.reward_unknown, snap.kudos) == (1, 0, 1, 0.0)
    assert snap.families["alchemy"].reward_unknown == 1 and snap.families["alchemy"].submits == 1
    assert "1 delivered with reward unknown" in daemon.stats.summary_line()
    assert "delivered, reward unknown" in caplog.text and "dropped alchemy" not in caplog.text


def test_200_jobs_with_25_percent_faults_lose_nothing(horde, interrogators, tmp_path):
    good = horde.host_image(webp(), "good.webp")
    broken = horde.host_image(b"this is not an image", "broken.webp")
    ids = [horde.request_interrogation(broken if i % 8 == 0 else good, ["nsfw"]) for i in range(200)]
    faults = horde.faults
    faults.http_error("*/interrogate/submit", 503, probability=0.08, count=None)
    faults.drop("*/interrogate/submit", probability=0.05, count=None, after=True)
    faults.http_error("*/interrogate/pop", 500, probability=0.05, count=None)
    faults.rate_limit("*/interrogate/pop", retry_after=0.05, probability=0.03, count=None)
    faults.malformed("*/interrogate/pop", probability=0.02, count=None, after=False)
    daemon, thread = start_daemon(
        horde,
        interrogators,
        tmp_path,
        timings=LoopTimings(idle_poll_s=0.02, error_poll_s=0.02, fault_streak=1000),
    )
    statuses = horde.wait_done(ids, timeout=240, poll=0.1)
    stop(daemon, thread)
    books = horde.accounting()
    assert books.unfinished() == []
    for job_id in books.handed_out:
        submits = horde.submits(job_id)
        assert submits, f"{job_id} was never submitted"
    states = [f["state"] for s in statuses.values() for f in s["forms"]]
    assert states.count("done") >= 150
    # The broken sources were handed back faulted, with the horde requeueing them until it gave up.
    assert any(reason == "faulted" for _, reason in books.requeues)


def test_warm_shutdown_finishes_and_submits_in_flight_jobs(horde, interrogators, tmp_path):
    url = horde.host_image(webp(), "warm.webp")
    request_id = horde.request_interrogation(url, ["nsfw"])
    gate, started = threading.Event(), threading.Event()
    daemon, thread = start_daemon(horde, interrogators, tmp_path, source=GatedSource(gate, started))
    assert started.wait(20)
    daemon.request_stop("first signal")
    time.sleep(0.2)
    assert thread.is_alive(), "warm shutdown must wait for the job in flight"
    gate.set()
    thread.join(timeout=30)
    status = horde.wait_done([request_id], timeout=10)[request_id]
    assert status["forms"][0]["state"] == "done"
    assert len(horde.accounting().handed_out) == 1


def test_cold_shutdown_faults_in_flight_jobs_back_once(horde, interrogators, tmp_path):
    url = horde.host_image(webp(), "cold.webp")
    horde.request_interrogation(url, ["nsfw"])
    gate, started = threading.Event(), threading.Event()
    daemon, thread = start_daemon(horde, interrogators, tmp_path, source=GatedSource(gate, started))
    assert started.wait(20)
    job_id = horde.accounting().handed_out[0]
    daemon.request_stop("first")
    daemon.request_stop("second")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert [s["state"] for s in horde.submits(job_id)] == ["faulted"]
    gate.set()  # the job finishes after the cold stop: its result must not be submitted again
    time.sleep(0.5)
    assert len(horde.submits(job_id)) == 1


class TailSource(AlchemySource):
    """The real alchemy source; each job's `execute_in_slot` keeps a last step outside its run slot that
    waits on `release`, as a generation's safety pass does (test instrumentation only)."""

    def __init__(self, release: threading.Event):
        super().__init__()
        self.release = release
        self.in_slot: list[str] = []
        self.in_tail: list[str] = []

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:

            def in_slot(rt, slot, job=job):
                with slot:
                    self.in_slot.append(job.ids[0])
                    submissions = job.execute(rt)
                self.in_tail.append(job.ids[0])
                self.release.wait(30)
                return submissions

            job.execute_in_slot = in_slot
        return jobs


def test_a_job_leaving_its_run_slot_early_lets_the_next_one_start(horde, interrogators, tmp_path):
    url = horde.host_image(webp(), "tail.webp")
    ids = [horde.request_interrogation(url, ["nsfw"]) for _ in range(2)]
    release = threading.Event()
    source = TailSource(release)
    runtime = make_runtime(interrogators, max_threads=1, queue_size=1)
    daemon, thread = start_daemon(horde, interrogators, tmp_path, source=source, runtime=runtime)
    deadline = time.monotonic() + 30
    while len(source.in_slot) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    # One run slot, and the first job has not finished (its tail waits): the second ran in the slot anyway.
    assert len(source.in_slot) == 2 and not release.is_set()
    assert source.in_tail[0] == source.in_slot[0]
    release.set()
    statuses = horde.wait_done(ids, timeout=30)
    stop(daemon, thread)
    assert all(s["forms"][0]["state"] == "done" for s in statuses.values())
    assert all(len(horde.submits(i)) == 1 for i in horde.accounting().handed_out)


class SlowSavingJournal(Journal):
    """A journal whose first kept result waits on `release` (a slow disk; test instrumentation only)."""

    def __init__(self, path: Path, release: threading.Event):
        super().__init__(path)
        self.release, self.saving = release, threading.Event()

    def keep_result(self, job_id, family, expires_at, submission) -> None:
        if not self.saving.is_set():
            self.saving.set()
            self.release.wait(30)
        super().keep_result(job_id, family, expires_at, submission)


def test_a_job_that_has_run_frees_its_place_before_its_result_is_saved(horde, interrogators, tmp_path):
    url = horde.host_image(webp(), "place.webp")
    ids = [horde.request_interrogation(url, ["nsfw"]) for _ in range(2)]
    release = threading.Event()
    journal = SlowSavingJournal(tmp_path / "inflight.json", release)
    # One place in all (one slot, no queue): the second form can only be popped once the first has run.
    runtime = make_runtime(interrogators, max_threads=1, queue_size=0)
    daemon = Daemon(client=make_client(horde), runtime=runtime, sources=[AlchemySource()], journal=journal,
                    stats=Stats(), timings=FAST)
    thread = run_in_thread(daemon)
    assert journal.saving.wait(30)
    deadline = time.monotonic() + 20
    while len(horde.accounting().handed_out) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    # The first form's result is still being saved, and its replacement was popped all the same.
    assert len(horde.accounting().handed_out) == 2 and not release.is_set()
    release.set()
    statuses = horde.wait_done(ids, timeout=30)
    stop(daemon, thread)
    assert all(s["forms"][0]["state"] == "done" for s in statuses.values())
    assert all(len(horde.submits(i)) == 1 for i in horde.accounting().handed_out)


def test_the_loop_freezes_the_heap_it_starts_with_and_thaws_it_when_it_ends(horde, interrogators, tmp_path):
    import gc

    before = gc.get_freeze_count()  # CPython 3.12.1 starts with a few hundred of its own objects frozen
    daemon, thread = start_daemon(horde, interrogators, tmp_path)
    deadline = time.monotonic() + 10
    while gc.get_freeze_count() <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.get_freeze_count() > before + 1000
    stop(daemon, thread)
    assert gc.get_freeze_count() <= before


def test_exception_inside_a_job_faults_it_and_the_daemon_keeps_serving(
    horde, interrogators, tmp_path, caplog
):
    url = horde.host_image(webp(), "boom.webp")
    first = horde.request_interrogation(url, ["nsfw"])

    class Exploding(AlchemySource):
        exploded = False

        def pop(self, client, runtime, capacity):
            jobs = super().pop(client, runtime, capacity)
            for job in jobs:
                if not Exploding.exploded:
                    Exploding.exploded = True
                    job.execute = lambda rt: (_ for _ in ()).throw(RuntimeError("kaboom"))
            return jobs

    daemon, thread = start_daemon(horde, interrogators, tmp_path, source=Exploding())
    time.sleep(0.3)
    second = horde.request_interrogation(url, ["nsfw"])
    horde.wait_done([second], timeout=30)
    stop(daemon, thread)
    first_id = horde.accounting().handed_out[0]
    assert horde.submits(first_id)[0]["state"] == "faulted"
    assert "kaboom" in caplog.text
    assert horde.interrogation_status(second)["forms"][0]["state"] == "done"
    assert horde.interrogation_status(first)["forms"][0]["state"] in ("done", "processing", "waiting")


class FailingSource(AlchemySource):
    """The real alchemy source; every job then fails on this worker (a broken model, say)."""

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            job.execute = lambda rt: (_ for _ in ()).throw(RuntimeError("the model broke"))
        return jobs


def test_fault_streak_pauses_popping(horde, interrogators, tmp_path, caplog):
    url = horde.host_image(webp(), "streak.webp")
    for _ in range(4):
        horde.request_interrogation(url, ["nsfw"])
    timings = LoopTimings(idle_poll_s=0.02, error_poll_s=0.02, fault_streak=3, fault_pause_s=0.5)
    daemon, thread = start_daemon(
        horde,
        interrogators,
        tmp_path,
        source=FailingSource(),
        timings=timings,
        runtime=make_runtime(interrogators, max_threads=1, queue_size=0),
    )
    deadline = time.monotonic() + 30
    while "jobs in a row faulted: pausing pops" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    stop(daemon, thread)
    assert "jobs in a row faulted: pausing pops" in caplog.text


def test_anonymous_key_stops_the_daemon_with_a_clear_reason(horde, interrogators, tmp_path):
    daemon = Daemon(
        client=make_client(horde, "0000000000"),
        runtime=make_runtime(interrogators),
        sources=[AlchemySource()],
        journal=Journal(tmp_path / "j.json"),
        timings=FAST,
    )
    thread = run_in_thread(daemon)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert daemon.stop_reason and "anonymous" in daemon.stop_reason.lower()


def test_maintenance_is_reported_once_and_polling_continues(horde, interrogators, tmp_path, caplog):
    daemon, thread = start_daemon(horde, interrogators, tmp_path)
    deadline = time.monotonic() + 10
    while not horde.worker_details("daemon-test-alchemist") and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_id = horde.worker_details("daemon-test-alchemist")["id"]
    make_client(horde).set_maintenance(worker_id, True)
    deadline = time.monotonic() + 10
    while "maintenance mode" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    stop(daemon, thread)
    assert caplog.text.count("this worker is in maintenance mode") == 1


def test_journal_recovery_after_kill_9(horde, interrogators, tmp_path):
    """A worker process is killed mid-job; the next start faults the journaled id back at once, and sends the
    result it had finished but not submitted (that job's ttl still runs)."""
    url = horde.host_image(webp(), "slow.webp")
    horde.faults.hang("/r2/hosted/slow.webp", 60, count=1)  # the source download never ends
    horde.request_interrogation(url, ["nsfw"])
    finished = horde.request_interrogation(horde.host_image(webp(), "done.webp"), ["nsfw"])
    horde.faults.hang("*/interrogate/submit", 120, count=1)  # its submit is never answered
    models_dir = tiny_models_dir_path(interrogators)
    script = _killable_worker(horde, models_dir, tmp_path / "inflight.json")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        deadline = time.monotonic() + 90
        while len(horde.faults.fired(FaultKind.HANG)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(horde.faults.fired(FaultKind.HANG)) == 2, "the worker process never got that far"
        assert list(Journal(tmp_path / "inflight.json").results_dir.iterdir()), "the result was not kept"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    job_id, done_id = horde.accounting().handed_out
    assert horde.submits(job_id) == horde.submits(done_id) == []
    daemon = Daemon(
        client=make_client(horde),
        runtime=make_runtime(interrogators, forms=["nsfw"]),
        sources=[],
        journal=Journal(tmp_path / "inflight.json"),
        timings=FAST,
    )
    thread = run_in_thread(daemon)
    deadline = time.monotonic() + 10
    while not (horde.submits(job_id) and horde.submits(done_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop(daemon, thread)
    assert [s["state"] for s in horde.submits(job_id)] == ["faulted"]
    (resent,) = horde.submits(done_id)
    assert resent["state"] == "ok" and isinstance(resent["result"]["nsfw"], bool)
    assert horde.interrogation_status(finished)["forms"][0]["state"] == "done"
    assert Journal(tmp_path / "inflight.json").leftovers == {}


def _killable_worker(horde, models_dir: Path, journal: Path) -> str:
    """A worker process serving nsfw forms from the tiny models, with its journal at `journal`."""
    return f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.journal import Journal
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from models.device import DevicePolicy
from tests.interrogators.helpers import cpu_cache, tiny_set
interrogators = tiny_set(Path({str(models_dir)!r}), cpu_cache(), forms=("nsfw",))
config = build_config({{"alchemist_name": "daemon-test-alchemist", "forms": ["nsfw"]}}, environ={{}}).config
runtime = Runtime(config=config, device=DevicePolicy.cpu(),
                  fetcher=SourceFetcher(timeout=120, allow_private=True), interrogators=interrogators)
client = HordeClient({horde.base_url!r}, {DEFAULT_API_KEY!r}, client_agent="t:1:n")
Daemon(client=client, runtime=runtime, sources=[AlchemySource()],
       journal=Journal(Path({str(journal)!r})),
       timings=LoopTimings(idle_poll_s=0.05)).run()
"""


def tiny_models_dir_path(interrogators) -> Path:
    """The folder the session's tiny interrogators were built in (their CLIP's model folder)."""
    return Path(interrogators.safety.embedder.folder).parents[1]


def test_a_job_whose_fault_path_is_broken_is_still_handed_back(horde, interrogators, tmp_path):
    url = horde.host_image(webp(), "double.webp")
    horde.request_interrogation(url, ["nsfw"])

    class DoublyBroken(AlchemySource):
        def pop(self, client, runtime, capacity):
            jobs = super().pop(client, runtime, capacity)
            for job in jobs:
                job.execute = lambda rt: (_ for _ in ()).throw(RuntimeError("execute broke"))
                job.fault = lambda reason: (_ for _ in ()).throw(RuntimeError("fault broke too"))
            return jobs

    daemon, thread = start_daemon(horde, interrogators, tmp_path, source=DoublyBroken())
    deadline = time.monotonic() + 20
    while not horde.accounting().handed_out and time.monotonic() < deadline:
        time.sleep(0.05)
    job_id = horde.accounting().handed_out[0]
    while not horde.submits(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop(daemon, thread)
    assert [s["state"] for s in horde.submits(job_id)] == ["faulted"]
