"""run_generation on the tiny models: each source_processing kind, hires fix, tiling, clip_skip, batches,
determinism and post-processing (the safety step that follows is tests/bridge/generation/test_censor.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from bridge.api_models import GenerationPayload
from bridge.generation.masks import prepare_sources
from bridge.generation.request import GenerationRequest, WorkerLimits, build_request
from bridge.generation.runner import GenerationResult, _borrowed, run_generation, steps_for
from bridge.generation.substitutions import Substitution
from bridge.images import encode_webp
from bridge.runtime import Runtime
from models.device import DevicePolicy
from models.interrupt import NEVER, Interrupt, Interrupted
from tests.bridge.generation.conftest import RecordingManager, make_runtime
from tests.models.test_interrupt import ticking

SD1 = "tiny-sd1-diffusers"


def run(
    runtime: Runtime,
    *,
    model: str = SD1,
    source: Image.Image | None = None,
    mask: Image.Image | None = None,
    processing: str | None = None,
    interrupt: Interrupt = NEVER,
    **payload: Any,
) -> tuple[GenerationRequest, GenerationResult, list[Substitution]]:
    fields = {
        "prompt": "a cat",
        "seed": "11",
        "width": 64,
        "height": 64,
        "ddim_steps": 2,
        "sampler_name": "k_euler",
    }
    fields.update(payload)
    sources, kind, subs = prepare_sources(source, mask, processing)
    record = runtime.models.record(model)
    request, more = build_request(
        GenerationPayload.model_validate(fields), record, kind, WorkerLimits(1024 * 1024), n_images=None
    )
    return request, run_generation(runtime, request, sources, interrupt), subs + more


def pixels(result: GenerationResult, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image)


def last_class(pipelines: RecordingManager) -> type | None:
    return pipelines.calls[-1][1]


def right_half_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return mask


def with_alpha(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The source with the mask's white area transparent (how clients send inpainting without a mask)."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    return rgba


def test_txt2img(runtime: Runtime, pipelines: RecordingManager) -> None:
    request, result, subs = run(runtime)
    assert last_class(pipelines) is StableDiffusionPipeline
    assert subs == [] and result.notes == []
    [image] = result.images
    assert image.image.size == (64, 64) and image.seed == 11 and image.state == "ok"
    assert result.inference_s > 0 and result.model_load_s > 0
    assert pixels(result).std() > 0


def test_img2img_uses_the_source_and_strength(runtime: Runtime, pipelines, source_image) -> None:
    _, base, _ = run(runtime, source=source_image, processing="img2img", denoising_strength=0.5)
    assert last_class(pipelines) is StableDiffusionImg2ImgPipeline
    flipped = source_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    _, other_source, _ = run(runtime, source=flipped, processing="img2img", denoising_strength=0.5)
    _, stronger, _ = run(runtime, source=source_image, processing="img2img", denoising_strength=1.0)
    assert not np.array_equal(pixels(base), pixels(other_source))
    assert not np.array_equal(pixels(base), pixels(stronger))


def test_img2img_source_is_stretched_to_the_asked_size(runtime: Runtime, source_image) -> None:
    request, result, _ = run(runtime, source=source_image.resize((96, 48)), processing="img2img", width=128)
    assert result.images[0].image.size == (128, 64)


def test_inpainting_model_with_mask(runtime: Runtime, pipelines, source_image) -> None:
    request, result, subs = run(
        runtime, model="tiny-inpainting", source=source_image, mask=right_half_mask(), processing="inpainting"
    )
    assert last_class(pipelines) is StableDiffusionInpaintPipeline
    assert (request.mode, request.mask) == ("inpaint", "given") and subs == []
    _, full, _ = run(runtime, model="tiny-inpainting", source=source_image, processing="inpainting")
    # No mask at all: the inpainting model repaints everything, and says so.
    assert not np.array_equal(pixels(result), pixels(full))


def test_inpainting_via_alpha_equals_the_same_mask_sent_as_source_mask(
    runtime: Runtime, source_image
) -> None:
    mask = right_half_mask()
    _, by_mask, _ = run(
        runtime, model="tiny-inpainting", source=source_image, mask=mask, processing="inpainting"
    )
    request, by_alpha, subs = run(
        runtime, model="tiny-inpainting", source=with_alpha(source_image, mask), processing="inpainting"
    )
    assert request.mask == "given" and subs == []
    assert np.array_equal(pixels(by_mask), pixels(by_alpha))


def test_outpainting_on_a_plain_model_is_masked_img2img_and_reported(
    runtime: Runtime, pipelines, source_image
) -> None:
    border = Image.new("L", (64, 64), 255)
    border.paste(0, (16, 16, 48, 48))  # keep the centre, paint the frame
    request, result, subs = run(
        runtime, source=with_alpha(source_image, border), processing="outpainting", denoising_strength=0.8
    )
    assert last_class(pipelines) is StableDiffusionInpaintPipeline
    with pipelines.pipeline(SD1) as pipe:
        assert pipe.unet.config.in_channels == 4
    assert request.mode == "inpaint" and [s.field for s in subs] == ["source_processing"]
    assert "masked img2img" in subs[0].to_metadata()["ref"]
    _, unmasked, _ = run(runtime, source=source_image, processing="img2img", denoising_strength=0.8)
    assert not np.array_equal(pixels(result), pixels(unmasked))


def test_depth2img_ignores_the_mask_and_reports_it(runtime: Runtime, pipelines, source_image) -> None:
    request, masked, subs = run(
        runtime, model="tiny-sd2-depth", source=source_image, mask=right_half_mask(), processing="img2img"
    )
    assert last_class(pipelines) is StableDiffusionDepth2ImgPipeline
    assert request.mode == "depth2img"
    assert [(s.field, s.used) for s in subs] == [("source_mask", None)]
    _, plain, _ = run(runtime, model="tiny-sd2-depth", source=source_image, processing="img2img")
    assert np.array_equal(pixels(masked), pixels(plain))


def test_hires_fix_runs_a_low_res_pass_then_img2img(runtime: Runtime, pipelines) -> None:
    # One step without guidance: the smallest size where SD1 hires fix applies is already 576 px.
    request, result, subs = run(
        runtime,
        width=576,
        height=640,
        hires_fix=True,
        hires_fix_denoising_strength=0.6,
        ddim_steps=1,
        cfg_scale=1,
    )
    assert subs == [] and request.first_pass == (512, 512)
    assert [cls for _, cls in pipelines.calls[-2:]] == [
        StableDiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
    ]
    assert result.images[0].image.size == (576, 640)


def test_tiling_wraps_convolutions_and_puts_them_back(runtime: Runtime, pipelines) -> None:
    _, tiled, _ = run(runtime, tiling=True)
    _, plain, _ = run(runtime)
    assert not np.array_equal(pixels(tiled), pixels(plain))
    with pipelines.pipeline(SD1) as pipe:
        convs = [m for name in ("unet", "vae") for m in getattr(pipe, name).modules()]
        assert {m.padding_mode for m in convs if isinstance(m, torch.nn.Conv2d)} == {"zeros"}


def test_tiling_makes_the_image_a_torus(runtime: Runtime, pipelines) -> None:
    """With circular padding every layer commutes with a circular shift: shifting the starting noise by
    2 latent pixels (the UNet's downsampling factor) shifts the image by 16 pixels. Not without it."""
    request, _, _ = run(runtime, tiling=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))

    def draw(req: GenerationRequest, noise: torch.Tensor) -> np.ndarray:
        with pipelines.pipeline(SD1) as pipe, _borrowed(pipe, req, runtime.device) as config:
            pipe.scheduler = req.sampler.build(config, 0)
            out = pipe("a cat", num_inference_steps=2, latents=noise, output_type="np", width=64, height=64)
        return out.images[0]

    shifted = torch.roll(latents, shifts=2, dims=3)
    wrapped = np.roll(draw(request, latents), shift=16, axis=1)
    np.testing.assert_allclose(draw(request, shifted), wrapped, atol=1e-4)
    flat = replace(request, tiling=False)
    assert np.abs(draw(flat, shifted) - np.roll(draw(flat, latents), shift=16, axis=1)).max() > 1e-2


def test_clip_skip_changes_the_image_and_is_capped_to_the_encoder(runtime: Runtime) -> None:
    _, last_layer, _ = run(runtime, clip_skip=1)
    _, penultimate, _ = run(runtime, clip_skip=2)
    assert not np.array_equal(pixels(last_layer), pixels(penultimate))
    _, capped, _ = run(runtime, clip_skip=12)
    assert [(n.field, n.asked, n.used) for n in capped.notes] == [("clip_skip", 12, 2)]
    assert np.array_equal(pixels(capped), pixels(penultimate))


def test_long_prompt_is_reported(runtime: Runtime) -> None:
    _, result, _ = run(runtime, prompt="a cat " * 100)
    assert [n.field for n in result.notes] == ["prompt"]


def test_batch_seed_rule_each_image_is_its_own_single_image_job(runtime: Runtime) -> None:
    request, batch, _ = run(runtime, n_iter=3, seed="100", sampler_name="k_euler_a")
    assert [i.seed for i in batch.images] == [100, 101, 102]
    assert [i.index for i in batch.images] == [0, 1, 2]
    _, alone, _ = run(runtime, seed="101", sampler_name="k_euler_a")
    assert np.array_equal(pixels(batch, 1), pixels(alone))
    assert not np.array_equal(pixels(batch, 0), pixels(batch, 1))


@pytest.mark.parametrize("sampler", ["k_euler_a", "k_dpmpp_sde"])
def test_same_request_same_bytes(runtime: Runtime, sampler: str) -> None:
    first = [encode_webp(i.image) for i in run(runtime, sampler_name=sampler, n_iter=2)[1].images]
    second = [encode_webp(i.image) for i in run(runtime, sampler_name=sampler, n_iter=2)[1].images]
    assert first == second


def test_post_processing_in_order_and_unavailable_ones_reported(pipelines, tmp_path_factory) -> None:
    from models.cache import ModelCache
    from models.device import DevicePolicy
    from postprocessors.registry import PostProcessorRegistry
    from postprocessors.tiny import build_tiny_postprocessors

    weights = tmp_path_factory.mktemp("gen-pp")
    build_tiny_postprocessors(weights, categories=["esrgan"])
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=512 * 2**20)
    runtime = make_runtime(pipelines)
    runtime.postprocessors = PostProcessorRegistry(
        weights_dir=weights, cache=cache, device=DevicePolicy.cpu()
    )
    _, result, _ = run(runtime, post_processing=["RealESRGAN_x2plus", "GFPGAN"])
    image = result.images[0]
    assert image.image.size == (128, 128)
    assert image.original is not None and image.original.size == (64, 64)  # what the safety pass reads
    refs = [m["ref"] for m in image.metadata]
    assert refs == ["post-processor GFPGAN is not available on this worker: skipped"]


def test_post_processing_without_registry_is_skipped_and_reported(runtime: Runtime) -> None:
    _, result, _ = run(runtime, post_processing=["GFPGAN"])
    assert result.images[0].image.size == (64, 64)
    assert result.images[0].metadata[0]["ref"].startswith("post-processor GFPGAN is not available")


def test_large_images_decode_in_vae_tiles_on_cuda_only(runtime: Runtime, pipelines: RecordingManager) -> None:
    request, _, _ = run(runtime)
    large = replace(request, width=1024, height=1024)
    cuda = DevicePolicy(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=True)
    with pipelines.pipeline(SD1) as pipe:
        for policy, size_request, tiles in (
            (cuda, large, True),
            (cuda, request, False),
            (runtime.device, large, False),
        ):
            with _borrowed(pipe, size_request, policy):
                assert pipe.vae.use_tiling is tiles
            assert pipe.vae.use_tiling is False


@pytest.mark.parametrize(
    ("steps", "strength", "expected"), [(30, 0.5, 30), (2, 0.5, 2), (1, 0.6, 2), (1, 0.1, 10)]
)
def test_img2img_passes_run_at_least_one_step(steps: int, strength: float, expected: int) -> None:
    assert steps_for(steps, strength) == expected
    assert int(steps_for(steps, strength) * strength) >= 1


# --- past the job's deadline (models.interrupt) ----------------------------------------------------------


def unlocked(pipelines: RecordingManager, model: str = SD1) -> bool:
    """Whether no one holds the model in the cache (an interrupted run must not keep it locked)."""
    return pipelines._cache._entries[model].locks == 0


def test_past_the_deadline_the_run_stops_mid_steps_and_leaves_the_pipeline_as_found(
    runtime: Runtime, pipelines: RecordingManager
) -> None:
    _, before, _ = run(runtime, ddim_steps=6)
    # Check points: image 1 (tick 0), then after each step (ticks 1, 2, 3): the third step is the last.
    with pytest.raises(Interrupted, match=r"ran out during generation, image 1 of 1, after step 3: stopped"):
        run(runtime, ddim_steps=6, interrupt=Interrupt(deadline=3, clock=ticking()))
    assert unlocked(pipelines)
    _, after, _ = run(runtime, ddim_steps=6)
    assert encode_webp(after.images[0].image) == encode_webp(before.images[0].image)


def test_past_the_deadline_the_next_image_of_a_batch_is_not_started(runtime: Runtime) -> None:
    with pytest.raises(Interrupted, match=r"during generation, image 2 of 3: stopped"):
        run(runtime, n_iter=3, interrupt=Interrupt(deadline=3, clock=ticking()))  # 2 steps per image


def test_past_the_deadline_the_hires_fix_pass_stops(runtime: Runtime, pipelines: RecordingManager) -> None:
    def clock() -> float:  # the deadline passes once the second pass has its pipeline
        return float(last_class(pipelines) is StableDiffusionImg2ImgPipeline)

    with pytest.raises(Interrupted, match=r"during the hires-fix pass, image 1 of 1: stopped"):
        run(runtime, width=576, height=640, hires_fix=True, ddim_steps=1, cfg_scale=1,
            interrupt=Interrupt(deadline=1, clock=clock))
    assert unlocked(pipelines)
