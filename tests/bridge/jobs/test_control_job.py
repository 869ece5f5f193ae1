"""ControlNet jobs end to end: the local horde hands them out, the real daemon runs and submits them."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bridge.config import BRIDGE_NAME
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.images import encode_webp
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.stats import Stats
from controlnet.types import BY_NAME, CONTROL_TYPE_NAMES
from local_horde import DEFAULT_API_KEY, LocalHorde
from tests.controlnet import conftest as control_fixtures
from tests.controlnet.conftest import SD1, SD2, ControlStack

tiny_models_json = control_fixtures.tiny_models_json
tiny_controlnets = control_fixtures.tiny_controlnets
stack = control_fixtures.stack
picture = control_fixtures.picture
one_torch_thread = control_fixtures.one_torch_thread

SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler", "seed": "9"}
FAST = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05, maintenance_poll_s=0.05, fault_pause_s=0.2)
BASELINES = {SD1: "stable diffusion 1", SD2: "stable diffusion 2"}


@pytest.fixture()
def horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=BASELINES, extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}) as h:
        yield h


def client_for(horde: LocalHorde) -> HordeClient:
    return HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="tests:0:none")


def webp(image: Image.Image) -> bytes:
    return encode_webp(image, quality=90)


def test_every_type_image_is_control_and_return_control_map_through_the_daemon(
    horde: LocalHorde,
    stack: ControlStack,
    picture: Image.Image,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = webp(picture)
    asked = {f"sd1 {kind}": ({"control_type": kind}, SD1) for kind in CONTROL_TYPE_NAMES}
    asked |= {"sd2 canny (diff)": ({"control_type": "canny"}, SD2),
              "sd2 openpose (full)": ({"control_type": "openpose"}, SD2),
              "image_is_control": ({"control_type": "hed", "image_is_control": True}, SD1),
              "return_control_map": ({"control_type": "canny", "return_control_map": True}, SD1)}
    ids = {label: horde.request_generation({**SMALL, **params}, models=[model], source_image=source)
           for label, (params, model) in asked.items()}
    runtime = stack.runtime(api_key=DEFAULT_API_KEY, dreamer_name="control-worker",
                            bridge_agent=f"{BRIDGE_NAME}:0.1.0:tests")
    daemon = Daemon(client=client_for(horde), runtime=runtime, sources=[GenerationSource()],
                    journal=Journal(tmp_path / "inflight.json"), stats=Stats(), timings=FAST)
    thread = threading.Thread(target=daemon.run, daemon=True)
    with caplog.at_level(logging.INFO):
        thread.start()
        try:
            statuses = horde.wait_done(ids.values(), timeout=300)
        finally:
            daemon.request_stop("test done")
            thread.join(timeout=60)
    for label, rid in ids.items():
        status = statuses[rid]
        assert status["done"] and not status["faulted"], label
        [generation] = status["generations"]
        assert generation["state"] == "ok", label
        [submit] = horde.submits(generation["id"])
        assert submit["generation"] == "R2" and submit["state"] == "ok", label
    # The map itself is the deliverable: the annotator's output of the source the worker received.
    [delivered] = statuses[ids["return_control_map"]]["generations"]
    received = Image.open(io.BytesIO(source)).convert("RGB")
    expected = stack.controlnets.annotate(BY_NAME["canny"], received)
    assert horde.download(delivered["img"]) == encode_webp(expected, quality=95)
    features = daemon.stats.snapshot().features
    assert features["controlnet:canny"] == 3 and features["controlnet:hough"] == 1
    assert features["image_is_control"] == 1 and features["return_control_map"] == 1
    assert "return_control_map" in daemon.stats.summary_line()
    assert horde.worker_details("control-worker")["controlnet"] is True
    logged = caplog.text
    assert "image_is_control: the source is the map (annotator skipped)" in logged
    assert "return_control_map: submitting the 64x64 map" in logged


def test_the_pop_says_allow_controlnet_only_when_asked_and_ready(
    horde: LocalHorde, stack: ControlStack, picture: Image.Image
) -> None:
    horde.request_generation({**SMALL, "control_type": "canny"}, models=[SD1], source_image=webp(picture))
    client = client_for(horde)
    agent = f"{BRIDGE_NAME}:0.1.0:tests"
    off = stack.runtime(api_key=DEFAULT_API_KEY, dreamer_name="off-worker", bridge_agent=agent,
                        allow_controlnet=False)
    assert GenerationSource().pop(client, off, capacity=1) == []
    assert horde.worker_details("off-worker")["controlnet"] is False
    on = stack.runtime(api_key=DEFAULT_API_KEY, dreamer_name="on-worker", bridge_agent=agent)
    [job] = GenerationSource().pop(client, on, capacity=1)
    assert job.pop.payload.control_type == "canny" and horde.worker_details("on-worker")["controlnet"] is True
    job.prepare(on)
    [submission] = job.execute(on)
    job.send(client, submission)
    assert submission.state == "ok" and job.timings.features == ["controlnet:canny"]
