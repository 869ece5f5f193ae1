"""Loading restorer and upscaler weights with spandrel (architecture detected from the state dict).

spandrel's own registry is extended with spandrel_extra_arches (CodeFormer) in a private registry, so that
loading here changes nothing for other users of spandrel in the process.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from postprocessors.base import PostProcessError

logger = logging.getLogger(__name__)


@functools.cache
def _registry():  # -> spandrel.ArchRegistry
    import spandrel
    import spandrel_extra_arches

    registry = spandrel.ArchRegistry()
    registry.add(*spandrel.MAIN_REGISTRY)
    registry.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    return registry


class SpandrelModel:
    """A spandrel descriptor as a cacheable object (ModelCache moves `torch_modules()` between devices)."""

    def __init__(self, descriptor, path: Path) -> None:  # descriptor: spandrel.ImageModelDescriptor
        self.descriptor = descriptor
        self.path = path

    @property
    def module(self) -> torch.nn.Module:
        return self.descriptor.model

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.id

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.descriptor.model}


def load_spandrel(path: Path, *, architecture: str, dtype: torch.dtype = torch.float32) -> SpandrelModel:
    """Load a .pth/.safetensors file into RAM (CPU); check that it is the architecture expected.

    `dtype` float16 is used only when the architecture supports it (spandrel marks GFPGAN and CodeFormer
    as float32-only); the cache later moves the weights onto the execution device as they are.
    """
    import spandrel

    try:
        descriptor = spandrel.ModelLoader(device="cpu", registry=_registry()).load_from_file(path)
    except FileNotFoundError as exc:
        raise PostProcessError(f"weights file missing: {path}", reason="missing_weights") from exc
    except spandrel.UnsupportedModelError as exc:
        raise PostProcessError(f"{path.name}: not a known model architecture", reason="bad_weights") from exc
    except Exception as exc:  # torch.load / unpickling errors of a damaged file have no common base class
        raise PostProcessError(f"{path.name}: cannot load weights: {exc}", reason="bad_weights") from exc
    found = descriptor.architecture.id
    if found != architecture:
        raise PostProcessError(
            f"{path.name}: expected a {architecture} model, found {found}", reason="bad_weights"
        )
    if dtype == torch.float16 and not descriptor.supports_half:
        dtype = torch.float32
    descriptor.model.to(dtype=dtype).eval()
    logger.info("loaded %s (%s, %s, x%d)", path.name, found, "/".join(descriptor.tags), descriptor.scale)
    return SpandrelModel(descriptor, path)
