"""The ControlNet step of a generation: the control map, then the map itself or the images it guides.

The ControlNet pipelines are composed from the job's loaded model (its `pipeline()` variant: the same UNet,
VAE, text encoder, a fresh scheduler) plus the ControlNet from the model cache; nothing is copied. Each image
is its own call with a CPU generator seeded `request.seed_for(i)`, as every generation is, and the pipeline
is borrowed like the plain ones (scheduler, tiling and VAE tiling put back afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline
from PIL import Image

from bridge.generation.control_request import CONTROL_STRENGTH
from bridge.generation.masks import SourceImages, fit_to
from bridge.generation.request import GenerationRequest, RequestFault
from bridge.generation.runner import (
    Clock,
    _borrowed,
    _common_kwargs,
    _note_long_prompt,
    call_per_image,
    lora_step,
    steps_for,
    upscaled_inputs,
)
from bridge.generation.substitutions import Substitution
from controlnet import ControlNotReadyError, control_type
from controlnet.annotators import AnnotatorLoadError
from controlnet.loading import ControlNetLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlOutcome:
    """What the ControlNet step did, for the log, the stats and the submit's metadata."""

    control_type: str
    annotator_s: float | None  # None: image_is_control, the annotator was skipped
    returned_map: bool
    features: tuple[str, ...]


def run_control(
    runtime: Any, request: GenerationRequest, sources: SourceImages, notes: list[Substitution], clock: Clock
) -> tuple[list[Image.Image], ControlOutcome]:
    """1. the control map at the job's size (the annotator, or with image_is_control the source itself),
    2. return_control_map: the map is the image of every id, 3. otherwise the ControlNet pipeline, one call
    per image, and the hires-fix pass with the same control."""
    control = request.control
    if control is None or sources.image is None:
        raise RequestFault("not a ControlNet job with a usable source image")
    if runtime.controlnets is None:
        raise RequestFault("ControlNet is not enabled on this worker (allow_controlnet is false)")
    control_map, annotator_s = _control_map(runtime, request, sources.image)
    clock.interrupt.check(f"the control {control.control_type} annotator")
    outcome = ControlOutcome(control.control_type, annotator_s, control.return_control_map,
                             tuple(control.features))
    if control.return_control_map:
        logger.info("control %s: return_control_map: submitting the %dx%d map", control.control_type,
                    *control_map.size)
        return [control_map.copy() for _ in range(request.n_images)], outcome
    try:
        images = _generate(runtime, request, sources, control_map, notes, clock)
        if request.hires_fix:
            images = _hires_pass(runtime, request, images, control_map, clock)
    except (ControlNotReadyError, ControlNetLoadError) as exc:
        raise RequestFault(str(exc)) from exc
    return images, outcome


def _control_map(
    runtime: Any, request: GenerationRequest, source: Image.Image
) -> tuple[Image.Image, float | None]:
    control = request.control
    assert control is not None
    fitted = fit_to(source, request.width, request.height).convert("RGB")
    if control.image_is_control:
        logger.info("control %s: image_is_control: the source is the map (annotator skipped)",
                    control.control_type)
        return fitted, None
    kind = control_type(control.control_type)
    assert kind is not None
    started = time.perf_counter()
    try:
        control_map = runtime.controlnets.annotate(kind, fitted)
    except (ControlNotReadyError, AnnotatorLoadError) as exc:
        raise RequestFault(str(exc)) from exc
    elapsed = time.perf_counter() - started
    logger.info("control %s: %s annotator made the %dx%d map in %.2f s", control.control_type, kind.annotator,
                *control_map.size, elapsed)
    return control_map, elapsed


@contextlib.contextmanager
def _control_pipeline(
    runtime: Any, request: GenerationRequest, cls: type, clock: Clock
) -> Iterator[tuple[Any, Any]]:
    """The model's own pipeline variant with the ControlNet added (time to get both counted as model
    load), borrowed for this request."""
    assert request.control is not None
    kind = control_type(request.control.control_type)
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        base = held.enter_context(runtime.models.pipeline(request.model))
        # A diff ControlNet is made from the model's published weights (and cached per model): no LoRA an
        # earlier job left merged may be in them while it is.
        with lora_step(runtime, replace(request, extras=None), base):
            controlnet = held.enter_context(
                runtime.controlnets.controlnet(kind, request.model, request.baseline, base.unet))
        pipe = cls.from_pipe(base, controlnet=controlnet, dtype=runtime.device.dtype)
        pipe.set_progress_bar_config(disable=True)
        clock.model_load_s += time.perf_counter() - started
        config = held.enter_context(_borrowed(pipe, request, runtime.device))
        held.enter_context(lora_step(runtime, request, pipe))  # then the job's own LoRAs, as any job's
        yield pipe, config


def _generate(
    runtime: Any,
    request: GenerationRequest,
    sources: SourceImages,
    control_map: Image.Image,
    notes: list[Substitution],
    clock: Clock,
) -> list[Image.Image]:
    width, height = request.first_pass or (request.width, request.height)
    img2img = request.mode == "img2img"
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    with _control_pipeline(runtime, request, cls, clock) as (pipe, config):
        fixed = _common_kwargs(pipe, request, notes)
        _note_long_prompt(pipe, request, notes)
        guide = control_map.resize((width, height), Image.Resampling.BILINEAR)
        fixed.update(width=width, height=height, controlnet_conditioning_scale=CONTROL_STRENGTH)
        if img2img:
            strength = request.denoising_strength
            fixed.update(image=fit_to(sources.image, width, height), control_image=guide, strength=strength,
                         num_inference_steps=steps_for(request.steps, strength))
        else:
            fixed.update(image=guide)
        return call_per_image(runtime, pipe, config, request, clock, "the ControlNet pass", fixed,
                              [{}] * request.n_images)


def _hires_pass(
    runtime: Any,
    request: GenerationRequest,
    low_res: list[Image.Image],
    control_map: Image.Image,
    clock: Clock,
) -> list[Image.Image]:
    """Upscale each first-pass image and refine it at the asked size, still guided by the control map."""
    strength = request.hires_denoising_strength
    cls = StableDiffusionControlNetImg2ImgPipeline
    with _control_pipeline(runtime, request, cls, clock) as (pipe, config):
        fixed = _common_kwargs(pipe, request, [])
        fixed.update(strength=strength, num_inference_steps=steps_for(request.steps, strength),
                     control_image=control_map, width=request.width, height=request.height,
                     controlnet_conditioning_scale=CONTROL_STRENGTH)
        return call_per_image(runtime, pipe, config, request, clock, "the ControlNet hires-fix pass", fixed,
                              upscaled_inputs(request, low_res))
