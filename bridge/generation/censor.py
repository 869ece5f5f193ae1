"""NSFW censoring of generated images (the legacy worker's three triggers).

An image is checked when any of these holds:
* the request asks for it (`use_nsfw_censor`, sent for SFW requests),
* the worker is SFW and its operator asked for censoring (`censor_nsfw` true and `nsfw` false: the
  legacy rule),
* the positive prompt contains a word of the operator's `censorlist` (case-insensitive).
The check is `runtime.safety.is_nsfw(images)`. A flagged image is replaced by a flat grey image that
says so, its state is `censored` and it carries `{"type": "censorship", "value": "nsfw"}` (the horde only
marks an image censored through that entry). A required check without a safety checker faults the job:
returning an unchecked image to an SFW request is the one outcome that must not happen.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CENSORED_METADATA = {"type": "censorship", "value": "nsfw"}
CENSOR_BACKGROUND = (64, 64, 64)
CENSOR_TEXT = (235, 235, 235)


class CensorUnavailable(Exception):
    """A censor check is required but this worker has no safety checker."""


def censor_reason(*, use_nsfw_censor: bool, prompt: str, config: Any) -> str | None:
    """Why these images must be checked, or None when they need not be."""
    if use_nsfw_censor:
        return "requested by the client"
    if getattr(config, "censor_nsfw", False) and not getattr(config, "nsfw", True):
        return "SFW worker"
    positive = prompt.split("###", 1)[0].lower()
    for word in getattr(config, "censorlist", None) or []:
        if word and word.lower() in positive:
            return "censorlist"
    return None


def check(images: list[Image.Image], checker: Any, reason: str) -> list[bool]:
    """One flag per image from the safety checker."""
    if checker is None:
        raise CensorUnavailable(f"NSFW check required ({reason}) but no safety checker is loaded")
    flags = [bool(f) for f in checker.is_nsfw(images)]
    if len(flags) != len(images):
        raise RuntimeError(f"safety checker returned {len(flags)} flags for {len(images)} images")
    if any(flags):
        logger.info("censored %d of %d images (%s)", sum(flags), len(images), reason)
    return flags


def censored_image(width: int, height: int) -> Image.Image:
    """A flat image with 'censored' written across it, at the generated size."""
    image = Image.new("RGB", (width, height), CENSOR_BACKGROUND)
    draw = ImageDraw.Draw(image)
    text = "censored"
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(((width - (right - left)) / 2, (height - (bottom - top)) / 2), text, fill=CENSOR_TEXT)
    return image
