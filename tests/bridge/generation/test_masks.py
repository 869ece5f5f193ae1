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


def test_outpainting_extends_a_source_of_another_shape_and_paints_the_border() -> None:
    source = Image.new("RGBA", (40, 64), (200, 20, 20, 255))
    source.putpixel((0, 0), (0, 0, 0, 0))  # one transparent pixel: painted too
    sources, kind, subs = prepare_sources(source, None, "outpainting", (128, 64))
    assert kind.mask == "extended" and kind.processing == "outpainting"
    assert sources.image.size == sources.mask.size == (128, 64) and sources.image.mode == "RGB"
    mask = np.asarray(sources.mask)
    assert (mask[:, :44] == 255).all() and (mask[:, 84:] == 255).all()  # the new border
    assert mask[0, 44] == 255 and (mask[1:, 44:84] == 0).all()  # the source: kept but its transparent pixel
    assert np.asarray(sources.image)[10, 0].tolist() == [200, 20, 20]  # the border continues the edge
    assert "extended to the asked shape" in subs[0].to_metadata()["ref"]
    # Already the asked shape (up to 2%): plain inpainting of its transparent pixels, nothing extended.
    same = prepare_sources(source, None, "outpainting", (40, 64))
    assert same[1].mask == "alpha" and same[0].image.size == (40, 64) and same[2] == []
    # img2img never extends.
    assert prepare_sources(source, None, "img2img", (128, 64))[0].image.size == (40, 64)
