"""ControlNet jobs through build_request and run_generation on the tiny models and tiny ControlNets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image

from bridge.api_models import GenerationPayload
from bridge.generation.censor import check_images
from bridge.generation.masks import fit_to, prepare_sources
from bridge.generation.request import RequestFault, WorkerLimits, build_request
from bridge.generation.runner import run_generation
from bridge.images import encode_webp
from controlnet.types import BY_NAME
from models.interrupt import NEVER, Interrupt, Interrupted
from models.records import ModelRecord
from tests.controlnet import conftest as control_fixtures
from tests.controlnet.conftest import SD1, SD2, ControlStack, make_stack
from tests.models.test_interrupt import ticking

tiny_models_json = control_fixtures.tiny_models_json
tiny_controlnets = control_fixtures.tiny_controlnets
stack = control_fixtures.stack
picture = control_fixtures.picture

SMALL = {"prompt": "a house", "ddim_steps": 2, "width": 64, "height": 64, "seed": 21,
         "sampler_name": "k_euler"}


def request_for(stack: ControlStack, model: str, source: Image.Image | None, processing: str = "img2img",
                mask: Image.Image | None = None, **payload: Any):
    sources, kind, _ = prepare_sources(source, mask, processing if source is not None else None)
    record = stack.models.record(model) if isinstance(model, str) else model
    request, subs = build_request(GenerationPayload(**{**SMALL, **payload}), record, kind,
                                  WorkerLimits(max_pixels=1024 * 1024))
    return request, sources, subs


def run(stack: ControlStack, model: str, source: Image.Image, interrupt: Interrupt = NEVER, **payload: Any):
    request, sources, _ = request_for(stack, model, source, **payload)
    return run_generation(stack.runtime(), request, sources, interrupt)


@pytest.mark.parametrize(
    ("model", "processing", "payload", "reason"),
    [
        (SD1, "inpainting", {"control_type": "canny"}, "cannot be combined with inpainting"),
        ("tiny-inpainting", "img2img", {"control_type": "canny"}, "cannot be combined with inpainting"),
        ("tiny-sd2-depth", "img2img", {"control_type": "canny"}, "depth2img"),
        (SD2, "img2img", {"control_type": "normal"}, "the horde refuses this combination"),
        (SD2, "img2img", {"control_type": "hough"}, "the horde refuses this combination"),
        (SD2, "img2img", {"control_type": "seg"}, "no seg ControlNet for stable diffusion 2"),
        (SD1, "img2img", {"control_type": "sketch"}, "unknown control_type"),
        (SD1, "img2img", {"control_type": "canny", "image_is_control": True, "return_control_map": True},
         "source itself back"),
    ],
)
def test_refused_combinations_fault_with_the_reason(
    stack: ControlStack, picture: Image.Image, model: str, processing: str, payload: dict, reason: str
) -> None:
    with pytest.raises(RequestFault, match=reason):
        request_for(stack, model, picture, processing, **payload)


def test_sdxl_and_a_missing_source_fault(stack: ControlStack, picture: Image.Image) -> None:
    sdxl = ModelRecord(name="SDXL 1.0", baseline="stable_diffusion_xl")
    with pytest.raises(RequestFault, match="does not work with stable_diffusion_xl models"):
        request_for(stack, sdxl, picture, control_type="canny")  # type: ignore[arg-type]
    with pytest.raises(RequestFault, match="needs a source image"):
        request_for(stack, SD1, None, control_type="canny")


def test_mode_follows_denoising_strength_and_masks_are_reported(
    stack: ControlStack, picture: Image.Image
) -> None:
    request, _, _ = request_for(stack, SD1, picture, control_type="canny")
    assert request.mode == "txt2img" and request.control is not None and request.denoising_strength == 1.0
    mask = Image.new("L", (64, 64), 255)
    request, _, subs = request_for(stack, SD1, picture, mask=mask, control_type="canny",
                                   denoising_strength=0.5)
    assert request.mode == "img2img" and request.denoising_strength == 0.5 and request.mask == "none"
    assert any(s.field == "source_mask" and "do not use masks" in s.why for s in subs)
    request, _, subs = request_for(stack, SD1, picture, image_is_control=True)
    assert request.control is None and any(s.field == "control" for s in subs)
    request, _, subs = request_for(stack, SD1, picture, "outpainting", mask=mask, control_type="canny")
    assert request.mode == "txt2img" and request.control is not None  # the horde allows it: mask unused
    assert {s.field for s in subs} >= {"source_mask", "source_processing"}


def test_the_control_guides_the_image_deterministically(stack: ControlStack, picture: Image.Image) -> None:
    canny = run(stack, SD1, picture, control_type="canny")
    again = run(stack, SD1, picture, control_type="canny")
    assert encode_webp(canny.images[0].image) == encode_webp(again.images[0].image)
    hed = run(stack, SD1, picture, control_type="hed")
    other = run(stack, SD1, picture.rotate(90), control_type="canny")
    pixels = {encode_webp(r.images[0].image) for r in (canny, hed, other)}
    assert len(pixels) == 3  # another type or another control image: another picture
    assert canny.control.features == ("controlnet:canny",) and canny.control.annotator_s is not None


def test_image_is_control_skips_the_annotator_and_is_the_bare_controlnet_call(
    tiny_models_json: Path, tiny_controlnets: dict, picture: Image.Image, tmp_path: Path
) -> None:
    fresh = make_stack(tiny_models_json, tiny_controlnets, tmp_path)  # an empty cache: nothing loaded yet
    result = run(fresh, SD1, picture, control_type="hed", image_is_control=True)
    assert result.control.annotator_s is None and "image_is_control" in result.control.features
    assert not any(key.startswith("annotator:") for key in fresh.cache.resident())
    # The same job by hand: the model's modules, its diff ControlNet, the source as the map.
    request, _, _ = request_for(fresh, SD1, picture, control_type="hed", image_is_control=True)
    with fresh.models.pipeline(SD1) as base, fresh.controlnets.controlnet(
        BY_NAME["hed"], SD1, request.baseline, base.unet
    ) as controlnet:
        bare = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet, dtype=torch.float32)
        bare.scheduler = request.sampler.build(base.scheduler.config, request.seed)
        image = bare(request.prompt, image=fit_to(picture, 64, 64), num_inference_steps=2,
                     guidance_scale=request.cfg_scale, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
    assert encode_webp(image) == encode_webp(result.images[0].image)


def test_return_control_map_delivers_the_map_after_the_safety_pass(
    stack: ControlStack, picture: Image.Image, safety: Any, safety_checkers: dict
) -> None:
    result = run(stack, SD1, picture, control_type="canny", return_control_map=True, n_iter=2)
    expected = stack.controlnets.annotate(BY_NAME["canny"], picture)
    assert [r.image.tobytes() for r in result.images] == [expected.tobytes()] * 2
    assert result.control.returned_map and "return_control_map" in result.control.features
    # The map is what gets delivered, so it is what the safety step checks and censors.
    request, sources, _ = request_for(stack, SD1, picture, control_type="canny", return_control_map=True,
                                      use_nsfw_censor=True)
    runtime = stack.runtime(sd_safety_checker=True)
    runtime.safety, runtime.sd_safety_checker = safety, safety_checkers["flags"]
    censored = run_generation(runtime, request, sources)
    assert censored.images[0].original.tobytes() == expected.tobytes()
    check_images(runtime, request, censored.images)
    assert censored.images[0].state == "censored"
    assert censored.images[0].image.tobytes() != expected.tobytes()


def test_img2img_with_control_and_sd2_diff_controlnet(stack: ControlStack, picture: Image.Image) -> None:
    txt = run(stack, SD1, picture, control_type="scribble")
    img = run(stack, SD1, picture, control_type="scribble", denoising_strength=0.6)
    assert encode_webp(txt.images[0].image) != encode_webp(img.images[0].image)
    sd2 = run(stack, SD2, picture, control_type="depth")
    assert sd2.images[0].image.size == (64, 64)
    assert f"controlnet:diff_control_sd21_depth_fp16.safetensors@{SD2}" in stack.cache.resident()


def test_hires_fix_keeps_the_control_in_both_passes(stack: ControlStack, picture: Image.Image) -> None:
    result = run(stack, SD1, picture, control_type="canny", width=576, height=576, hires_fix=True,
                 ddim_steps=1)
    assert result.images[0].image.size == (576, 576)


def test_a_type_whose_weights_are_missing_faults_clearly(
    tiny_models_json: Path, tiny_controlnets: dict, picture: Image.Image, tmp_path: Path
) -> None:
    no_controlnets = {k: v for k, v in tiny_controlnets.items() if k != "controlnet"}
    bare = make_stack(tiny_models_json, no_controlnets, tmp_path)
    with pytest.raises(RequestFault, match="ControlNet canny is not ready"):
        run(bare, SD1, picture, control_type="canny")
    runtime = bare.runtime()
    runtime.controlnets = None
    request, sources, _ = request_for(bare, SD1, picture, control_type="canny")
    with pytest.raises(RequestFault, match="allow_controlnet"):
        run_generation(runtime, request, sources)


def test_past_the_deadline_the_controlnet_pass_stops_and_leaves_every_model_free(
    stack: ControlStack, picture: Image.Image
) -> None:
    before = run(stack, SD1, picture, control_type="canny")
    # Check points: after the annotator (tick 0), image 1 (tick 1), after step 1 (tick 2): past the deadline.
    with pytest.raises(Interrupted, match="during the ControlNet pass, image 1 of 1, after step 1: stopped"):
        run(stack, SD1, picture, Interrupt(deadline=2, clock=ticking()), control_type="canny")
    assert all(entry.locks == 0 for entry in stack.cache._entries.values())
    after = run(stack, SD1, picture, control_type="canny")
    assert encode_webp(after.images[0].image) == encode_webp(before.images[0].image)
