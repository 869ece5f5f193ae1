"""Shared by tests/postprocessors and the job tests that post-process: tiny weights, a registry, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.cache import ModelCache
from models.device import DevicePolicy
from postprocessors import PostProcessorRegistry
from postprocessors.tiny import build_tiny_postprocessors

# FFHQ 5-point template of facexlib's FaceRestoreHelper (eyes, nose, mouth corners on a 512² face).
FACE_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)  # fmt: skip


def tiny_weights_dir(factory: pytest.TempPathFactory) -> Path:
    """One folder per test session, whichever module asks first builds it (building is idempotent)."""
    dest = factory.getbasetemp() / "tiny-postprocessors"
    build_tiny_postprocessors(dest)
    return dest


def cpu_cache() -> ModelCache:
    return ModelCache(DevicePolicy.cpu(), ram_budget_bytes=3 << 30)


def tiny_registry(weights_dir: Path, cache: ModelCache, **kwargs) -> PostProcessorRegistry:
    return PostProcessorRegistry(weights_dir=weights_dir, cache=cache, device=DevicePolicy.cpu(), **kwargs)


def picture(size: tuple[int, int] = (40, 32), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients and a block), not a flat colour."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 5 + seed * 40) % 256, (y * 7 + seed * 70) % 256, ((x + y) * 3) % 256], axis=-1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (230, 30, 90)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def face_landmarks(scale: float, offset: tuple[float, float]) -> np.ndarray:
    """Landmarks of a face that the template maps onto by a scale and a shift: alignment is exact."""
    return FACE_TEMPLATE * scale + np.asarray(offset, dtype=np.float32)
