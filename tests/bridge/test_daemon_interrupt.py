"""The daemon and a job whose ttl runs out while it runs (issue 17, item 8: no run slot held past the ttl).

Through the local horde over real HTTP with the real jobs on the tiny models: the job stops at its next check
point (models.interrupt), is faulted with the reason, its run slot is free at once and the worker serves on.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.jobs.alchemy import AlchemySource
from bridge.jobs.generation import GenerationSource
from local_horde import LocalHorde
from models.interrupt import Interrupt
from postprocessors import PostProcessorRegistry
from tests.bridge import test_daemon_hostile as hostile
from tests.bridge.generation.conftest import RecordingManager
from tests.bridge.test_daemon_hostile import MODEL, SMALL, make_runtime, one_submit_each, serving, wait_for
from tests.models.test_interrupt import ticking
from tests.postprocessors.helpers import cpu_cache, tiny_registry, tiny_weights_dir

horde = hostile.horde
tiny_reference = hostile.tiny_reference
pipelines = hostile.pipelines
one_torch_thread = hostile.one_torch_thread

MAX_STEPS = 500  # the horde's limit: at 128², seconds of work for the tiny model, far more than its ttl
UPSCALER = "RealESRGAN_x2plus"


def stopped_reason(submit: dict[str, Any]) -> str:
    [ref] = [m["ref"] for m in submit["gen_metadata"] if m["type"] == "information"]
    return ref


def test_a_generation_past_its_ttl_stops_mid_steps_is_faulted_and_the_worker_serves_on(
    horde: LocalHorde, pipelines: RecordingManager, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    passing_safety: Any,
) -> None:
    horde.generations.job_ttl = 0.6  # every pop of the slow request: each one runs out mid-steps
    slow_params = {**SMALL, "steps": MAX_STEPS, "width": 128, "height": 128}
    slow = horde.request_generation(slow_params, models=[MODEL], prompt="slow")
    runtime = make_runtime(models=pipelines, safety=passing_safety, queue_size=0)
    with caplog.at_level(logging.WARNING), serving(horde, runtime, [GenerationSource()], tmp_path):
        # The horde faults a request after three lost attempts; each attempt ends in the worker's fault.
        assert horde.wait_done([slow], timeout=30)[slow]["faulted"] is True
        wait_for(lambda: all(horde.submits(i) for i in horde.accounting().handed_out),
                 what="the three attempts faulted back")
        horde.generations.job_ttl = None  # the horde's own rule from here
        normal = horde.request_generation(SMALL, models=[MODEL], prompt="normal")
        status = horde.wait_done([normal], timeout=30)[normal]
    [generation] = status["generations"]
    assert generation["state"] == "ok"  # the worker served on, from the same model
    submits = one_submit_each(horde)
    attempts = horde.accounting().handed_out[:3]  # the horde took them back at their ttl: the faulted
    # submits were answered AbortedGen, and each is logged as dropped (no id is left without an end)
    for job_id in attempts:
        reason = stopped_reason(submits[job_id])
        # Mid-steps (or, on a machine too loaded to load the model within the ttl, before the first one).
        match = re.fullmatch(r"the job's ttl ran out during generation, image 1 of 1(, after step (\d+))?: "
                             r"stopped unfinished", reason)
        assert match and int(match.group(2) or 0) < MAX_STEPS, reason
        assert submits[job_id]["state"] == "faulted"
    assert caplog.text.count("interrupted: the job's ttl ran out during generation") == 3
    assert pipelines._cache._entries[MODEL].locks == 0


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory: pytest.TempPathFactory) -> PostProcessorRegistry:
    return tiny_registry(tiny_weights_dir(tmp_path_factory), cpu_cache(), tile=16)


class FirstFormOutOfTime(AlchemySource):
    """The real source; the first form it pops has a deadline that passes before its third upscaler tile
    (test instrumentation standing in for a form that took its 3 minutes)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def pop(self, client, runtime, capacity):
        jobs = super().pop(client, runtime, capacity)
        for job in jobs:
            if self.first is None:
                self.first = job.ids[0]
                # Check points: before the upscaler (tick 0), before tiles 1 and 2, before tile 3 (tick 3).
                clock = ticking()
                job.interrupt = lambda clock=clock: Interrupt(deadline=3, clock=clock, what="the form's ttl")
        return jobs


def test_an_upscale_form_past_its_ttl_stops_between_tiles_and_the_next_form_is_served(
    horde: LocalHorde, upscaler: PostProcessorRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = hostile.webp(size=(48, 48))  # 3 x 3 tiles of 16 px
    horde.request_interrogation(horde.host_image(image, "first.webp"), [UPSCALER])
    runtime = make_runtime(forms=[UPSCALER], queue_size=0)
    runtime.postprocessors = upscaler
    source = FirstFormOutOfTime()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), serving(horde, runtime, [source], tmp_path):
        wait_for(lambda: source.first is not None and horde.submits(source.first), what="the first back")
        second = horde.request_interrogation(horde.host_image(image, "second.webp"), [UPSCALER])
        statuses = horde.wait_done([second], timeout=30)
    assert time.monotonic() - started < 30
    assert [s["state"] for s in horde.submits(source.first)] == ["faulted"]
    assert f"interrupted: the form's ttl ran out during {UPSCALER}, tile 3 of 9: stopped unfinished" \
        in caplog.text
    [form] = statuses[second]["forms"]
    assert form["state"] == "done" and UPSCALER in form["result"]  # the worker served on
    assert upscaler._cache._entries[f"postprocessor:{UPSCALER}"].locks == 0
