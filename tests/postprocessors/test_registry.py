from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bridge import horde_names
from models.cache import ModelCache
from models.interrupt import NEVER, Interrupt, Interrupted
from postprocessors import ORDER, PostProcessError, PostProcessorRegistry, ordered
from tests.models.test_interrupt import ticking
from tests.postprocessors.helpers import picture, tiny_registry

HORDE_NAMES = set(horde_names.POST_PROCESSORS)


def test_order_upscalers_then_face_fixers_then_strip_background() -> None:
    request = ["strip_background", "CodeFormers", "RealESRGAN_x2plus", "GFPGAN", "NMKD_Siax", "GFPGAN"]
    assert ordered(request) == ["RealESRGAN_x2plus", "NMKD_Siax", "CodeFormers", "GFPGAN", "strip_background"]
    assert set(ORDER) == HORDE_NAMES
    assert ordered([]) == []


def test_unknown_names_raise_key_error(registry: PostProcessorRegistry) -> None:
    with pytest.raises(KeyError):
        registry.get("4xUltraSharp")
    with pytest.raises(KeyError, match="4xUltraSharp"):
        registry.apply(picture(), ["GFPGAN", "4xUltraSharp"])


def test_available_lists_what_has_weights(
    registry: PostProcessorRegistry, tmp_path: Path, cache: ModelCache
) -> None:
    assert registry.available() == list(ORDER)
    assert tiny_registry(tmp_path, cache).available() == []


def test_get_returns_one_processor_per_name(registry: PostProcessorRegistry) -> None:
    assert registry.get("GFPGAN") is registry.get("GFPGAN")
    assert registry.get("RealESRGAN_x2plus").name == "RealESRGAN_x2plus"


def test_apply_runs_in_order_and_passes_strength(
    registry: PostProcessorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real chain on tiny weights; each processor's calls are recorded on the way through."""
    calls: list[tuple[str, tuple[int, int], str, float | None]] = []
    for name in ("RealESRGAN_x2plus", "GFPGAN", "strip_background"):
        processor = registry.get(name)

        def record(image, *, strength=None, interrupt=NEVER, _original=processor.process, _name=name):
            calls.append((_name, image.size, image.mode, strength))
            return _original(image, strength=strength, interrupt=interrupt)

        monkeypatch.setattr(processor, "process", record)

    result = registry.apply(
        picture((30, 20)), ["strip_background", "GFPGAN", "RealESRGAN_x2plus"], strength=0.4
    )
    assert calls == [
        ("RealESRGAN_x2plus", (30, 20), "RGB", 0.4),
        ("GFPGAN", (60, 40), "RGB", 0.4),  # faces are fixed on the upscaled image
        ("strip_background", (60, 40), "RGB", 0.4),
    ]
    assert result.image.size == (60, 40) and result.image.mode == "RGBA"
    assert result.metadata == [
        {"type": "information", "value": "see_ref", "ref": "GFPGAN: no face found, image unchanged"}
    ]


def test_apply_with_no_names_returns_the_image(registry: PostProcessorRegistry) -> None:
    image = picture()
    result = registry.apply(image, [])
    assert result.image is image and result.metadata == []


def test_apply_raises_typed_error_for_a_corrupt_image(registry: PostProcessorRegistry) -> None:
    buffer = io.BytesIO()
    picture((200, 200)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    broken = Image.open(io.BytesIO(data[: len(data) * 2 // 3]))  # opens (header intact), fails on decode
    with pytest.raises(PostProcessError, match="corrupt"):
        registry.apply(broken, ["RealESRGAN_x2plus", "strip_background"])


def test_an_upscale_past_its_deadline_stops_between_tiles_and_leaves_the_cache_free(
    weights_dir: Path, cache: ModelCache
) -> None:
    registry = tiny_registry(weights_dir, cache, tile=16)
    image = picture((40, 32))  # 3 x 2 tiles of 16 px
    before = registry.apply(image, ["RealESRGAN_x2plus"]).image
    # Check points: before the processor (tick 0), before tiles 1 and 2 (ticks 1, 2), before tile 3.
    interrupt = Interrupt(deadline=3, clock=ticking())
    with pytest.raises(Interrupted, match=r"during RealESRGAN_x2plus, tile 3 of 6: stopped"):
        registry.apply(image, ["RealESRGAN_x2plus"], interrupt=interrupt)
    key = registry.get("RealESRGAN_x2plus").cache_key
    assert cache._entries[key].locks == 0  # the model is free for the next job
    assert registry.apply(image, ["RealESRGAN_x2plus"]).image.tobytes() == before.tobytes()
