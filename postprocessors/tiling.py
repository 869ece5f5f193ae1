"""Tiled inference for upscalers: bounded memory whatever the image size, without visible seams.

Each tile is run with `pad` pixels of real neighbouring context on every side (clamped at the image border);
only the tile's own region of the result is kept. The convolutions therefore see the same context as a
whole-image pass near every kept pixel (up to the receptive field), so no blending is needed. The result is
written tile by tile into one uint8 buffer: the float output of the whole image never exists at once.
Before each tile the job's deadline is checked (models.interrupt): a large upscale past its ttl stops there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from models.interrupt import NEVER, Interrupt
from postprocessors.base import tensor_to_uint8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    # The kept region (input pixels), and the padded region the network actually sees.
    y0: int
    y1: int
    x0: int
    x1: int
    py0: int
    py1: int
    px0: int
    px1: int


def plan_tiles(height: int, width: int, tile: int, pad: int) -> Iterator[Tile]:
    """Tiles covering a height x width image, row by row."""
    if tile < 1 or pad < 0:
        raise ValueError(f"tile must be >= 1 and pad >= 0 (got {tile}, {pad})")
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            yield Tile(
                y0, y1, x0, x1,
                max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0), min(x1 + pad, width),
            )  # fmt: skip


def padded_input(image: torch.Tensor, t: Tile) -> torch.Tensor:
    """The network input of one tile: a (1, C, h, w) view of the image tensor."""
    return image[:, :, t.py0 : t.py1, t.px0 : t.px1]


def tiled_upscale(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    scale: int,
    tile: int,
    pad: int,
    interrupt: Interrupt = NEVER,
    where: str = "upscale",
) -> np.ndarray:
    """Run `net` (a x`scale` network on (1, 3, h, w) tensors in [0, 1]) tile by tile over `image`,
    checking `interrupt` before each tile (`where` names the work in its reason).

    Returns the (H*scale, W*scale, 3) uint8 result.
    """
    _, _, height, width = image.shape
    out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    tiles = list(plan_tiles(height, width, tile, pad))
    for number, t in enumerate(tiles, start=1):
        interrupt.check(f"{where}, tile {number} of {len(tiles)}")
        with torch.inference_mode():
            result = net(padded_input(image, t))
            expected = ((t.py1 - t.py0) * scale, (t.px1 - t.px0) * scale)
            if tuple(result.shape[-2:]) != expected:
                raise RuntimeError(
                    f"upscaler returned {tuple(result.shape[-2:])} for a tile needing {expected}"
                )
            top, left = (t.y0 - t.py0) * scale, (t.x0 - t.px0) * scale
            kept = result[:, :, top : top + (t.y1 - t.y0) * scale, left : left + (t.x1 - t.x0) * scale]
            out[t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale] = tensor_to_uint8(kept)
        del result, kept
    return out


def tiled_upscale_adaptive(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    scale: int,
    tile: int,
    pad: int,
    min_tile: int = 64,
    interrupt: Interrupt = NEVER,
    where: str = "upscale",
) -> tuple[np.ndarray, int]:
    """`tiled_upscale`, retried with half the tile edge while the device runs out of memory.

    A GPU shared with a loaded diffusion model may not fit the default tile; a smaller one costs only
    some padding overhead. Returns (result, tile edge used); re-raises the OOM below `min_tile`.
    """
    while True:
        try:
            return tiled_upscale(net, image, scale=scale, tile=tile, pad=pad, interrupt=interrupt,
                                 where=where), tile
        except torch.OutOfMemoryError:
            if tile // 2 < min_tile:
                raise
            if image.is_cuda:
                torch.cuda.empty_cache()
            logger.warning("upscale: out of memory with %d px tiles, retrying with %d px", tile, tile // 2)
            tile //= 2
