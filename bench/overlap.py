"""bench/overlap: network time hidden behind inference.

The local horde adds 250 ms to every API call and caps upload bandwidth; 50 generation jobs on a real tiny
pipeline with queue_size 1. Target: inference busy >= 95% of the wall time (from the first job taking the
run slot to the last one releasing it; a generation job holds the slot while generating, and its safety
pass runs after): popping, source download, safety pass, upload and submit all overlap with a job running.

Run from the repository root: .venv/bin/python -m bench.overlap
"""

from __future__ import annotations

import time

from bench.harness import Intervals, generation_params, run_jobs, tiny_reference, worker_for
from local_horde import LocalHorde

JOBS = 50
LATENCY_S = 0.25
UPLOAD_BYTES_PER_S = 256 * 1024
SIZE, STEPS = 512, 4  # the horde's default size: a job outlasts one 250 ms API call, as real jobs do


def main() -> None:
    reference = tiny_reference()
    with LocalHorde(known_models=["tiny-sd1"]) as horde:
        config, client, worker = worker_for(horde, reference, queue_size=1)
        # Warm-up: load the model and run one job before any latency is added.
        warm = Intervals()
        run_jobs(horde, client, worker, warm,
                 [horde.request_generation(generation_params(SIZE, STEPS), models=["tiny-sd1"])])
        horde.faults.latency_s = LATENCY_S
        horde.faults.upload_bandwidth = UPLOAD_BYTES_PER_S
        requests = [horde.request_generation(generation_params(SIZE, STEPS), models=["tiny-sd1"],
                                             prompt=f"a lighthouse, take {i}") for i in range(JOBS)]
        intervals = Intervals()
        started = time.perf_counter()
        wall, stats = run_jobs(horde, client, worker, intervals, requests)
        per_job = sum(end - start for start, end in intervals.spans) / len(intervals.spans)
        busy = intervals.busy_fraction()
    print(f"jobs {len(intervals.spans)}, api latency {LATENCY_S * 1000:.0f} ms/call, "
          f"upload cap {UPLOAD_BYTES_PER_S // 1024} KiB/s, queue_size {config.queue_size}")
    print(f"mean inference {per_job:.3f} s/job; wall {wall:.1f} s ({time.perf_counter() - started:.1f} s "
          f"with shutdown); {stats.summary_line()}")
    print(f"overlap busy_fraction {busy:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
