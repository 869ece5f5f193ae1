"""Helpers shared by the three interrogators: tolerant payload values, inputs onto the model's device."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

logger = logging.getLogger(__name__)


def option_int(options: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """An int payload value clamped to [low, high]; junk (a string, a bool, null) gives the default, because a
    requester's typo must not fault the form."""
    value = options.get(key)
    if isinstance(value, bool) or value is None:
        return default
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        logger.debug("payload %s=%r is not a number; using %s", key, value, default)
        return default
    return max(low, min(high, number))


def option_float(
    options: Mapping[str, Any], key: str, default: float | None, low: float, high: float
) -> float | None:
    value = options.get(key)
    if isinstance(value, bool) or value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        logger.debug("payload %s=%r is not a number; using %s", key, value, default)
        return default
    if number != number:  # NaN
        return default
    return max(low, min(high, number))


def option_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return default


def rgb(image: Image.Image) -> Image.Image:
    """Every model here expects 3-channel input; sources arrive as RGBA webp, palette GIFs, greyscale..."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent areas over white, like a viewer shows them (plain convert would expose hidden colours).
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def module_place(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the cache put the module right now (it moves weights between RAM and VRAM underneath us)."""
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (projected features in pooler_output);
    older versions returned the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class WeightsMismatch(ValueError):
    """A weights file whose sha256 differs from the reference's."""


def require_sha256(path: Path, sha256: str | None) -> None:
    """Refuse a weights file that is not the reference's (before unpickling it). The downloader's sidecar
    makes this a stat, not a re-hash, for a file it verified."""
    if sha256 is None:
        return
    from models.downloads import verify_file

    if not verify_file(path, sha256):
        raise WeightsMismatch(f"{path} does not have the sha256 {sha256} of the reference")
