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
