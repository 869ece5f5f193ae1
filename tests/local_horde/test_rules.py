"""Idle pop shapes, payload rules, ttl, and who may take which job (flags, limits, bridge capabilities)."""

from __future__ import annotations

import base64

import pytest
import requests

from local_horde import LocalHorde
from local_horde.capabilities import parse_bridge_agent
from tests.local_horde.conftest import REGEN, UNKNOWN_BRIDGE, WorkerClient, small_params, webp

IDLE_GENERATE = {
    "payload": {
        "ddim_steps": 30, "n_iter": 1, "image_is_control": False, "return_control_map": False,
        "sampler_name": "k_euler_a", "cfg_scale": 7.5, "height": 512, "width": 512, "karras": False,
        "tiling": False, "hires_fix": False, "transparent": False,
    },
    "id": None, "ids": [], "messages": [], "ttl": None, "skipped": {}, "model": None, "source_image": None,
    "source_processing": "img2img", "source_mask": None, "extra_source_images": None, "r2_upload": None,
    "r2_uploads": None,
}  # fmt: skip


def test_idle_pops_have_the_wire_shape(worker: WorkerClient) -> None:
    assert worker.pop() == IDLE_GENERATE
    assert worker.ipop(["caption"]) == {"forms": None, "skipped": {}}


def test_job_payload_keys_and_defaults(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation({}, prompt="p", censor_nsfw=True)
    job = worker.pop()
    payload = job["payload"]
    assert payload["ddim_steps"] == 30 and payload["width"] == payload["height"] == 512
    assert (
        payload["sampler_name"] == "k_euler_a" and payload["karras"] is True and payload["cfg_scale"] == 5.0
    )
    assert isinstance(payload["seed"], str) and 0 <= int(payload["seed"]) < 2**32
    assert payload["use_nsfw_censor"] is True
    for absent in (
        "denoising_strength",
        "clip_skip",
        "post_processing",
        "loras",
        "tis",
        "seed_variation",
        "n",
        "steps",
    ):
        assert absent not in payload
    assert job["skipped"] == {} and job["source_processing"] == "img2img" and job["source_image"] is None
    assert job["messages"] == [] and job["extra_source_images"] is None


@pytest.mark.parametrize(
    ("params", "extra_slow", "ttl"),
    [
        ({"steps": 2, "width": 64, "height": 64}, False, 150),
        ({"steps": 100, "width": 1024, "height": 1024}, False, 30 + 100 * 2 * 4),
        ({"steps": 50, "width": 1024, "height": 1024, "sampler_name": "k_heun"}, False, 30 + 100 * 2 * 4),
        ({"steps": 2, "width": 64, "height": 64}, True, 450),
    ],
)
def test_ttl_formula(
    horde: LocalHorde, worker: WorkerClient, params: dict, extra_slow: bool, ttl: int
) -> None:
    horde.request_generation(params)
    assert worker.pop(max_pixels=2048 * 2048, extra_slow_worker=extra_slow)["ttl"] == ttl


def test_job_ttl_override() -> None:
    with LocalHorde(known_models=["tiny-sd1"], job_ttl=7.0) as horde:
        horde.request_generation(small_params())
        assert WorkerClient(horde).pop()["ttl"] == 7


@pytest.mark.parametrize(
    ("request_kw", "pop_kw", "reason"),
    [
        ({"params": small_params(width=1024, height=1024)}, {}, "max_pixels"),
        ({"params": small_params(), "nsfw": True}, {"nsfw": False}, "nsfw"),
        ({"params": small_params(), "prompt": "a Big Spider"}, {"blacklist": ["spider"]}, "blacklist"),
        ({"params": small_params(), "models": ["stable_diffusion"]}, {}, "models"),
        (
            {"params": small_params(post_processing=["GFPGAN"])},
            {"allow_post_processing": False},
            "post-processing",
        ),
        ({"params": small_params(loras=[{"name": "123"}])}, {}, "lora"),
        ({"params": small_params(control_type="canny"), "source_image": webp()}, {}, "controlnet"),
        ({"params": small_params(), "source_image": webp()}, {"allow_img2img": False}, "img2img"),
        (
            {"params": small_params(), "source_image": webp(), "source_processing": "inpainting"},
            {"allow_painting": False},
            "painting",
        ),
    ],
)
def test_skip_reasons(
    horde: LocalHorde, worker: WorkerClient, request_kw: dict, pop_kw: dict, reason: str
) -> None:
    horde.request_generation(**request_kw)
    reply = worker.pop(**pop_kw)
    assert reply["id"] is None and reply["skipped"] == {reason: 1}


@pytest.mark.parametrize(
    ("request_kw", "reason"),
    [
        ({"params": small_params(), "source_image": webp()}, "img2img"),
        ({"params": small_params(), "source_image": webp(), "source_processing": "outpainting"}, "img2img"),
        ({"params": small_params(post_processing=["RealESRGAN_x4plus"])}, "bridge_version"),
        ({"params": small_params(tiling=True)}, "bridge_version"),
        ({"params": small_params(hires_fix=True)}, "bridge_version"),
        ({"params": small_params(clip_skip=2)}, "bridge_version"),
    ],
)
def test_unknown_bridge_name_gets_no_capabilities(horde: LocalHorde, request_kw: dict, reason: str) -> None:
    horde.request_generation(**request_kw)
    unknown = WorkerClient(horde, name="custom-bridge", agent=UNKNOWN_BRIDGE)
    assert unknown.pop()["skipped"] == {reason: 1}
    assert WorkerClient(horde, name="regen-bridge", agent=REGEN).pop()["id"] is not None


def test_plain_txt2img_reaches_unknown_bridges_without_r2(horde: LocalHorde) -> None:
    horde.request_generation(small_params(clip_skip=1))
    job = WorkerClient(horde, agent=UNKNOWN_BRIDGE).pop()
    assert job["id"] is not None and job["r2_upload"] is None and job["r2_uploads"] is None


def test_sources_as_urls_for_r2_source_else_base64(horde: LocalHorde) -> None:
    source, mask = webp("red"), webp("black")
    horde.request_generation(
        small_params(), source_image=source, source_mask=mask, source_processing="inpainting"
    )
    job = WorkerClient(horde, name="regen-1").pop()
    assert job["source_processing"] == "inpainting"
    assert requests.get(job["source_image"], timeout=5).content == source
    assert requests.get(job["source_mask"], timeout=5).content == mask

    legacy = WorkerClient(horde, name="legacy-1", agent="SD-WebUI Stable Horde Worker Bridge:1:https://x")
    horde.request_generation(small_params(), source_image=source)
    job = legacy.pop()
    assert not job["source_image"].startswith("http") and base64.b64decode(job["source_image"]) == source


def test_extra_source_images_need_the_capability(horde: LocalHorde) -> None:
    img = base64.b64encode(webp()).decode()
    horde.request_generation(small_params(), extra_source_images=[{"image": img, "strength": 0.5}])
    old = WorkerClient(horde, name="regen-v4", agent="AI Horde Worker reGen:4.0.0:https://x")
    assert old.pop()["skipped"] == {"bridge_version": 1}
    extra = WorkerClient(horde, name="regen-v10").pop()["extra_source_images"]
    assert extra[0]["strength"] == 0.5 and requests.get(extra[0]["image"], timeout=5).content == webp()


def test_bridge_agent_parsing() -> None:
    agent = parse_bridge_agent("AI Horde Worker reGen:9.1.2:https://github.com/x")
    assert agent.version == 9 and agent.url == "https://github.com/x"
    assert agent.has("flux") and agent.has("r2_source") and not agent.has("RestoreFormer")
    assert parse_bridge_agent("AI Horde Worker reGen:13.0.0:u").has("RestoreFormer")
    assert parse_bridge_agent("whatever").capabilities == frozenset()
    assert parse_bridge_agent(None).name == "unknown"


def test_priority_usernames_jump_the_queue(horde: LocalHorde, worker: WorkerClient) -> None:
    first = horde.request_generation(small_params())
    vip_key = horde.add_user("vip")
    vip = horde.request_generation(small_params(), api_key=vip_key)
    job = worker.pop(priority_usernames=["vip#2"])
    assert horde.generation_status(vip)["processing"] == 1 and horde.generation_status(first)["waiting"] == 1
    assert job["id"] is not None


def test_alchemy_capabilities_and_tiles(horde: LocalHorde) -> None:
    big = horde.host_image(webp("white", (2048, 2048)))  # 16 tiles
    horde.request_interrogation(big, ["RealESRGAN_x4plus", "caption"])
    limited = WorkerClient(horde, name="alch-small")
    assert limited.ipop(["RealESRGAN_x4plus"], max_tiles=8)["forms"] is None
    # Alchemy forms are not gated by the bridge: an unknown bridge name gets the upscale form too.
    unknown = WorkerClient(horde, name="alch-unknown", agent=UNKNOWN_BRIDGE)
    (form,) = unknown.ipop(["RealESRGAN_x4plus"], max_tiles=16)["forms"]
    assert form["form"] == "RealESRGAN_x4plus" and "r2_upload" in form
    (caption,) = unknown.ipop([])["forms"]  # no forms -> caption
    assert caption["form"] == "caption"


def test_extra_bridges_grant_a_custom_name_known_capabilities() -> None:
    custom = "horde-bridge-py:0.1.0:https://example.org"
    assert parse_bridge_agent(custom, {"horde-bridge-py": "AI Horde Worker reGen"}).has("RestoreFormer")
    assert not parse_bridge_agent(custom, {"horde-bridge-py": "AI Horde Worker reGen:8"}).has("flux")
    with LocalHorde(
        known_models=["tiny-sd1"], extra_bridges={"horde-bridge-py": "AI Horde Worker reGen"}
    ) as horde:
        horde.request_generation(small_params(), source_image=webp())
        job = WorkerClient(horde, agent=custom).pop()
        assert job["id"] is not None and job["source_image"].startswith(horde.base_url) and job["r2_upload"]


def test_model_baselines_set_flux_capability_ttl_and_reward() -> None:
    baselines = {
        "Flux.1-Schnell": "flux_1",
        "SDXL 1.0": "stable_diffusion_xl",
        "tiny-sd1": "stable diffusion 1",
    }
    with LocalHorde(known_models=baselines) as horde:
        horde.request_generation(small_params(), models=["Flux.1-Schnell"])
        old = WorkerClient(horde, name="regen-v8", agent="AI Horde Worker reGen:8.0.0:https://x")
        assert old.pop(models=["Flux.1-Schnell"])["skipped"] == {"bridge_version": 1}
        flux = WorkerClient(horde, name="regen-v9", agent="AI Horde Worker reGen:9.0.0:https://x")
        job = flux.pop(models=["Flux.1-Schnell"])
        assert job["model"] == "Flux.1-Schnell" and job["ttl"] == 450
        flux_reward = flux.submit(job["id"]).json()["reward"]

        for model in ("SDXL 1.0", "tiny-sd1"):
            horde.request_generation(small_params(steps=40), models=[model])
        sdxl = flux.pop(models=["SDXL 1.0"])
        sd1 = flux.pop(models=["tiny-sd1"])
        sdxl_reward = flux.submit(sdxl["id"]).json()["reward"]
        sd1_reward = flux.submit(sd1["id"]).json()["reward"]
        assert sdxl_reward == pytest.approx(2 * sd1_reward, rel=0.01)
        assert flux_reward == pytest.approx(8 * sd1_reward / 20, rel=0.03)  # flux ran 2 steps, sd1 40
