"""SDXL end to end: tiny SDXL single files (both text encoders in the checkpoint; an inpainting one with
SDXL inpainting's 9-channel UNet) served by the daemon to the local horde, one request per job kind.

Every request goes requester -> local horde -> the daemon's GenerationSource pop -> the real ModelManager
loading the single file -> the SDXL pipelines -> R2 upload -> submit -> the requester's status.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from bridge.api_models import GenerationPayload
from bridge.config import BRIDGE_NAME
from bridge.daemon import Daemon, LoopTimings
from bridge.generation.masks import SourceImages
from bridge.generation.request import SourceKind, WorkerLimits, build_request
from bridge.generation.runner import run_generation, sdxl_clip_skip
from bridge.generation.samplers import HORDE_SAMPLERS as SAMPLERS
from bridge.horde_api import HordeClient
from bridge.images import encode_webp
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.runtime import Runtime
from local_horde import DEFAULT_API_KEY, LocalHorde
from local_horde.rules import image_kudos
from models.cache import ModelCache
from models.device import DevicePolicy
from postprocessors import PostProcessorRegistry
from tests.bridge.generation.conftest import RecordingManager, make_manager, make_runtime

XL, XL_INPAINT = "tiny-sdxl", "tiny-sdxl-inpainting"
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler", "seed": "21"}
UPSCALER = "2xModernSpanimationV1"


@pytest.fixture(scope="module")
def xl_models(tiny_reference: Path) -> RecordingManager:
    manager = make_manager(tiny_reference, (XL, XL_INPAINT))
    assert manager.ready_models() == [XL, XL_INPAINT]
    return manager


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory: pytest.TempPathFactory) -> PostProcessorRegistry:
    """One bridge-v13 upscaler (SPAN) for inline post-processing, in its real (neosr) layout."""
    from postprocessors.tiny import build_tiny_postprocessors

    weights = tmp_path_factory.mktemp("xl-postprocessors")
    build_tiny_postprocessors(weights, categories=["esrgan"])
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=256 * 2**20)
    return PostProcessorRegistry(weights_dir=weights, cache=cache, device=DevicePolicy.cpu())


@pytest.fixture(scope="module")
def served(
    xl_models: RecordingManager, upscaler: PostProcessorRegistry, tmp_path_factory, passing_safety: Any
) -> Iterator[Any]:
    """A local horde that knows the tiny SDXL models as SDXL, and the daemon serving them."""
    baselines = dict.fromkeys((XL, XL_INPAINT), "stable_diffusion_xl")
    # Our bridge name is granted reGen's capabilities here; on the real horde only the listed names get them.
    with LocalHorde(known_models=baselines, extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}) as horde:
        runtime = make_runtime(xl_models, passing_safety, api_key=DEFAULT_API_KEY, dreamer_name="sdxl-worker",
                               max_batch=4, max_power=40)  # fmt: skip
        runtime.postprocessors = upscaler
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="sdxl-tests:0:none")
        daemon = Daemon(client=client, runtime=runtime, sources=[GenerationSource()],
                        journal=Journal(tmp_path_factory.mktemp("xl-journal") / "j.json"),
                        timings=LoopTimings(idle_poll_s=0.02, error_poll_s=0.05))  # fmt: skip
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        yield horde, runtime
        daemon.request_stop("tests done")
        thread.join(timeout=60)


def generate(served: Any, params: dict[str, Any], model: str = XL, **request: Any) -> list[dict[str, Any]]:
    horde, _ = served
    rid = horde.request_generation({**SMALL, **params}, models=[model], **request)
    status = horde.wait_done([rid], timeout=120)[rid]
    assert status["done"] and not status["faulted"], status
    return status["generations"]


def image_of(served: Any, generation: dict[str, Any]) -> bytes:
    return served[0].download(generation["img"])


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return image.size


def pipelines_used(runtime: Runtime, since: int) -> list[type | None]:
    return [cls for _, cls in runtime.models.calls[since:]]


def webp(image: Image.Image) -> bytes:
    return encode_webp(image, quality=95)


def test_txt2img_batch_on_sdxl(served: Any) -> None:
    horde, runtime = served
    before = len(runtime.models.calls)
    gens = generate(served, {"n": 3})
    assert [int(g["seed"]) for g in sorted(gens, key=lambda g: int(g["seed"]))] == [21, 22, 23]
    images = [image_of(served, g) for g in gens]
    assert len(set(images)) == 3 and all(size_of(i) == (64, 64) for i in images)
    for gen in gens:
        index = int(gen["seed"]) - 21
        assert {"type": "batch_index", "value": "see_ref", "ref": str(index)} in gen["gen_metadata"]
        assert gen["model"] == XL
        # SDXL pays twice an SD1.5 image of the same size and steps.
        reward = horde.accounting().rewards[gen["id"]]
        assert reward == pytest.approx(round(image_kudos({**SMALL, "steps": 2}, "stable_diffusion_xl"), 2))
    assert set(pipelines_used(runtime, before)) == {StableDiffusionXLPipeline}


def test_img2img_on_sdxl(served: Any) -> None:
    _, runtime = served
    source = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    before = len(runtime.models.calls)
    [gen] = generate(served, {"denoising_strength": 0.6}, source_image=webp(source),
                     source_processing="img2img")  # fmt: skip
    assert size_of(image_of(served, gen)) == (64, 64)
    assert not [m for m in gen["gen_metadata"] if m["type"] in ("source_image", "information")]
    assert pipelines_used(runtime, before) == [StableDiffusionXLImg2ImgPipeline]


def test_inpainting_with_the_sdxl_inpainting_single_file(served: Any) -> None:
    _, runtime = served
    source = Image.new("RGB", (64, 64), (40, 160, 90))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    before = len(runtime.models.calls)
    [gen] = generate(served, {}, model=XL_INPAINT, source_image=webp(source), source_mask=webp(mask),
                     source_processing="inpainting")  # fmt: skip
    assert size_of(image_of(served, gen)) == (64, 64)
    assert not [m for m in gen["gen_metadata"] if m["type"] in ("source_image", "source_mask")]
    assert pipelines_used(runtime, before) == [StableDiffusionXLInpaintPipeline]
    assert runtime.models.record(XL_INPAINT).inpainting


def test_outpainting_extends_the_source_to_the_asked_shape(served: Any) -> None:
    _, runtime = served
    narrow = Image.new("RGB", (32, 64), (200, 40, 40))
    before = len(runtime.models.calls)
    [gen] = generate(served, {"width": 128, "height": 64}, model=XL_INPAINT, source_image=webp(narrow),
                     source_processing="outpainting")  # fmt: skip
    assert size_of(image_of(served, gen)) == (128, 64)
    [note] = [m["ref"] for m in gen["gen_metadata"] if m["type"] == "information"]
    assert "'32x64', used '64x32'" not in note and "extended to the asked shape for outpainting" in note
    assert pipelines_used(runtime, before) == [StableDiffusionXLInpaintPipeline]


def test_hires_fix_is_a_no_op_up_to_1024_per_side_on_sdxl(served: Any) -> None:
    _, runtime = served
    before = len(runtime.models.calls)
    [gen] = generate(served, {"hires_fix": True, "width": 128, "height": 64})
    [note] = [m["ref"] for m in gen["gen_metadata"] if m["type"] == "information"]
    assert note.startswith("hires_fix") and "native 1024px" in note
    assert pipelines_used(runtime, before) == [StableDiffusionXLPipeline]  # one pass only


def test_hires_fix_second_pass_on_sdxl(xl_models: RecordingManager) -> None:
    """The two passes on the SDXL pipelines (first pass, then SDXL img2img at the asked size). The request
    rule that turns them on above 1024 per side is checked through the daemon in the slow test below."""
    runtime = make_runtime(xl_models, max_power=40)
    record = xl_models.record(XL)
    payload = GenerationPayload(prompt="a hill", seed=5, width=64, height=64, ddim_steps=2)
    request, _ = build_request(payload, record, SourceKind(), WorkerLimits(1 << 20))
    request = replace(request, width=128, height=96, hires_fix=True, first_pass=(64, 64))
    before = len(xl_models.calls)
    result = run_generation(runtime, request, SourceImages())
    assert result.images[0].image.size == (128, 96)
    assert [cls for _, cls in xl_models.calls[before:]] == [StableDiffusionXLPipeline,
                                                            StableDiffusionXLImg2ImgPipeline]  # fmt: skip


@pytest.mark.slow
def test_hires_fix_above_1024_through_the_daemon(served: Any) -> None:
    _, runtime = served
    before = len(runtime.models.calls)
    [gen] = generate(served, {"hires_fix": True, "width": 1088, "height": 1088, "steps": 1})
    assert size_of(image_of(served, gen)) == (1088, 1088)
    assert pipelines_used(runtime, before) == [StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]


def test_every_sampler_with_karras_on_sdxl(served: Any) -> None:
    horde, _ = served
    ids = {name: horde.request_generation({**SMALL, "sampler_name": name, "karras": True}, models=[XL])
           for name in SAMPLERS}  # fmt: skip
    # With 2 steps both schedules are just [sigma_max, sigma_min]: compare at 4.
    ids["k_euler 4"] = horde.request_generation({**SMALL, "karras": True, "steps": 4}, models=[XL])
    ids["k_euler 4 no karras"] = horde.request_generation({**SMALL, "karras": False, "steps": 4}, models=[XL])
    statuses = horde.wait_done(list(ids.values()), timeout=180)
    images = {}
    for name, rid in ids.items():
        status = statuses[rid]
        assert status["done"] and not status["faulted"], (name, status)
        [gen] = status["generations"]
        images[name] = image_of(served, gen)
        notes = [m["ref"] for m in gen["gen_metadata"] if m["type"] == "information"]
        if name in ("k_dpm_fast", "k_dpm_adaptive", "k_dpmpp_2s_a", "DDIM", "lcm"):
            assert notes, name  # the nearest solver, or no Karras schedule: said so
    assert images["k_euler 4"] != images["k_euler 4 no karras"]  # karras changes the sigmas
    assert len(set(images.values())) >= len(SAMPLERS) - 2


def test_clip_skip_on_sdxl(served: Any) -> None:
    images = {}
    for skip in (1, 2, 3):
        [gen] = generate(served, {"clip_skip": skip})
        images[skip] = image_of(served, gen)
        capped = [m["ref"] for m in gen["gen_metadata"] if m["ref"].startswith("clip_skip")]
        assert bool(capped) == (skip == 3)  # the tiny encoders have 2 layers: 3 is capped to 2
    assert images[1] != images[2] and images[3] == images[2]


def test_sdxl_clip_skip_takes_the_nth_hidden_state_of_both_encoders(xl_models: RecordingManager) -> None:
    with xl_models.pipeline(XL) as pipe:
        request = replace(_request(xl_models), clip_skip=1)
        for horde_skip in (1, 2):
            skip = sdxl_clip_skip(pipe, replace(request, clip_skip=horde_skip), [])
            embeds, *_ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, clip_skip=skip)
            ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-horde_skip]
                second = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-horde_skip]
            assert torch.allclose(embeds, torch.cat([first, second], dim=-1), atol=1e-5)


def _request(manager: RecordingManager) -> Any:
    payload = GenerationPayload(prompt="a cat", seed=1, width=64, height=64, ddim_steps=2)
    return build_request(payload, manager.record(XL), SourceKind(), WorkerLimits(1 << 20))[0]


def test_tiling_on_sdxl(served: Any) -> None:
    [plain] = generate(served, {"tiling": False})
    [tiled] = generate(served, {"tiling": True})
    assert image_of(served, plain) != image_of(served, tiled)
    assert not [m for m in tiled["gen_metadata"] if m["type"] == "information"]


def test_inline_v13_post_processor_on_sdxl(served: Any) -> None:
    [gen] = generate(served, {"post_processing": [UPSCALER]})
    assert size_of(image_of(served, gen)) == (128, 128)  # SPAN x2
    assert not [m for m in gen["gen_metadata"] if m["type"] == "information"]
