"""bench/loop_overhead: what the bridge's loop adds to a job, with no added API latency.

Side by side in one run, alternating: (a) bare: the same generation jobs popped by hand and executed one
after another (`prepare` + `execute` only, nothing else); (b) bridge: the real daemon serving the same
number of jobs end to end (pop, prepare, execute, upload, submit). Both sides do the same work per job:
`execute` is generation, then the safety pass on the image (the worker's tiny safety models) and the webp
encode. The bare side runs them in sequence; the daemon runs the safety pass after the job's run slot is
released, overlapping the next job's generation, so its ratio can be under 1. Both run at the worker's CPU
thread policy (`build_worker`). The local horde runs in its own process, as the real one is remote.
Target: bridge wall per job / bare per job <= 1.03.

Run from the repository root: .venv/bin/python -m bench.loop_overhead [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from bench.harness import HordeProcess, Intervals, generation_params, run_jobs, tiny_reference, worker_for
from bridge.jobs.generation import GenerationSource

JOBS = 16
ROUNDS = 5
SIZE, STEPS = 512, 4  # the horde's default size; few steps keep the run short


def request(horde, i: int) -> str:
    return horde.request_generation(generation_params(SIZE, STEPS), models=["tiny-sd1"], prompt=f"a boat {i}")


def bare_round(horde, client, worker) -> Round:
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
    return Round(per_job, statistics.fmean(j.timings.inference for j in jobs),
                 statistics.fmean(j.timings.safety for j in jobs))


def bridge_round(horde, client, worker) -> Round:
    requests = [request(horde, i) for i in range(JOBS)]
    wall, stats = run_jobs(horde, client, worker, Intervals(), requests)
    means = stats.snapshot().stage_means_s
    return Round(wall / JOBS, means["inference"], means["safety"])


@dataclass
class Round:
    per_job: float  # wall seconds per job
    inference: float  # mean seconds generating (the job's own timing), to tell slower jobs from loop costs
    safety: float

    def line(self) -> str:
        return f"{self.per_job:.3f} (inference {self.inference:.3f}, safety {self.safety:.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    rounds = parser.parse_args(argv).rounds
    reference = tiny_reference()
    with HordeProcess(["tiny-sd1"]) as horde:
        _, client, worker = worker_for(horde, reference, queue_size=1)
        bridge_round(horde, client, worker)  # warm-up: model load, first-call costs
        bare_rounds, bridge_rounds = [], []
        for _ in range(rounds):
            bare_rounds.append(bare_round(horde, client, worker))
            bridge_rounds.append(bridge_round(horde, client, worker))
    bare, bridge = [r.per_job for r in bare_rounds], [r.per_job for r in bridge_rounds]
    bare_s, bridge_s = statistics.median(bare), statistics.median(bridge)
    print(f"{JOBS} jobs x {rounds} rounds at {SIZE}x{SIZE}, {STEPS} steps")
    print(f"bare per job {bare_s:.3f} s (rounds {', '.join(r.line() for r in bare_rounds)})")
    print(f"bridge per job {bridge_s:.3f} s (rounds {', '.join(r.line() for r in bridge_rounds)})")
    # Each round runs both back to back: a burst of load from other processes mostly hits one round.
    paired = [b / a for a, b in zip(bare, bridge, strict=True)]
    print(f"per-round ratios {', '.join(f'{v:.3f}' for v in paired)}; median {statistics.median(paired):.3f}")
    print(f"loop_overhead wall_over_bare {bridge_s / bare_s:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
