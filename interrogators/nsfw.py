"""The nsfw form and the generation censor: Stable Diffusion's safety checker from a local folder."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.common import module_place, rgb

logger = logging.getLogger(__name__)


@dataclass
class SafetyBundle:
    model: Any  # diffusers StableDiffusionSafetyChecker
    processor: Any  # transformers.CLIPImageProcessor

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}


def load_safety_checker(folder: Path, dtype: torch.dtype) -> SafetyBundle:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    model = StableDiffusionSafetyChecker.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    return SafetyBundle(model=model, processor=processor)


class NsfwChecker:
    """`is_nsfw(images) -> list[bool]`, one flag per image, with the checker's stock thresholds."""

    def __init__(self, folder: Path, *, cache: Any, dtype: torch.dtype = torch.float32) -> None:
        self.folder = Path(folder)
        self.key = f"interrogator:safety_checker:{self.folder.name}"
        self._cache = cache
        self._dtype = dtype
        # Seconds spent loading weights so far: jobs report the share of their run that was loading.
        self.load_seconds = 0.0

    def _load(self) -> SafetyBundle:
        started = time.perf_counter()
        try:
            return load_safety_checker(self.folder, self._dtype)
        finally:
            self.load_seconds += time.perf_counter() - started

    def loaded(self) -> AbstractContextManager[SafetyBundle]:
        """The model bundle on the execution device, locked in the cache while the block runs."""
        return self._cache.use(self.key, self._load)

    def warm(self) -> None:
        with self.loaded():
            pass

    def is_nsfw(self, images: list[Image.Image]) -> list[bool]:
        if not images:
            return []
        with self.loaded() as bundle:
            inputs = bundle.processor(images=[rgb(i) for i in images], return_tensors="pt")
            device, dtype = module_place(bundle.model)
            clip_input = inputs["pixel_values"].to(device=device, dtype=dtype)
            # forward_onnx is the vectorised form of the same test (concept score = cosine - threshold,
            # with the special-care adjustment); the plain forward loops in Python and wants the images
            # themselves only to black them out, which the callers do their own way.
            placeholder = torch.zeros(len(images), 1, device=device)
            with torch.inference_mode():
                _, flags = bundle.model.forward_onnx(clip_input, placeholder)
        return [bool(flag) for flag in flags.tolist()]

    def nsfw(self, image: Image.Image) -> dict[str, bool]:
        """The nsfw form's result."""
        return {"nsfw": self.is_nsfw([image])[0]}
