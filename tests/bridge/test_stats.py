"""Stats: per-stage means, kudos and jobs per hour, faults by kind, the periodic summary."""

from __future__ import annotations

import logging

from bridge.jobs.base import JobTimings
from bridge.stats import Stats
from bridge.status_ui import StatsReporter, render


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_means_and_faults_by_kind():
    clock = Clock()
    stats = Stats(clock=clock)
    stats.submitted("generation", "ok", 10.0)
    stats.submitted("generation", "censored", 5.0)
    stats.submitted("caption", "faulted", 0.0)
    stats.dropped("generation")
    stats.job_finished("generation", "gen a", JobTimings(pop_wait=0.2, inference=2.0, upload=0.4))
    stats.job_finished("caption", "cap b", JobTimings(pop_wait=0.4, inference=1.0))
    clock.now += 1800  # half an hour
    snap = stats.snapshot()
    assert (snap.jobs_done, snap.images_done, snap.faulted, snap.dropped) == (2, 3, 1, 1)
    assert snap.kudos == 15.0 and round(snap.kudos_per_hour) == 30 and round(snap.jobs_per_hour) == 4
    assert snap.faults_by_kind == {"caption": 1}
    assert snap.stage_means_s["inference"] == 1.5 and round(snap.stage_means_s["pop_wait"], 2) == 0.3
    line = stats.summary_line()
    assert "15.0 kudos (30/h" in line and "caption: 1" in line and "inference=1.50s" in line
    assert render(stats, "t").row_count == 7 + 2  # a row per family: generation, caption


def test_reporter_logs_a_summary_on_exit(caplog):
    stats = Stats()
    with caplog.at_level(logging.INFO, logger="bridge.stats"), StatsReporter(stats, every_s=0):
        stats.submitted("nsfw", "ok", 1.0)
    assert "stats: 0 jobs, 1 submits, 1.0 kudos" in caplog.text


def test_delivered_with_reward_unknown_and_per_family_figures():
    clock = Clock()
    stats = Stats(clock=clock)
    stats.submitted("generation", "ok", 12.0)
    stats.submitted("generation", "ok", None)  # delivered: the answer with its reward was lost
    stats.submitted("alchemy", "ok", 1.0)
    stats.submitted("alchemy", "faulted", 0.0)
    stats.dropped("alchemy")
    stats.job_finished("generation", "gen", JobTimings(queue_wait=4.0))
    stats.job_finished("generation", "gen", JobTimings(queue_wait=2.0))
    for wait in (0.1,) * 19 + (3.0,):
        stats.job_finished("alchemy", "form", JobTimings(queue_wait=wait))
    snap = stats.snapshot()
    assert (snap.images_done, snap.dropped, snap.reward_unknown, snap.kudos) == (4, 1, 1, 13.0)
    gen, alc = snap.families["generation"], snap.families["alchemy"]
    assert (gen.jobs_done, gen.submits, gen.reward_unknown, gen.kudos, gen.dropped) == (2, 2, 1, 12.0, 0)
    assert gen.wait_mean_s == 3.0 and gen.wait_p95_s == 4.0
    assert (alc.jobs_done, alc.submits, alc.faulted, alc.dropped, alc.kudos) == (20, 2, 1, 1, 1.0)
    assert alc.wait_p95_s == 0.1 and round(alc.wait_mean_s, 3) == 0.245
    line = stats.summary_line()
    assert "13.0 kudos (1 delivered with reward unknown: the horde's answer was lost)" in line
    assert "generation: 2 jobs, 2 submits, 12.0 kudos (+1 reward unknown)" in line
    assert "alchemy: 20 jobs, 2 submits, 1.0 kudos, faulted 1, dropped 1, slot wait mean 0.25s p95 0.10s" \
        in line
    rows = render(stats, "t").row_count
    assert rows == 7 + 1 + 2  # + the reward-unknown row and one row per family
