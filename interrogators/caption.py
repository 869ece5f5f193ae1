"""The caption form: BLIP (transformers) from a local folder, options from the horde payload."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.common import module_place, option_float, option_int, rgb

logger = logging.getLogger(__name__)

# Bounds keep a requester from asking for minutes of beam search on a shared CPU; the defaults are those of
# the legacy horde captioner (nataili's BLIP: 3 beams, 10..30 tokens, no repetition penalty).
MAX_BEAMS = 8
MAX_LENGTH = 100
# BLIP was trained to continue this prompt (the original code and the legacy horde captioner use it). Without
# it the transformers checkpoints tend to open captions with junk words such as "arafed".
DEFAULT_PROMPT = "a picture of"


@dataclass(frozen=True)
class CaptionOptions:
    num_beams: int = 3
    min_length: int = 10
    max_length: int = 30
    # None: deterministic beam search. A value: nucleus sampling with that top_p (the legacy `sample` mode).
    top_p: float | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any] | None) -> CaptionOptions:
        options = payload or {}
        max_length = option_int(options, "max_length", cls.max_length, 1, MAX_LENGTH)
        top_p = option_float(options, "top_p", None, 0.01, 1.0)
        return cls(
            num_beams=option_int(options, "num_beams", cls.num_beams, 1, MAX_BEAMS),
            min_length=option_int(options, "min_length", min(cls.min_length, max_length), 0, max_length),
            max_length=max_length,
            top_p=top_p,
            repetition_penalty=float(option_float(options, "repetition_penalty", 1.0, 1.0, 3.0) or 1.0),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        # Lengths count caption tokens only: the prompt and start token are not the requester's concern.
        kwargs: dict[str, Any] = {
            "num_beams": self.num_beams,
            "min_new_tokens": self.min_length,
            "max_new_tokens": self.max_length,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.top_p is not None:
            kwargs.update(do_sample=True, top_p=self.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        return kwargs


@dataclass
class BlipBundle:
    """What the model cache holds for captioning: weights plus the processor that must travel with them."""

    model: Any  # transformers.BlipForConditionalGeneration
    processor: Any  # transformers.BlipProcessor

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}


def load_blip(folder: Path, dtype: torch.dtype) -> BlipBundle:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    return BlipBundle(model=model, processor=processor)


class Captioner:
    """`caption(image, payload)` -> {"caption": str}. Weights are loaded through the shared model cache on
    first use and may be evicted between jobs."""

    def __init__(
        self,
        folder: Path,
        *,
        cache: Any,
        dtype: torch.dtype = torch.float32,
        prompt: str | None = DEFAULT_PROMPT,
    ) -> None:
        self.folder = Path(folder)
        self.prompt = prompt.strip().lower() if prompt else None
        self.key = f"interrogator:blip:{self.folder.name}"
        self._cache = cache
        self._dtype = dtype
        # Seconds spent loading weights so far: jobs report the share of their run that was loading.
        self.load_seconds = 0.0

    def _load(self) -> BlipBundle:
        started = time.perf_counter()
        try:
            return load_blip(self.folder, self._dtype)
        finally:
            self.load_seconds += time.perf_counter() - started

    def loaded(self) -> AbstractContextManager[BlipBundle]:
        """The model bundle on the execution device, locked in the cache while the block runs."""
        return self._cache.use(self.key, self._load)

    def warm(self) -> None:
        with self.loaded():
            pass

    def caption(self, image: Image.Image, options: Mapping[str, Any] | None = None) -> dict[str, str]:
        settings = CaptionOptions.from_payload(options)
        with self.loaded() as bundle:
            inputs = self.inputs(bundle, image)
            with torch.inference_mode():
                tokens = bundle.model.generate(**inputs, **settings.generate_kwargs())
            text = " ".join(bundle.processor.decode(tokens[0], skip_special_tokens=True).split())
        if self.prompt and text.startswith(self.prompt):
            text = text[len(self.prompt) :].strip()
        return {"caption": text}

    def inputs(self, bundle: BlipBundle, image: Image.Image) -> dict[str, torch.Tensor]:
        """Model inputs for one image (plus the prompt), on the model's device and dtype."""
        encoded = bundle.processor(images=rgb(image), text=self.prompt, return_tensors="pt")
        device, dtype = module_place(bundle.model)
        inputs = {"pixel_values": encoded["pixel_values"].to(device=device, dtype=dtype)}
        if self.prompt:
            inputs.update(
                input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
            )
        return inputs
