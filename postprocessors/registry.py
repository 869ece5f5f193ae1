"""PostProcessorRegistry: every post-processor by horde name, and the order a job's list is applied in."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from PIL import Image

from models.cache import ModelCache
from models.device import DevicePolicy
from models.interrupt import NEVER, Interrupt
from postprocessors.background import StripBackground
from postprocessors.base import PostProcessor, PostProcessResult
from postprocessors.facefix import FACE_FIXERS, FaceFixer
from postprocessors.upscalers import UPSCALERS, SpandrelUpscaler

logger = logging.getLogger(__name__)

UPSCALER_NAMES: tuple[str, ...] = tuple(cls.name for cls in UPSCALERS)
FACE_FIXER_NAMES: tuple[str, ...] = tuple(cls.name for cls in FACE_FIXERS)
# Stage of each kind: upscalers, then face fixers (faces are restored at the final resolution, as the legacy
# worker and reGen do), then strip_background (its alpha would otherwise be lost or resampled).
STAGES: tuple[tuple[str, ...], ...] = (UPSCALER_NAMES, FACE_FIXER_NAMES, ("strip_background",))
ORDER: tuple[str, ...] = tuple(name for stage in STAGES for name in stage)


def ordered(names: list[str]) -> list[str]:
    """The names in application order: by stage, request order within a stage, each name once.

    Unknown names raise KeyError (the horde also lists post-processors this worker does not serve).
    """
    unknown = [name for name in names if name not in ORDER]
    if unknown:
        raise KeyError(f"unknown post-processor(s): {unknown}")
    seen = list(dict.fromkeys(names))
    return [name for stage in STAGES for name in seen if name in stage]


class PostProcessorRegistry:
    """All post-processors of this worker, built lazily, weights loaded through the shared ModelCache.

    Weights live under `weights_dir`: esrgan/<file> for upscalers, gfpgan/GFPGANv1.4.pth (and
    GFPGANv1.3.pth, RestoreFormer.pth), codeformer/CodeFormers.pth, rembg/u2net.pth; the face detector
    and parser (facexlib) in facexlib/ or, as gfpgan.json lists them with GFPGAN, in gfpgan/.
    """

    def __init__(
        self, *, weights_dir: Path, cache: ModelCache, device: DevicePolicy, tile: int | None = None
    ) -> None:
        self.weights_dir = Path(weights_dir)
        self._cache = cache
        self._device = device
        self._tile = tile
        self._processors: dict[str, PostProcessor] = {}
        self._lock = threading.Lock()

    def known(self) -> list[str]:
        return list(ORDER)

    def available(self) -> list[str]:
        """Names whose weight files are all present (in application order)."""
        return [name for name in ORDER if all(path.is_file() for path in self._build(name).files())]

    def get(self, name: str) -> PostProcessor:
        """The processor for a horde name; KeyError for names this worker does not know."""
        if name not in ORDER:
            raise KeyError(f"unknown post-processor {name!r}")
        with self._lock:
            if name not in self._processors:
                self._processors[name] = self._build(name)
            return self._processors[name]

    def apply(
        self, image: Image.Image, names: list[str], *, strength: float | None = None,
        interrupt: Interrupt = NEVER,
    ) -> PostProcessResult:  # fmt: skip
        """Run the named processors in the documented order (see `ordered`); metadata entries accumulate.

        `strength` (the payload's facefixer_strength) reaches every processor; only face fixers use it.
        `interrupt` (the job's deadline) is checked before each processor and inside those that loop.
        """
        metadata: list[dict[str, str]] = []
        for name in ordered(list(names)):
            interrupt.check(f"post-processor {name}")
            result = self.get(name).process(image, strength=strength, interrupt=interrupt)
            image = result.image
            metadata.extend(result.metadata)
        return PostProcessResult(image, metadata)

    def _build(self, name: str) -> PostProcessor:
        for upscaler in UPSCALERS:
            if upscaler.name == name:
                return self._upscaler(upscaler)
        for fixer in FACE_FIXERS:
            if fixer.name == name:
                return self._face_fixer(fixer)
        if name == StripBackground.name:
            weights = self.weights_dir / StripBackground.category / StripBackground.file_name
            return StripBackground(weights=weights, cache=self._cache, device=self._device)
        raise KeyError(f"unknown post-processor {name!r}")

    def _upscaler(self, cls: type[SpandrelUpscaler]) -> SpandrelUpscaler:
        weights = self.weights_dir / cls.category / cls.file_name
        return cls(weights=weights, cache=self._cache, device=self._device, tile=self._tile)

    def _face_fixer(self, cls: type[FaceFixer]) -> FaceFixer:
        weights = self.weights_dir / cls.category / cls.file_name
        helper_dirs = [self.weights_dir / "facexlib", self.weights_dir / "gfpgan"]
        return cls(weights=weights, face_helper_dirs=helper_dirs, cache=self._cache, device=self._device)
