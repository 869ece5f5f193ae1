"""Shared by the daemon benchmarks: a real worker (tiny SD pipeline) against the local horde.

Execution intervals are recorded by wrapping the run slot each popped job holds in `execute_in_slot`
(instrumentation only: the job, the loop and the HTTP exchange are the real ones).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.stats import Stats
from bridge.worker import build_worker, load_reference, plan_worker
from interrogators.tiny import TINY_SAFETY_PASS, build_tiny_interrogators

REPO = Path(__file__).resolve().parents[1]

CACHE = REPO / ".bench-cache"
MODEL = "tiny-sd1"


@dataclass
class Intervals:
    spans: list[tuple[float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float) -> None:
        with self.lock:
            self.spans.append((start, end))

    def busy_fraction(self) -> float:
        """Time inside execute (union of spans) / wall from the first start to the last end."""
        spans = sorted(self.spans)
        busy, cursor = 0.0, spans[0][0]
        for start, end in spans:
            start = max(start, cursor)
            if end > start:
                busy += end - start
                cursor = end
        return busy / (spans[-1][1] - spans[0][0])


class TimedSource(GenerationSource):
    """Generation jobs whose time in a run slot (what the loop keeps busy) is recorded."""

    def __init__(self, intervals: Intervals):
        self.intervals = intervals

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            real = job.execute_in_slot

            def timed(rt, slot, real=real):
                return real(rt, _TimedSlot(slot, self.intervals))

            job.execute_in_slot = timed
        return jobs


class _TimedSlot:
    """A run slot that records how long it was held."""

    def __init__(self, slot, intervals: Intervals):
        self.slot, self.intervals, self.start = slot, intervals, 0.0

    def __enter__(self):
        entered = self.slot.__enter__()
        self.start = time.perf_counter()
        return entered

    def __exit__(self, *exc_info):
        self.intervals.add(self.start, time.perf_counter())
        return self.slot.__exit__(*exc_info)


def tiny_reference() -> Path:
    from models.tiny import build_tiny_models

    return build_tiny_models(CACHE / "tiny" / "sd")


def worker_for(horde, reference: Path, *, queue_size: int = 1, max_threads: int = 1):
    settings = {
        "horde_url": horde.base_url, "api_key": horde.api_key, "models_to_load": [MODEL],
        "dreamer": True, "alchemist": False, "force_cpu_generation": True, "queue_size": queue_size,
        "max_threads": max_threads, "cache_home": str(CACHE / "cache"), "state_dir": str(CACHE / "state"),
        "bridge_agent": "AI Horde Worker reGen:10.0.0:bench", "allow_post_processing": False,
        "allow_private_sources": True,  # the local horde is on loopback
    }
    config = build_config(settings, environ={}).config
    client = HordeClient(horde.base_url, horde.api_key, client_agent="bench:1:none",
                         retry=RetryPolicy(base_delay=0.05, max_delay=0.5))
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, [reference], upstream=False))
    build_tiny_interrogators(CACHE / "tiny")  # the generation safety pass's models
    worker = build_worker(config, plan, weights_dir=CACHE / "tiny", interrogator_models=TINY_SAFETY_PASS)
    return config, client, worker


class CountingStats(Stats):
    """Stats that signal when `expected` jobs are done: waiting on an event, not polling, so the measuring
    thread takes no GIL time from the jobs it measures."""

    def __init__(self, expected: int):
        super().__init__()
        self.expected = expected
        self.all_done = threading.Event()

    def job_finished(self, kind, description, timings) -> None:
        super().job_finished(kind, description, timings)
        if self.jobs_done >= self.expected:
            self.all_done.set()


def run_jobs(horde, client, worker, intervals: Intervals, requests: list[str], timeout: float = 900.0):
    """Serve `requests` with the real daemon; returns (wall seconds from start until the daemon has
    submitted every job, stats). Completion comes from the daemon's own stats, not from polling the
    horde: a requester polling every id would load the server the worker talks to."""
    stats = CountingStats(len(requests))
    daemon = Daemon(client=client, runtime=worker.runtime, sources=[TimedSource(intervals)],
                    journal=Journal(CACHE / "state" / f"bench-{time.time_ns()}.json"), stats=stats,
                    timings=LoopTimings(idle_poll_s=0.05))
    thread = threading.Thread(target=daemon.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    if not stats.all_done.wait(timeout):
        raise TimeoutError(f"{stats.jobs_done}/{len(requests)} jobs done after {timeout}s")
    wall = time.perf_counter() - started
    daemon.request_stop("benchmark done")
    thread.join(timeout=60)
    horde.wait_done(requests, timeout=60)  # every request really finished on the horde's side
    return wall, stats


def generation_params(size: int, steps: int) -> dict:
    return {"width": size, "height": size, "steps": steps, "sampler_name": "k_euler", "cfg_scale": 5.0,
            "seed": "7"}


class HordeProcess:
    """The local horde in its own process, as the real horde is: its request handling then takes no CPU
    time (GIL) from the worker under measurement. Requester calls go over HTTP."""

    def __init__(self, models: list[str]):
        import socket
        import subprocess
        import sys

        from local_horde import DEFAULT_API_KEY

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_key = DEFAULT_API_KEY
        self.models = models
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "local_horde", "--port", str(port), "--models", *models],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import requests

        self._http = requests.Session()
        self._http.headers["apikey"] = self.api_key
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._http.get(f"{self.base_url}/api/v2/status/heartbeat", timeout=1).ok:
                    break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> HordeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)

    def request_generation(self, params: dict, *, models: list[str], prompt: str) -> str:
        reply = self._http.post(f"{self.base_url}/api/v2/generate/async", timeout=10,
                                json={"prompt": prompt, "params": params, "models": models})
        reply.raise_for_status()
        return reply.json()["id"]

    def wait_done(self, ids: list[str], timeout: float = 60.0, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        for request_id in ids:
            while not self._http.get(f"{self.base_url}/api/v2/generate/status/{request_id}",
                                     timeout=10).json().get("done"):
                if time.monotonic() > deadline:
                    raise TimeoutError(request_id)
                time.sleep(poll)
