from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bridge.horde_names import UPSCALER_SCALES as SCALES
from postprocessors import MAX_INPUT_PIXELS, PostProcessError, PostProcessorRegistry
from postprocessors.registry import UPSCALER_NAMES
from tests.postprocessors.helpers import cpu_cache, picture, tiny_registry


def test_every_horde_upscaler_is_served() -> None:
    assert set(UPSCALER_NAMES) == set(SCALES)


@pytest.mark.parametrize("name", list(SCALES))
def test_output_is_exactly_scaled_rgb(registry: PostProcessorRegistry, name: str) -> None:
    # Odd sizes: x2plus pads to its pixel-unshuffle multiple inside and must crop back exactly.
    image = picture((37, 23))
    result = registry.get(name).process(image)
    assert result.image.size == (37 * SCALES[name], 23 * SCALES[name])
    assert result.image.mode == "RGB"
    assert result.metadata == []
    # Random weights still produce a picture, not a constant: the network really ran.
    assert np.asarray(result.image).std() > 1.0


@pytest.mark.parametrize("name", ["RealESRGAN_x4plus", "RealESRGAN_x2plus"])
def test_alpha_is_kept_and_resized(registry: PostProcessorRegistry, name: str) -> None:
    image = picture((32, 24), mode="RGBA")
    alpha = np.full((24, 32), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # left half transparent
    image.putalpha(Image.fromarray(alpha, "L"))
    scale = SCALES[name]
    result = registry.get(name).process(image).image
    assert result.mode == "RGBA"
    assert result.size == (32 * scale, 24 * scale)
    out_alpha = np.asarray(result.getchannel("A"))
    edge = 16 * scale
    assert (out_alpha[:, : edge - 3 * scale] == 0).all()
    assert (out_alpha[:, edge + 3 * scale :] == 255).all()


def test_grey_and_palette_images_are_accepted(registry: PostProcessorRegistry) -> None:
    upscaler = registry.get("RealESRGAN_x2plus")
    assert upscaler.process(picture((20, 10), mode="L")).image.mode == "RGB"
    palette = picture((20, 10)).convert("P")
    assert upscaler.process(palette).image.size == (40, 20)


def test_corrupt_image_raises_typed_error(registry: PostProcessorRegistry) -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))  # header intact, pixel data cut off
    with pytest.raises(PostProcessError) as info:
        registry.get("RealESRGAN_x4plus").process(truncated)
    assert info.value.reason == "parse_failed"
    assert "corrupt" in str(info.value)


def test_huge_input_raises_before_any_work(registry: PostProcessorRegistry) -> None:
    side = int(MAX_INPUT_PIXELS**0.5) + 1
    huge = Image.new("RGB", (side, side))
    with pytest.raises(PostProcessError) as info:
        registry.get("RealESRGAN_x2plus").process(huge)
    assert info.value.reason == "too_large"


def test_upscale_beyond_output_bound_raises(registry: PostProcessorRegistry) -> None:
    # 2100² is a fine input, but x4 of it passes the 8192² output bound.
    with pytest.raises(PostProcessError, match="output bound") as info:
        registry.get("RealESRGAN_x4plus").process(Image.new("RGB", (2100, 2100)))
    assert info.value.reason == "too_large"


def _registry_with(
    tmp_path: Path, weights_dir: Path, files: dict[str, Path | bytes]
) -> PostProcessorRegistry:
    (tmp_path / "esrgan").mkdir()
    for name, source in files.items():
        target = tmp_path / "esrgan" / name
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copy(source, target)
    return tiny_registry(tmp_path, cpu_cache())


def test_weights_of_the_wrong_scale_are_refused(tmp_path: Path, weights_dir: Path) -> None:
    registry = _registry_with(
        tmp_path, weights_dir, {"RealESRGAN_x4plus.pth": weights_dir / "esrgan" / "RealESRGAN_x2plus.pth"}
    )
    with pytest.raises(PostProcessError, match="x2 model") as info:
        registry.get("RealESRGAN_x4plus").process(picture())
    assert info.value.reason == "bad_weights"


def test_damaged_and_missing_weights_raise_typed_errors(tmp_path: Path, weights_dir: Path) -> None:
    registry = _registry_with(tmp_path, weights_dir, {"NMKD_Siax.pth": b"not a checkpoint"})
    assert registry.available() == ["NMKD_Siax"]  # present is all available() promises; loading checks more
    with pytest.raises(PostProcessError) as damaged:
        registry.get("NMKD_Siax").process(picture())
    assert damaged.value.reason == "bad_weights"
    with pytest.raises(PostProcessError) as missing:
        registry.get("4x_AnimeSharp").process(picture())
    assert missing.value.reason == "missing_weights"
