from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cache import ModelCache
from models.interrupt import Interrupt, Interrupted
from postprocessors.base import module_device_dtype, pil_to_tensor, tensor_to_uint8
from postprocessors.registry import PostProcessorRegistry
from postprocessors.tiling import plan_tiles, tiled_upscale, tiled_upscale_adaptive
from tests.models.test_interrupt import ticking
from tests.postprocessors.helpers import picture


@pytest.mark.parametrize(
    ("height", "width", "tile", "pad"), [(37, 23, 8, 3), (64, 64, 64, 16), (5, 70, 16, 0)]
)
def test_tiles_cover_every_pixel_once(height: int, width: int, tile: int, pad: int) -> None:
    covered = np.zeros((height, width), dtype=int)
    for t in plan_tiles(height, width, tile, pad):
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
        assert 0 <= t.py0 <= t.y0 < t.y1 <= t.py1 <= height
        assert 0 <= t.px0 <= t.x0 < t.x1 <= t.px1 <= width
        # The context is the full pad wherever the image has it.
        assert t.y0 - t.py0 == min(pad, t.y0) and t.px1 - t.x1 == min(pad, width - t.x1)
    assert (covered == 1).all()


def test_tiled_result_matches_a_whole_image_pass(registry: PostProcessorRegistry, cache: ModelCache) -> None:
    """With context padding beyond the network's receptive field, tiling changes nothing (no seams)."""
    upscaler = registry.get("RealESRGAN_x4plus")
    image = picture((50, 44))
    with cache.use(upscaler.cache_key, upscaler._load) as model:
        device, dtype = module_device_dtype(model.module)
        tensor = pil_to_tensor(image, device, dtype)
        whole = tiled_upscale(model.descriptor, tensor, scale=4, tile=64, pad=0)
        tiled = tiled_upscale(model.descriptor, tensor, scale=4, tile=16, pad=24)
        seamy = tiled_upscale(model.descriptor, tensor, scale=4, tile=16, pad=0)
    assert whole.shape == tiled.shape == (176, 200, 3)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    # Without context the tile borders show: the padding is what makes the result seamless.
    assert np.abs(whole.astype(int) - seamy.astype(int)).max() > 1


def test_a_network_returning_the_wrong_size_is_caught() -> None:
    with pytest.raises(RuntimeError, match="returned"):
        tiled_upscale(lambda x: x, torch.zeros(1, 3, 8, 8), scale=2, tile=4, pad=1)


def _nearest_x2(max_edge: int):
    """A x2 'network' (nearest-neighbour) that runs out of memory on inputs larger than max_edge."""
    seen: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > max_edge:
            raise torch.OutOfMemoryError("simulated: tile too large")
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    return net, seen


def test_out_of_memory_halves_the_tile_until_it_fits() -> None:
    image = torch.rand(1, 3, 100, 90)
    net, seen = _nearest_x2(max_edge=70)
    result, used = tiled_upscale_adaptive(net, image, scale=2, tile=256, pad=4, min_tile=32)
    assert used == 64  # 256 and 128 (+ context) were refused
    assert max(seen) > 70
    expected = torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest")
    assert np.array_equal(result, tensor_to_uint8(expected))


def test_out_of_memory_below_the_smallest_tile_is_raised() -> None:
    net, _ = _nearest_x2(max_edge=10)
    with pytest.raises(torch.OutOfMemoryError):
        tiled_upscale_adaptive(net, torch.rand(1, 3, 64, 64), scale=2, tile=64, pad=4, min_tile=32)


def test_past_the_deadline_no_further_tile_is_started() -> None:
    net, seen = _nearest_x2(max_edge=1000)
    interrupt = Interrupt(deadline=2, clock=ticking())  # the third check point is past it
    with pytest.raises(Interrupted, match=r"during RealESRGAN_x2plus, tile 3 of 9: stopped"):
        tiled_upscale_adaptive(net, torch.rand(1, 3, 48, 48), scale=2, tile=16, pad=4, interrupt=interrupt,
                               where="RealESRGAN_x2plus")
    assert len(seen) == 2  # two tiles ran, the rest never did
