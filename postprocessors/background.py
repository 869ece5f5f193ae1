"""strip_background: the foreground kept, the background made transparent (RGBA out).

The legacy worker used rembg's `u2net` session. This runs the same network (U²-Net, `u2net.pth`, see
postprocessors/strip_background.json) in torch with rembg's pre- and post-processing: a 320² LANCZOS copy
normalised with the ImageNet mean/std, the first (fused) output min-max scaled into a mask, resized back with
LANCZOS. The mask becomes the alpha channel (straight alpha; the RGB of fully transparent pixels is zeroed so
that no background survives in the file). An existing alpha channel is kept where it is more transparent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageChops

from models.cache import ModelCache
from models.device import DevicePolicy
from models.interrupt import NEVER, Interrupt
from postprocessors.base import (
    PostProcessError,
    PostProcessor,
    PostProcessResult,
    checked_image,
    module_device_dtype,
    split_alpha,
)
from postprocessors.u2net import U2Net, load_u2net

logger = logging.getLogger(__name__)

INPUT_SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@torch.inference_mode()
def predict_mask(net: U2Net, rgb: Image.Image) -> Image.Image:
    """The foreground mask ("L", the image's size) of an RGB image."""
    small = np.asarray(rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS), dtype=np.float32)
    small = small / max(float(small.max()), 1e-6)
    small = (small - MEAN) / STD
    device, dtype = module_device_dtype(net)
    tensor = torch.from_numpy(small.transpose(2, 0, 1).copy()).unsqueeze(0).to(device=device, dtype=dtype)
    pred = net(tensor)[0][0, 0].float()
    low, high = pred.min(), pred.max()
    pred = (pred - low) / (high - low) if high > low else torch.zeros_like(pred)
    mask = Image.fromarray((pred * 255).to(torch.uint8).cpu().numpy(), "L")
    return mask.resize(rgb.size, Image.Resampling.LANCZOS)


class StripBackground(PostProcessor):
    name = "strip_background"
    category: ClassVar[str] = "rembg"
    file_name: ClassVar[str] = "u2net.pth"

    def __init__(self, *, weights: Path, cache: ModelCache, device: DevicePolicy) -> None:
        self.weights = weights
        self._cache = cache
        self._device = device

    @property
    def cache_key(self) -> str:
        return f"postprocessor:{self.name}"

    def files(self) -> list[Path]:
        return [self.weights]

    def _load(self) -> U2Net:
        if not self.weights.is_file():
            raise PostProcessError(f"weights file missing: {self.weights}", reason="missing_weights")
        try:
            return load_u2net(self.weights)
        except Exception as exc:  # unpickling / shape errors of a damaged or foreign file
            raise PostProcessError(
                f"{self.weights.name}: cannot load U²-Net: {exc}", reason="bad_weights"
            ) from exc

    def process(
        self, image: Image.Image, *, strength: float | None = None, interrupt: Interrupt = NEVER
    ) -> PostProcessResult:
        """`strength` has no meaning here and is ignored; one pass, nothing to interrupt inside it."""
        image = checked_image(image, name=self.name)
        rgb, alpha = split_alpha(image)
        hint = self.weights.stat().st_size if self.weights.exists() else None
        with self._cache.use(self.cache_key, self._load, size_hint=hint) as net:
            mask = predict_mask(net, rgb)
        if alpha is not None:
            mask = ImageChops.darker(mask, alpha)
        out = rgb.convert("RGBA")
        out.putalpha(mask)
        array = np.asarray(out).copy()
        array[array[:, :, 3] == 0, :3] = 0
        return PostProcessResult(Image.fromarray(array, "RGBA"))
