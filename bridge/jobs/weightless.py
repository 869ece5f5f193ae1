"""The weightless alchemy forms: vectorize, palette, describe. Plain image libraries, no model weights.

Each form's result is a pure function of the decoded source (its job class in bridge/jobs/alchemy.py only
wraps it), so a CPU alchemist serves them at once and bench/forms.py can call the same function bare.
Result shapes (the horde stores any JSON object; these are what the current peers submit):

    vectorize -> {"vectorize": "<svg ...>"}   vtracer on a PNG of the source: colour, stacked, spline, its
                                              other defaults
    palette   -> {"palette": {"colors": [{"hex": "#rrggbb", "proportion": 0.4123}, ...]}}
                 at most 6 colours, most prominent first: the RGB image fitted in 256x256, median-cut
                 quantized; proportion = pixels of that colour / all pixels, 4 decimals
    describe  -> {"describe": {"blurhash", "phash", "dhash", "width", "height", "aspect_ratio",
                               "has_alpha", "format"}}
                 blurhash with 4x3 components (of a copy fitted in 64x64: blurhash keeps only the 12 lowest
                 frequencies, and the pure-Python encoder costs a few microseconds per pixel); perceptual and
                 difference hashes at imagehash's default size (8: 16 hex digits)
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

from PIL import Image

PALETTE_COLORS = 6
PALETTE_FIT = 256
BLURHASH_COMPONENTS = (4, 3)
BLURHASH_FIT = 64


def vectorize(image: Image.Image) -> str:
    import vtracer

    buffer = io.BytesIO()
    # compress_level 1: the PNG is only a hand-over to vtracer, which decodes it at once.
    image.save(buffer, format="PNG", compress_level=1)
    return vtracer.convert_raw_image_to_svg(
        buffer.getvalue(), img_format="png", colormode="color", hierarchical="stacked", mode="spline"
    )


def palette(image: Image.Image) -> dict[str, Any]:
    rgb = image.convert("RGB")
    rgb.thumbnail((PALETTE_FIT, PALETTE_FIT), Image.Resampling.LANCZOS)
    quantized = rgb.quantize(colors=PALETTE_COLORS, method=Image.Quantize.MEDIANCUT)
    flat = quantized.getpalette() or []
    total = rgb.width * rgb.height
    counts = sorted(quantized.getcolors(PALETTE_COLORS) or [], key=lambda item: (-item[0], item[1]))
    colors = []
    for count, index in counts:
        red, green, blue = flat[3 * index : 3 * index + 3]
        colors.append({"hex": f"#{red:02x}{green:02x}{blue:02x}", "proportion": round(count / total, 4)})
    return {"colors": colors}


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )


def describe(image: Image.Image) -> dict[str, Any]:
    import blurhash
    import imagehash
    import numpy as np

    width, height = image.size
    small = image.convert("RGB")
    small.thumbnail((BLURHASH_FIT, BLURHASH_FIT), Image.Resampling.BOX)
    x_components, y_components = BLURHASH_COMPONENTS
    return {
        "blurhash": blurhash.encode(np.asarray(small), components_x=x_components, components_y=y_components),
        "phash": str(imagehash.phash(image)),
        "dhash": str(imagehash.dhash(image)),
        "width": width,
        "height": height,
        "aspect_ratio": round(width / height, 4) if height else None,
        "has_alpha": has_alpha(image),
        "format": image.format,
    }


COMPUTE: dict[str, Callable[[Image.Image], Any]] = {
    "vectorize": vectorize,
    "palette": palette,
    "describe": describe,
}
_LIBRARIES = {"vectorize": ("vtracer",), "palette": (), "describe": ("imagehash", "blurhash")}


def available_forms() -> list[str]:
    """The weightless forms whose libraries import here. They are pinned requirements; a broken install
    should cost those forms (logged as not offered), not the worker. Looked up once per process: the loop
    asks before every pop, and finding a module not imported yet reads every folder on sys.path."""
    return list(_available_forms())


@functools.cache
def _available_forms() -> tuple[str, ...]:
    import importlib.util

    return tuple(
        form
        for form, modules in _LIBRARIES.items()
        if all(importlib.util.find_spec(module) is not None for module in modules)
    )
