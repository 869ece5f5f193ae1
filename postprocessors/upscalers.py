"""ESRGAN-family upscalers (RRDBNet): Real-ESRGAN x4plus / x2plus / anime_6B, NMKD Siax, 4x AnimeSharp.

Weights load through spandrel (old and new RRDBNet key layouts, pixel-unshuffle of x2plus detected from the
state dict) into the shared ModelCache; inference is tiled (postprocessors.tiling) so a large image stays
within a memory bound. Alpha is upscaled separately by a bicubic resize.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from models.cache import ModelCache
from models.device import DevicePolicy
from postprocessors.base import (
    PostProcessError,
    PostProcessor,
    PostProcessResult,
    checked_image,
    join_alpha,
    module_device_dtype,
    pil_to_tensor,
    split_alpha,
)
from postprocessors.loading import SpandrelModel, load_spandrel
from postprocessors.tiling import tiled_upscale_adaptive

logger = logging.getLogger(__name__)

# Tile edge (input pixels) and context padding. Measured on CPU (bench/postprocess.py), the peak RSS added by
# one x4 tile (64 channels at 4x the padded edge) is ~0.5 GB at 128 px, 0.8 at 192, 1.0 at 256, 1.9 at 384;
# 256 keeps the padding overhead at (288/256)² = 1.27x while a 2048² x4 job stays under 2.5 GiB in all.
# On a GPU a larger tile keeps the device busy.
CPU_TILE = 256
CUDA_TILE = 512
TILE_PAD = 16


def default_tile(device: DevicePolicy) -> int:
    return CUDA_TILE if device.is_cuda else CPU_TILE


class EsrganUpscaler(PostProcessor):
    category: ClassVar[str] = "esrgan"
    file_name: ClassVar[str]

    def __init__(
        self, *, weights: Path, cache: ModelCache, device: DevicePolicy, tile: int | None = None
    ) -> None:
        self.weights = weights
        self._cache = cache
        self._device = device
        self.tile = tile or default_tile(device)
        self.pad = TILE_PAD

    @property
    def cache_key(self) -> str:
        return f"postprocessor:{self.name}"

    def files(self) -> list[Path]:
        return [self.weights]

    def _load(self) -> SpandrelModel:
        model = load_spandrel(self.weights, architecture="ESRGAN", dtype=self._device.dtype)
        if model.scale != self.scale:
            raise PostProcessError(
                f"{self.weights.name}: a x{model.scale} model where {self.name} needs x{self.scale}",
                reason="bad_weights",
            )
        return model

    def process(self, image: Image.Image, *, strength: float | None = None) -> PostProcessResult:
        """Upscale by exactly `scale`; `strength` has no meaning for an upscaler and is ignored."""
        image = checked_image(image, scale=self.scale, name=self.name)
        rgb, alpha = split_alpha(image)
        hint = self.weights.stat().st_size if self.weights.exists() else None
        with self._cache.use(self.cache_key, self._load, size_hint=hint) as model:
            device, dtype = module_device_dtype(model.module)
            tensor = pil_to_tensor(rgb, device, dtype)
            try:
                array, _ = tiled_upscale_adaptive(
                    model.descriptor, tensor, scale=self.scale, tile=self.tile, pad=self.pad
                )
            except torch.OutOfMemoryError as exc:
                raise PostProcessError(
                    f"{self.name}: out of memory even with small tiles", reason="out_of_memory"
                ) from exc
            del tensor
        upscaled = Image.fromarray(array, "RGB")
        logger.debug("%s: %dx%d -> %dx%d", self.name, *image.size, *upscaled.size)
        return PostProcessResult(join_alpha(upscaled, alpha))


class RealESRGANx4plus(EsrganUpscaler):
    name = "RealESRGAN_x4plus"
    file_name = "RealESRGAN_x4plus.pth"
    scale = 4


class RealESRGANx2plus(EsrganUpscaler):
    name = "RealESRGAN_x2plus"
    file_name = "RealESRGAN_x2plus.pth"
    scale = 2


class RealESRGANx4plusAnime6B(EsrganUpscaler):
    name = "RealESRGAN_x4plus_anime_6B"
    file_name = "RealESRGAN_x4plus_anime_6B.pth"
    scale = 4


class NMKDSiax(EsrganUpscaler):
    name = "NMKD_Siax"
    file_name = "NMKD_Siax.pth"
    scale = 4


class AnimeSharp4x(EsrganUpscaler):
    name = "4x_AnimeSharp"
    file_name = "4x_AnimeSharp.pth"
    scale = 4


UPSCALERS: tuple[type[EsrganUpscaler], ...] = (
    RealESRGANx4plus,
    RealESRGANx2plus,
    RealESRGANx4plusAnime6B,
    NMKDSiax,
    AnimeSharp4x,
)
