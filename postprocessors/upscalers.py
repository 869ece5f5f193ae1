"""The horde's upscalers, every one a spandrel architecture, all run the same way.

- ESRGAN (RRDBNet): Real-ESRGAN x4plus / x2plus / anime_6B, NMKD Siax, 4x AnimeSharp, 4xNomos8kSC,
  4xLSDIRplus (old and new key layouts, pixel-unshuffle of x2plus detected from the state dict);
- RealPLKSR (spandrel's PLKSR): 4xNomosWebPhoto_RealPLKSR, 4xNomos2_realplksr_dysample (DySample upsampler);
- DAT: 4xNomos2_hq_dat2 (the "dat2" variant);
- SPAN: 2xModernSpanimationV1.

Weights load through spandrel into the shared ModelCache, checked to be the architecture and scale the
horde name means; inference is tiled (postprocessors.tiling) so a large image stays within a memory bound
(spandrel pads a tile that is below an architecture's size requirement). Alpha is upscaled separately by a
bicubic resize.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from models.cache import ModelCache
from models.device import DevicePolicy
from models.interrupt import NEVER, Interrupt
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


class SpandrelUpscaler(PostProcessor):
    """An upscaler of one spandrel architecture (`architecture`, spandrel's id) and exact `scale`."""

    category: ClassVar[str] = "esrgan"  # the horde's reference lists upscalers in esrgan.json
    file_name: ClassVar[str]
    architecture: ClassVar[str]

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
        model = load_spandrel(self.weights, architecture=self.architecture, dtype=self._device.dtype)
        if model.scale != self.scale:
            raise PostProcessError(
                f"{self.weights.name}: a x{model.scale} model where {self.name} needs x{self.scale}",
                reason="bad_weights",
            )
        return model

    def process(
        self, image: Image.Image, *, strength: float | None = None, interrupt: Interrupt = NEVER
    ) -> PostProcessResult:
        """Upscale by exactly `scale`; `strength` has no meaning for an upscaler and is ignored;
        `interrupt` is checked before every tile."""
        image = checked_image(image, scale=self.scale, name=self.name)
        rgb, alpha = split_alpha(image)
        hint = self.weights.stat().st_size if self.weights.exists() else None
        with self._cache.use(self.cache_key, self._load, size_hint=hint) as model:
            device, dtype = module_device_dtype(model.module)
            tensor = pil_to_tensor(rgb, device, dtype)
            try:
                array, _ = tiled_upscale_adaptive(
                    model.descriptor, tensor, scale=self.scale, tile=self.tile, pad=self.pad,
                    interrupt=interrupt, where=self.name,
                )
            except torch.OutOfMemoryError as exc:
                raise PostProcessError(
                    f"{self.name}: out of memory even with small tiles", reason="out_of_memory"
                ) from exc
            del tensor
        upscaled = Image.fromarray(array, "RGB")
        logger.debug("%s: %dx%d -> %dx%d", self.name, *image.size, *upscaled.size)
        return PostProcessResult(join_alpha(upscaled, alpha))


class EsrganUpscaler(SpandrelUpscaler):
    architecture = "ESRGAN"


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


class Nomos8kSC4x(EsrganUpscaler):
    name = "4xNomos8kSC"
    file_name = "4xNomos8kSC.pth"
    scale = 4


class LSDIRplus4x(EsrganUpscaler):
    name = "4xLSDIRplus"
    file_name = "4xLSDIRplus.pth"
    scale = 4


class NomosWebPhotoRealPLKSR4x(SpandrelUpscaler):
    name = "4xNomosWebPhoto_RealPLKSR"
    file_name = "4xNomosWebPhoto_RealPLKSR.pth"
    architecture = "PLKSR"
    scale = 4


class Nomos2RealPLKSRDySample4x(SpandrelUpscaler):
    name = "4xNomos2_realplksr_dysample"
    file_name = "4xNomos2_realplksr_dysample.pth"
    architecture = "PLKSR"
    scale = 4


class Nomos2HqDat2x4(SpandrelUpscaler):
    name = "4xNomos2_hq_dat2"
    file_name = "4xNomos2_hq_dat2.pth"
    architecture = "DAT"
    scale = 4


class ModernSpanimation2x(SpandrelUpscaler):
    name = "2xModernSpanimationV1"
    file_name = "2x_ModernSpanimationV1.pth"  # the author's file name
    architecture = "SPAN"
    scale = 2


UPSCALERS: tuple[type[SpandrelUpscaler], ...] = (
    RealESRGANx4plus,
    RealESRGANx2plus,
    RealESRGANx4plusAnime6B,
    NMKDSiax,
    AnimeSharp4x,
    Nomos8kSC4x,
    LSDIRplus4x,
    NomosWebPhotoRealPLKSR4x,
    Nomos2RealPLKSRDySample4x,
    Nomos2HqDat2x4,
    ModernSpanimation2x,
)
