"""The one post-processor interface, its result, its error, and the image guards every processor shares."""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from models.interrupt import NEVER, Interrupt

logger = logging.getLogger(__name__)

# Input bound for every processor: the same as bridge.sources.SourceFetcher's default, so that an image the
# fetcher accepted is never refused here for size alone.
MAX_INPUT_PIXELS = 4096 * 4096
# Output bound for upscalers: 2048² ×4 (or 4096² ×2). One 8192² RGB result is 192 MiB as uint8; the
# horde's max_tiles (80 tiles of 512² by default) stays well below it.
MAX_OUTPUT_PIXELS = 8192 * 8192


class PostProcessError(Exception):
    """A post-processor cannot handle this image (corrupt, too large, unusable mode, missing weights).

    The job layer turns it into a faulted submit; `reason` is a short machine-readable kind.
    """

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PostProcessResult:
    image: Image.Image
    # gen_metadata entries, e.g. {"type": "information", "value": "see_ref", "ref": "no face found"}
    metadata: list[dict[str, str]] = field(default_factory=list)


def information(ref: str) -> dict[str, str]:
    """A gen_metadata entry the horde shows the requester as a note (ref is at most 255 characters)."""
    return {"type": "information", "value": "see_ref", "ref": ref[:255]}


class PostProcessor(abc.ABC):
    name: ClassVar[str]
    # Output size ÷ input size (1 for face fixers and strip_background).
    scale: ClassVar[int] = 1

    @abc.abstractmethod
    def process(
        self, image: Image.Image, *, strength: float | None = None, interrupt: Interrupt = NEVER
    ) -> PostProcessResult:
        """Return the processed image; raise PostProcessError for an image it cannot handle. A processor
        that loops (tiles, faces) checks `interrupt` between its units (models.interrupt.Interrupted)."""


def checked_image(image: Image.Image, *, scale: int = 1, name: str = "post-processor") -> Image.Image:
    """The image decoded, in RGB or RGBA, within the pixel bounds; else a PostProcessError.

    PIL opens lazily: a truncated or corrupt file only fails when its pixels are read, so read them here,
    once, where the failure can be named.
    """
    if not isinstance(image, Image.Image):
        raise PostProcessError(
            f"{name}: expected a PIL image, got {type(image).__name__}", reason="parse_failed"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise PostProcessError(f"{name}: empty image ({width}x{height})", reason="parse_failed")
    pixels = width * height
    if pixels > MAX_INPUT_PIXELS:
        raise PostProcessError(
            f"{name}: image of {width}x{height} exceeds the bound of {MAX_INPUT_PIXELS} pixels",
            reason="too_large",
        )
    if pixels * scale * scale > MAX_OUTPUT_PIXELS:
        raise PostProcessError(
            f"{name}: a x{scale} upscale of {width}x{height} exceeds the output bound of "
            f"{MAX_OUTPUT_PIXELS} pixels",
            reason="too_large",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated / malformed data
        raise PostProcessError(f"{name}: corrupt image: {exc}", reason="parse_failed") from exc
    return _rgb_or_rgba(image, name)


def _rgb_or_rgba(image: Image.Image, name: str) -> Image.Image:
    if image.mode in ("RGB", "RGBA"):
        return image
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit greyscale: scale down to 8 bits rather than clip (PIL's convert clips at 255).
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            return Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
        has_alpha = image.mode in ("LA", "PA", "La") or (image.mode == "P" and "transparency" in image.info)
        return image.convert("RGBA" if has_alpha else "RGB")
    except (OSError, ValueError) as exc:
        raise PostProcessError(
            f"{name}: unusable image mode {image.mode}: {exc}", reason="parse_failed"
        ) from exc


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, alpha band or None)."""
    if image.mode == "RGBA":
        return image.convert("RGB"), image.getchannel("A")
    return image, None


def join_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        # Alpha is smooth and low-detail: a bicubic resize (Real-ESRGAN's cheap alpha mode) is enough.
        alpha = alpha.resize(rgb.size, Image.Resampling.BICUBIC)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a (possibly cache-moved) module's weights live now, and in which dtype."""
    param = next(module.parameters())
    return param.device, param.dtype


def pil_to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) tensor in [0, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only buffers
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    return tensor.to(device=device).to(dtype=dtype).div_(255.0)


def tensor_to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> (H, W, 3) uint8 array, rounded, on the CPU."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    out = tensor.float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return out.permute(1, 2, 0).cpu().numpy()
