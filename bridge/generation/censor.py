"""The safety step of a generation: every image is checked before anything of it leaves the worker.

The safety pass (`interrogators.safety.SafetyPass`: the horde's CSAM/NSFW decision and the aesthetic score
from one CLIP embedding) reads each original image, as generated, before post-processing. Whatever the
worker's `nsfw` setting:
* CSAM: the image is replaced by a placeholder (the original never leaves the machine), state `csam`,
  `{"type": "censorship", "value": "csam"}` (the horde records the requester as a problem user).
* NSFW that must be censored (`censor_reason`: an SFW worker, the request's `use_nsfw_censor`, the
  operator's `censor_nsfw`, a `censorlist` word in the prompt): placeholder, state `censored`,
  `{"type": "censorship", "value": "nsfw"}` (the horde only marks an image censored through that entry).
* NSFW otherwise: the image is kept with `{"type": "information", "value": "nsfw"}`.
* Every image that is kept carries `{"type": "aesthetic_score", "value": "see_ref", "ref": "<score>"}`
  unless the operator turned `send_aesthetic_score` off.
With `sd_safety_checker` on, Stable Diffusion's own checker also reads the images that would be censored if
NSFW; an image it flags is censored too (a second opinion, never a replacement).

Any failure (no safety pass on this worker, a model that fails to load, an exception) raises
`SafetyFailed`: the job is faulted with the reason, and no unchecked image is submitted.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image, ImageDraw

from bridge.generation.request import GenerationRequest
from bridge.generation.runner import GeneratedImage

logger = logging.getLogger(__name__)

CSAM_METADATA = {"type": "censorship", "value": "csam"}
CENSORED_METADATA = {"type": "censorship", "value": "nsfw"}
NSFW_INFORMATION = {"type": "information", "value": "nsfw"}
CENSOR_BACKGROUND = (64, 64, 64)
CSAM_BACKGROUND = (24, 24, 24)
CENSOR_TEXT = (235, 235, 235)


class SafetyFailed(Exception):
    """The images could not be checked: the job must fault rather than submit them."""


def censor_reason(*, use_nsfw_censor: bool, prompt: str, config: Any) -> str | None:
    """Why an NSFW image of this request must be censored, or None when it may be delivered."""
    if use_nsfw_censor:
        return "requested by the client"
    if not getattr(config, "nsfw", True):
        return "SFW worker"
    if getattr(config, "censor_nsfw", False):
        return "censor_nsfw"
    positive = prompt.split("###", 1)[0].lower()
    for word in getattr(config, "censorlist", None) or []:
        if word and word.lower() in positive:
            return "censorlist"
    return None


def placeholder(width: int, height: int, text: str = "censored", background=CENSOR_BACKGROUND) -> Image.Image:
    """A flat image with a word written across it, at the generated size."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(((width - (right - left)) / 2, (height - (bottom - top)) / 2), text, fill=CENSOR_TEXT)
    return image


def censored_image(width: int, height: int) -> Image.Image:
    return placeholder(width, height)


def csam_image(width: int, height: int) -> Image.Image:
    return placeholder(width, height, "removed", CSAM_BACKGROUND)


def aesthetic_metadata(score: float) -> dict[str, str]:
    return {"type": "aesthetic_score", "value": "see_ref", "ref": f"{score:.4f}"}


def _second_opinion(runtime: Any, images: list[GeneratedImage], reason: str | None) -> list[bool]:
    """Stable Diffusion's checker on the images to censor if NSFW, when the operator asked for it."""
    if reason is None or not getattr(runtime.config, "sd_safety_checker", False):
        return [False] * len(images)
    checker = getattr(runtime, "sd_safety_checker", None)
    if checker is None:
        raise SafetyFailed("sd_safety_checker is on but Stable Diffusion's safety checker is not loaded")
    flags = [bool(f) for f in checker.is_nsfw([g.original for g in images])]
    if len(flags) != len(images):
        raise SafetyFailed(f"the SD safety checker returned {len(flags)} flags for {len(images)} images")
    return flags


def check_images(runtime: Any, request: GenerationRequest, images: list[GeneratedImage]) -> None:
    """Run the safety pass on the originals and apply its outcomes to `images` (state, image, metadata)."""
    safety = runtime.safety
    if safety is None or not safety.can_decide:
        raise SafetyFailed("this worker has no safety pass: generated images cannot be checked")
    score = bool(getattr(runtime.config, "send_aesthetic_score", True))
    reason = censor_reason(
        use_nsfw_censor=request.use_nsfw_censor, prompt=request.prompt, config=runtime.config
    )
    try:
        results = safety.check([g.original for g in images], request.negative_prompt, aesthetic=score)
        second = _second_opinion(runtime, images, reason)
    except SafetyFailed:
        raise
    except Exception as exc:
        logger.exception("the safety pass failed")
        raise SafetyFailed(f"safety pass failed: {type(exc).__name__}: {exc}") from exc
    if len(results) != len(images):
        raise SafetyFailed(f"the safety pass returned {len(results)} results for {len(images)} images")
    for generated, result, flagged in zip(images, results, second, strict=True):
        width, height = generated.original.size
        verdict = result.verdict
        if verdict.is_csam:
            generated.image, generated.state = csam_image(width, height), "csam"
            generated.metadata.insert(0, dict(CSAM_METADATA))
            logger.warning("image %d is potential CSAM: replaced, the original is discarded", generated.index)
        elif (verdict.is_nsfw or flagged) and reason is not None:
            generated.image, generated.state = censored_image(width, height), "censored"
            generated.metadata.insert(0, dict(CENSORED_METADATA))
            logger.info("image %d censored (%s)", generated.index, reason)
        else:
            if verdict.is_nsfw:
                generated.metadata.insert(0, dict(NSFW_INFORMATION))
            if result.aesthetic is not None:
                generated.metadata.append(aesthetic_metadata(result.aesthetic))
        if generated.state != "ok":
            generated.original = None  # nothing of a replaced image is kept past this point
