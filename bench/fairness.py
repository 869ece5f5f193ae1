"""bench/fairness: alchemy forms served while the generation queue stays full, and what it costs generation.

Through the local horde (its own process, as the real one is remote): one worker serving both families with
the default shares, max_threads 1 and queue_size 1, on a real tiny SD pipeline (512x512, 16 steps: a few
seconds a job on this CPU) and the tiny caption and nsfw interrogators. A requester keeps several generation
requests waiting at the horde at all times and asks for a form every few seconds (caption and nsfw in turn).
Side by side in one run, alternating in rounds: the same worker generating alone (its generation source
only) and serving both families, for the same total time each.

Figures: a form's wait is from its request (the moment it could be popped) to its submit; the longest gap
between two alchemy pops while generations were queued; generation throughput (images a minute, from the
first to the last submit of a segment) serving both families against generating alone.
Target: form wait p95 <= 30 s; generation throughput >= 0.85 of the generation-only run.

Run from the repository root: .venv/bin/python -m bench.fairness [--minutes 5]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import threading
import time
from dataclasses import dataclass, field

from bench.harness import CACHE, MODEL, HordeProcess, generation_params, tiny_reference
from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.demo import TINY_INTERROGATORS, sample_image
from bridge.families import GENERATION
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.stats import Stats
from bridge.worker import build_worker, load_reference, plan_worker

SIZE, STEPS = 512, 16  # about 3 s a job on this 2-core CPU
QUEUED_AHEAD = 4  # generation requests kept waiting at the horde beyond what the worker holds
FORM_EVERY_S = 3.0
FORMS = ("caption", "nsfw")
ROUNDS = 2


@dataclass
class Record:
    """What the instrumented sources saw (the jobs, the loop and the HTTP exchange are the real ones)."""

    generations_done: list[float] = field(default_factory=list)
    alchemy_pops: list[float] = field(default_factory=list)
    forms_done: dict[int, float] = field(default_factory=dict)  # tag -> when its ok submit went out
    forms_faulted: dict[int, float] = field(default_factory=dict)  # a faulted form is not served
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, where: list[float] | dict[int, float], key: int | None = None) -> None:
        with self.lock:
            if isinstance(where, dict):
                where[key] = time.monotonic()
            else:
                where.append(time.monotonic())


class CountedGeneration(GenerationSource):
    def __init__(self, record: Record) -> None:
        self.record = record

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            send = job.send

            def counted(client, submission, send=send):
                reward = send(client, submission)
                self.record.note(self.record.generations_done)
                return reward

            job.send = counted
        return jobs


class CountedAlchemy(AlchemySource):
    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record = record

    def pop(self, client, runtime, capacity):
        self.record.note(self.record.alchemy_pops)
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            send, tag = job.send, int(job.payload.get("bench_form", -1))

            def counted(client, submission, send=send, tag=tag):
                reward = send(client, submission)
                served = submission.state != "faulted"
                self.record.note(self.record.forms_done if served else self.record.forms_faulted, tag)
                return reward

            job.send = counted
        return jobs


class FairnessHorde(HordeProcess):
    def request_form(self, form: str, source_b64: str, tag: int) -> str:
        body = {"source_image": source_b64, "forms": [{"name": form, "payload": {"bench_form": tag}}]}
        reply = self._http.post(f"{self.base_url}/api/v2/interrogate/async", json=body, timeout=10)
        reply.raise_for_status()
        return reply.json()["id"]


def build(horde: FairnessHorde):
    from interrogators.tiny import build_tiny_interrogators

    reference = tiny_reference()
    build_tiny_interrogators(CACHE / "tiny")
    settings = {
        "horde_url": horde.base_url, "api_key": horde.api_key, "models_to_load": [MODEL],
        "dreamer": True, "alchemist": True, "force_cpu_generation": True, "forms": list(FORMS),
        "max_threads": 1, "queue_size": 1, "cache_home": str(CACHE / "cache"),
        "state_dir": str(CACHE / "state"), "bridge_agent": "AI Horde Worker reGen:10.0.0:bench",
        "alchemist_name": "bench-alchemist", "allow_post_processing": False,
        "allow_private_sources": True,  # the local horde serves the source images on loopback
    }
    config = build_config(settings, environ={}).config
    client = HordeClient(horde.base_url, horde.api_key, client_agent="bench:1:none",
                         retry=RetryPolicy(base_delay=0.05, max_delay=0.5))
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, [reference], upstream=False))
    worker = build_worker(config, plan, weights_dir=CACHE / "tiny", interrogator_models=TINY_INTERROGATORS)
    return client, worker


@dataclass
class Segment:
    both: bool
    seconds: float
    record: Record
    form_waits: list[float]
    forms_asked: int
    summary: str

    def throughput_per_min(self) -> float:
        done = sorted(self.record.generations_done)
        return 60 * (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0

    def longest_alchemy_gap(self) -> float:
        pops = sorted(self.record.alchemy_pops)
        return max((b - a for a, b in zip(pops, pops[1:], strict=False)), default=float("inf"))


def run_segment(horde: FairnessHorde, client, worker, *, both: bool, seconds: float,
                first_tag: int) -> Segment:
    """Serve for `seconds` with the generation queue kept full (and a form every FORM_EVERY_S if `both`)."""
    record = Record()
    stats = Stats()
    sources = [CountedGeneration(record)] + ([CountedAlchemy(record)] if both else [])
    daemon = Daemon(client=client, runtime=worker.runtime, sources=sources,
                    journal=Journal(CACHE / "state" / f"fairness-{time.time_ns()}.json"), stats=stats,
                    timings=LoopTimings())
    loop = threading.Thread(target=daemon.run, daemon=True)
    source = base64.b64encode(_webp()).decode()
    params = generation_params(SIZE, STEPS)
    asked: dict[int, float] = {}
    requested = 0
    started = time.monotonic()
    loop.start()
    next_form = started + 1.0
    while (now := time.monotonic()) < started + seconds:
        while requested - jobs_done(stats, GENERATION) < QUEUED_AHEAD + 2:
            horde.request_generation(params, models=[MODEL], prompt=f"a lighthouse {requested}")
            requested += 1
        if both and now >= next_form and now < started + seconds - FORM_EVERY_S:
            tag = first_tag + len(asked)
            horde.request_form(FORMS[tag % len(FORMS)], source, tag)
            asked[tag] = time.monotonic()
            next_form += FORM_EVERY_S
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while both and len(record.forms_done) + len(record.forms_faulted) < len(asked) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    daemon.request_stop("segment done")
    loop.join(timeout=120)
    waits = [record.forms_done[tag] - asked[tag] for tag in asked if tag in record.forms_done]
    return Segment(both, seconds, record, waits, len(asked), stats.summary_line())


def jobs_done(stats: Stats, family: str) -> int:
    snap = stats.snapshot().families.get(family)
    return snap.jobs_done if snap else 0


def _webp() -> bytes:
    buffer = io.BytesIO()
    sample_image(256).save(buffer, format="WEBP", quality=90)
    return buffer.getvalue()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)] if ordered else float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness")
    parser.add_argument("--minutes", type=float, default=5.0, help="serving both families, in total")
    args = parser.parse_args(argv)
    per_round = args.minutes * 60 / ROUNDS
    with FairnessHorde([MODEL]) as horde:
        client, worker = build(horde)
        run_segment(horde, client, worker, both=True, seconds=40, first_tag=10_000)  # warm-up: loads
        alone: list[Segment] = []
        both: list[Segment] = []
        for index in range(ROUNDS):
            alone.append(run_segment(horde, client, worker, both=False, seconds=per_round, first_tag=0))
            both.append(run_segment(horde, client, worker, both=True, seconds=per_round,
                                    first_tag=1000 * (index + 1)))
    waits = [w for s in both for w in s.form_waits]
    asked = sum(s.forms_asked for s in both)
    alone_rate = statistics.fmean(s.throughput_per_min() for s in alone)
    both_rate = statistics.fmean(s.throughput_per_min() for s in both)
    print(f"{ROUNDS} rounds of {per_round:.0f} s generating alone, then {per_round:.0f} s serving both "
          f"families; {SIZE}x{SIZE}, {STEPS} steps; a form every {FORM_EVERY_S:.0f} s ({', '.join(FORMS)}); "
          f"max_threads 1, queue_size 1, default family_shares")
    for segment in [*alone, *both]:
        label = "both " if segment.both else "alone"
        print(f"  {label}: {segment.throughput_per_min():.2f} images/min; {segment.summary}")
    print(f"forms served {len(waits)}/{asked}; wait mean {statistics.fmean(waits):.2f} s, "
          f"max {max(waits):.2f} s")
    print(f"longest gap between alchemy pops {max(s.longest_alchemy_gap() for s in both):.2f} s")
    print(f"generation throughput {both_rate:.2f} images/min serving both vs {alone_rate:.2f} alone: "
          f"ratio {both_rate / alone_rate:.3f} (target >= 0.85)")
    # A form not served (faulted, or no submit) waits for ever: it counts, so it cannot flatter the figure.
    print(f"fairness form_wait_p95_s {p95(waits + [float('inf')] * (asked - len(waits))):.2f} (target <= 30)")


if __name__ == "__main__":
    main()
