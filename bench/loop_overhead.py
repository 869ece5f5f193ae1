"""bench/loop_overhead: what the bridge's loop adds to a job, with no added API latency.

Side by side in one run, alternating: (a) bare: the same generation jobs popped by hand and executed one
after another (`prepare` + `execute` only, nothing else); (b) bridge: the real daemon serving the same
number of jobs end to end (pop, prepare, execute, upload, submit). Both sides do the same work per job:
`execute` is generation, then the safety pass on the image (the worker's tiny safety models) and the webp
encode. The bare side runs them in sequence; the daemon runs the safety pass after the job's run slot is
released, overlapping the next job's generation, so its ratio can be under 1. Both run at the worker's CPU
thread policy (`build_worker`). The local horde runs in its own process, as the real one is remote.
Target: bridge wall per job / bare per job <= 1.03.

Run from the repository root: .venv/bin/python -m bench.loop_overhead
"""

from __future__ import annotations

import statistics
import time

from bench.harness import HordeProcess, Intervals, generation_params, run_jobs, tiny_reference, worker_for
from bridge.jobs.generation import GenerationSource

JOBS = 16
ROUNDS = 3
SIZE, STEPS = 512, 4  # the horde's default size; few steps keep the run short


def request(horde, i: int) -> str:
    return horde.request_generation(generation_params(SIZE, STEPS), models=["tiny-sd1"], prompt=f"a boat {i}")


def bare_round(horde, client, worker) -> float:
    """Seconds per job executing popped jobs directly, without the loop. Popping before and sending after
    are outside the timed region."""
    for i in range(JOBS):
        request(horde, i)
    jobs, source = [], GenerationSource()
    while len(jobs) < JOBS:
        jobs += source.pop(client, worker.runtime, 1)
    started = time.perf_counter()
    results = []
    for job in jobs:
        job.prepare(worker.runtime)
        results.append((job, job.execute(worker.runtime)))
    per_job = (time.perf_counter() - started) / JOBS
    for job, submissions in results:
        for submission in submissions:
            job.send(client, submission)
    return per_job


def bridge_round(horde, client, worker) -> float:
    requests = [request(horde, i) for i in range(JOBS)]
    wall, _ = run_jobs(horde, client, worker, Intervals(), requests)
    return wall / JOBS


def main() -> None:
    reference = tiny_reference()
    with HordeProcess(["tiny-sd1"]) as horde:
        _, client, worker = worker_for(horde, reference, queue_size=1)
        bridge_round(horde, client, worker)  # warm-up: model load, first-call costs
        bare, bridge = [], []
        for _ in range(ROUNDS):
            bare.append(bare_round(horde, client, worker))
            bridge.append(bridge_round(horde, client, worker))
    bare_s, bridge_s = statistics.median(bare), statistics.median(bridge)
    print(f"{JOBS} jobs x {ROUNDS} rounds at {SIZE}x{SIZE}, {STEPS} steps")
    print(f"bare per job {bare_s:.3f} s (rounds {', '.join(f'{v:.3f}' for v in bare)})")
    print(f"bridge per job {bridge_s:.3f} s (rounds {', '.join(f'{v:.3f}' for v in bridge)})")
    print(f"loop_overhead wall_over_bare {bridge_s / bare_s:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
