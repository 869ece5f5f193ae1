"""Source and mask conventions: source_mask white = repaint, transparent pixels = repaint."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bridge.generation.masks import alpha_mask, prepare_sources
from bridge.generation.request import SourceKind


def test_no_source_is_txt2img() -> None:
    sources, kind, subs = prepare_sources(None, Image.new("L", (8, 8)), "inpainting")
    assert kind == SourceKind() and sources.image is None and subs == []


def test_opaque_alpha_is_no_mask() -> None:
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    sources, kind, _ = prepare_sources(opaque, None, "img2img")
    assert kind == SourceKind("img2img", None) and sources.mask is None
    assert sources.image.mode == "RGB"


def test_transparent_pixels_become_the_repaint_mask() -> None:
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    image.putpixel((2, 3), (0, 0, 0, 0))
    sources, kind, _ = prepare_sources(image, None, "outpainting")
    assert kind == SourceKind("outpainting", "alpha")
    mask = np.asarray(sources.mask)
    assert mask[3, 2] == 255 and mask.sum() == 255


def test_palette_transparency_counts_as_alpha() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.info["transparency"] = 1
    assert np.asarray(alpha_mask(image)).min() == 255


def test_mask_wins_over_alpha_and_is_resized_when_the_shape_matches() -> None:
    image = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    sources, kind, subs = prepare_sources(image, Image.new("RGB", (32, 16), "white"), "inpainting")
    assert kind.mask == "mask" and sources.mask.size == (64, 32)
    assert [(s.field, s.used, s.meta_type) for s in subs] == [("source_mask", "64x32", "information")]


def test_mask_of_another_shape_is_parse_failed_and_alpha_takes_over() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    sources, kind, subs = prepare_sources(image, Image.new("L", (64, 16), 255), "inpainting")
    assert kind.mask == "alpha"
    assert [s.to_metadata()["value"] for s in subs] == ["parse_failed"]
    assert subs[0].to_metadata()["type"] == "source_mask"
