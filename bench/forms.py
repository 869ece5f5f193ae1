"""bench/forms: the weightless alchemy forms (vectorize, palette, describe) through the daemon vs bare.

Per form, on a 1024x1024 photo-like image (smooth gradients, flat shapes, fine noise; sent as a webp), side by
side in one run, alternating: (a) bare: what the form costs without the worker, N times in a row: decode the
webp the horde sends, then the library call the form makes (`bridge.jobs.weightless`); (b) daemon: N
requests for that form served end to end by the real daemon (pop, source download and decode, compute,
submit) from the local horde running in its own process, as the real horde is remote. The worker runs
max_threads 1 and queue_size 2, a CPU alchemist's settings: the next sources download and decode while a
form computes. Jobs per minute of each; target: daemon seconds per job / bare seconds per job <= 1.10 for
every form. Also printed: the library call alone (the image already decoded) and the daemon against it;
for palette and describe the decode of the 1024² webp is a large part of the job (bare minus call). And
the worker process's CPU seconds per job (all its threads) over the bare side's: what the worker adds in
work, whatever the machine's other load (the wall-clock ratio hides part of it while a second core is free,
since the next sources download and decode while a form computes).

Like with like: both sides run in this one process, with the worker's libraries imported, and with the heap
that exists before the measuring frozen as the daemon loop freezes it (models/heap.py): a full GC pass over
those objects (~0.3 s) would otherwise land on whichever side happens to trigger it. The machine may be
shared with other work: each round pairs one bare run with one daemon run back to back, and the ratio
reported per form is the median of those paired ratios (the ratio of the medians is printed beside it).

Run from the repository root: .venv/bin/python -m bench.forms
"""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time

import numpy as np
from PIL import Image

from bench.harness import CACHE, CountingStats, HordeProcess
from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.jobs.weightless import COMPUTE
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from models.device import DevicePolicy
from models.heap import long_lived_heap

SIZE = 1024
JOBS = {"vectorize": 2, "palette": 24, "describe": 48}
ROUNDS = 5


def photo_like(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A stand-in for a photograph: smooth light and colour gradients, flat objects, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([200 * x + 30, 160 * y + 40, 120 * (1 - x * y) + 60], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.15)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


class FormsHorde(HordeProcess):
    def request_interrogation(self, form: str, source_b64: str) -> str:
        reply = self._http.post(f"{self.base_url}/api/v2/interrogate/async", timeout=30,
                                json={"forms": [{"name": form}], "source_image": source_b64})  # fmt: skip
        reply.raise_for_status()
        return reply.json()["id"]

    def form_states(self, ids: list[str]) -> list[str]:
        return [self._http.get(f"{self.base_url}/api/v2/interrogate/status/{i}", timeout=10).json()["state"]
                for i in ids]  # fmt: skip


def runtime_for(horde: FormsHorde, form: str) -> Runtime:
    settings = {"horde_url": horde.base_url, "api_key": horde.api_key, "alchemist_name": f"bench-{form}",
                "forms": [form], "max_threads": 1, "queue_size": 2,
                "allow_private_sources": True}  # fmt: skip  # the local horde is on loopback
    config = build_config(settings, environ={}).config
    fetcher = SourceFetcher(timeout=30, allow_private=config.allow_private_sources)
    return Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher)


def bare_round(form: str, webp: bytes) -> tuple[float, float, float]:
    """(seconds per job decoding + computing, of the library call alone, CPU seconds per job)."""
    compute = COMPUTE[form]
    call = 0.0
    cpu, started = time.process_time(), time.perf_counter()
    for _ in range(JOBS[form]):
        image = Image.open(io.BytesIO(webp))
        image.load()
        called = time.perf_counter()
        compute(image)
        call += time.perf_counter() - called
    jobs = JOBS[form]
    return (time.perf_counter() - started) / jobs, call / jobs, (time.process_time() - cpu) / jobs


def daemon_round(
    horde: FormsHorde, form: str, source_b64: str, count: int | None = None
) -> tuple[float, float]:
    """(seconds per job, the worker process's CPU seconds per job: every thread of it, no requester call)."""
    count = count or JOBS[form]
    ids = [horde.request_interrogation(form, source_b64) for _ in range(count)]
    client = HordeClient(horde.base_url, horde.api_key, client_agent="bench:1:none",
                         retry=RetryPolicy(base_delay=0.05, max_delay=0.5))  # fmt: skip
    stats = CountingStats(count)
    daemon = Daemon(client=client, runtime=runtime_for(horde, form), sources=[AlchemySource()],
                    journal=Journal(CACHE / "state" / f"forms-{time.time_ns()}.json"), stats=stats,
                    timings=LoopTimings(idle_poll_s=0.05))  # fmt: skip
    thread = threading.Thread(target=daemon.run, daemon=True)
    cpu, started = time.process_time(), time.perf_counter()
    thread.start()
    if not stats.all_done.wait(900):
        raise TimeoutError(f"{form}: {stats.jobs_done}/{count} done")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    daemon.request_stop("benchmark done")
    thread.join(timeout=60)
    client.close()
    states = horde.form_states(ids)
    if states != ["done"] * count:
        raise RuntimeError(f"{form}: forms not all done: {states}")
    return wall / count, cpu / count


def main() -> None:
    with long_lived_heap():
        measure()


def measure() -> None:
    buffer = io.BytesIO()
    photo_like().save(buffer, format="WEBP", quality=90)
    webp = buffer.getvalue()
    source_b64 = base64.b64encode(webp).decode()
    ratios = {}
    with FormsHorde(["stable_diffusion"]) as horde:
        for form in JOBS:
            daemon_round(horde, form, source_b64, count=1)  # warm-up: imports, first-call costs
            bare, calls, daemon, cpu = [], [], [], []
            for _ in range(ROUNDS):
                whole, call, bare_cpu = bare_round(form, webp)
                bare.append(whole)
                calls.append(call)
                seconds, daemon_cpu = daemon_round(horde, form, source_b64)
                daemon.append(seconds)
                cpu.append(daemon_cpu / bare_cpu)
            bare_s, call_s, daemon_s = (statistics.median(v) for v in (bare, calls, daemon))
            ratios[form] = statistics.median(d / b for d, b in zip(daemon, bare, strict=True))
            print(f"{form}: {JOBS[form]} jobs x {ROUNDS} rounds on {SIZE}x{SIZE}: "
                  f"bare {60 / bare_s:.1f} jobs/min ({bare_s:.3f} s), "
                  f"daemon {60 / daemon_s:.1f} jobs/min ({daemon_s:.3f} s), paired ratio {ratios[form]:.3f} "
                  f"(of the medians {daemon_s / bare_s:.3f}); "
                  f"library call alone {call_s:.3f} s, daemon over it {daemon_s / call_s:.3f}; "
                  f"worker CPU per job over bare {statistics.median(cpu):.3f} "
                  f"(rounds bare {', '.join(f'{v:.3f}' for v in bare)}; daemon "
                  f"{', '.join(f'{v:.3f}' for v in daemon)})", flush=True)  # fmt: skip
    worst = max(ratios, key=ratios.get)
    print(f"worst form: {worst}")
    print(f"forms worst_form_over_bare {ratios[worst]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
