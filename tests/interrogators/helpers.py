"""Shared by tests/interrogators and tests/bridge/jobs/test_alchemy.py: tiny models, images, a CPU cache."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from interrogators import InterrogatorSet, build_interrogators
from interrogators.tiny import (
    TINY_AESTHETIC,
    TINY_CAPTION,
    TINY_CLIP,
    TINY_DEEPDANBOORU,
    build_tiny_interrogators,
)
from models.cache import ModelCache
from models.device import DevicePolicy

ALL_FORMS = ("caption", "interrogation", "nsfw", "aesthetic")


def one_torch_thread() -> Iterator[None]:
    """Tiny models do thousands of microsecond-sized ops; with two OpenMP threads on a CPU other processes
    keep busy, every op waits for a descheduled thread (measured: 4 s instead of 0.07 s per tiny caption).
    One thread for these tests; the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_models_dir(factory: pytest.TempPathFactory) -> Path:
    """One folder per test session, whichever module asks first builds it (building is idempotent)."""
    dest = factory.getbasetemp() / "tiny-interrogators"
    build_tiny_interrogators(dest)
    return dest


def cpu_cache() -> ModelCache:
    return ModelCache(DevicePolicy.cpu(), ram_budget_bytes=2 << 30)


def tiny_set(
    models_dir: Path,
    cache: ModelCache,
    *,
    forms=ALL_FORMS,
    clip_model: str = TINY_CLIP,
    embeddings_dir: Path | None = None,
    device: DevicePolicy | None = None,
    **kwargs,
) -> InterrogatorSet:
    return build_interrogators(
        models_dir=models_dir,
        cache=cache,
        device=device or DevicePolicy.cpu(),
        forms=forms,
        caption_model=TINY_CAPTION,
        clip_model=clip_model,
        danbooru_model=TINY_DEEPDANBOORU,
        aesthetic_model=TINY_AESTHETIC,
        embeddings_dir=embeddings_dir,
        **kwargs,
    )


def picture(seed: int = 0, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A deterministic image with some structure (a gradient and a block), not a flat colour."""
    image = Image.new("RGB", size)
    pixels = image.load()
    for x in range(size[0]):
        for y in range(size[1]):
            pixels[x, y] = ((x * 3 + seed * 40) % 256, (y * 4 + seed * 70) % 256, ((x + y) * 2) % 256)
    image.paste((250 - seed * 30 % 250, 20, 90), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image.convert(mode)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
