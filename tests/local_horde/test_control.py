"""ControlNet requests on the local horde: the server's refusals, who may take a control job, its kudos."""

from __future__ import annotations

import pytest

from local_horde import LocalHorde
from tests.local_horde.conftest import REGEN, WorkerClient, small_params, webp

BASELINES = {
    "tiny-sd1": "stable diffusion 1",
    "tiny-sd2": "stable diffusion 2",
    "SDXL 1.0": "stable_diffusion_xl",
    "Flux.1-Schnell": "flux_1",
}


@pytest.fixture
def horde() -> LocalHorde:
    with LocalHorde(known_models=BASELINES) as h:
        yield h


@pytest.mark.parametrize(
    ("params", "body", "code"),
    [
        ({"control_type": "normal"}, {"models": ["tiny-sd2"]}, "ControlNetUnsupported"),
        ({"control_type": "hough"}, {"models": ["tiny-sd2"]}, "ControlNetUnsupported"),
        ({"control_type": "canny"}, {"models": ["tiny-sd1"], "source_image": None},
         "ControlNetSourceMissing"),
        ({"control_type": "canny"}, {"models": ["tiny-sd1"], "source_processing": "inpainting"},
         "ControlNetInpaintingMismatch"),
        ({"control_type": "canny"}, {"models": ["SDXL 1.0"]}, "ControlNetMismatch"),
        ({"control_type": "canny"}, {"models": ["Flux.1-Schnell"]}, "ControlNetMismatch"),
        ({"control_type": "canny", "transparent": True}, {"models": ["tiny-sd1"]}, "InvalidTransparencyCN"),
    ],
)
def test_the_servers_refusals(horde: LocalHorde, params: dict, body: dict, code: str) -> None:
    request = {"source_image": webp(), **body}
    with pytest.raises(RuntimeError, match=f"400 .*{code}"):
        horde.request_generation(small_params(**params), **request)


def test_seg_on_sd2_and_canny_on_sd2_are_accepted(horde: LocalHorde) -> None:
    for kind in ("seg", "canny"):
        params = small_params(control_type=kind)
        assert horde.request_generation(params, models=["tiny-sd2"], source_image=webp())


def test_a_control_job_needs_allow_controlnet_and_both_bridge_capabilities(horde: LocalHorde) -> None:
    horde.request_generation(small_params(control_type="canny"), models=["tiny-sd1"], source_image=webp())
    worker = WorkerClient(horde)
    assert worker.pop()["skipped"] == {"controlnet": 1}
    legacy = WorkerClient(horde, name="legacy", agent="SD-WebUI Stable Horde Worker Bridge:1.0.0:x")
    # The web bridge has both capabilities (controlnet, image_is_control) in the local table.
    assert legacy.pop(allow_controlnet=True)["id"] is not None
    job = worker.pop(allow_controlnet=True)
    assert job["id"] is None  # taken by the other worker
    params = small_params(control_type="depth", image_is_control=True)
    horde.request_generation(params, models=["tiny-sd1"], source_image=webp())
    job = worker.pop(allow_controlnet=True)
    payload = job["payload"]
    assert payload["control_type"] == "depth" and payload["image_is_control"] is True
    assert job["source_image"].startswith(horde.base_url) and job["ttl"] == 300  # doubled for ControlNet
    assert horde.worker_details(worker.name)["controlnet"] is True


def test_control_costs_three_times_unless_only_the_map_is_asked(horde: LocalHorde) -> None:
    worker = WorkerClient(horde, agent=REGEN)
    rewards = {}
    for label, extra in (("plain", {}), ("control", {"control_type": "canny"}),
                         ("map", {"control_type": "canny", "return_control_map": True})):
        horde.request_generation(small_params(steps=20, **extra), models=["tiny-sd1"], source_image=webp())
        job = worker.pop(allow_controlnet=True)
        rewards[label] = worker.submit(job["id"]).json()["reward"]
    assert rewards["control"] == pytest.approx(3 * rewards["plain"], rel=0.02)
    assert rewards["map"] == pytest.approx(rewards["plain"], rel=0.02)
