"""InterrogatorSet and build_interrogators: the interrogators a worker's forms need, and nothing else."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interrogators.caption import Captioner
from interrogators.clip import ClipInterrogator
from interrogators.nsfw import NsfwChecker
from interrogators.reference import (
    CAPTION_BASE,
    CAPTION_KIND,
    CAPTION_LARGE,
    CLIP_KIND,
    CLIP_L14,
    SAFETY_CHECKER,
    SAFETY_KIND,
    is_complete,
    model_dir,
)
from interrogators.terms import DEFAULT_TERMS_PATH

logger = logging.getLogger(__name__)

CAPTION_FORM = "caption"
INTERROGATION_FORM = "interrogation"
NSFW_FORM = "nsfw"
INTERROGATOR_FORMS = (CAPTION_FORM, INTERROGATION_FORM, NSFW_FORM)


@dataclass
class InterrogatorSet:
    caption: Captioner | None = None
    interrogation: ClipInterrogator | None = None
    nsfw: NsfwChecker | None = None

    def ready_forms(self) -> list[str]:
        """The interrogator forms this set can serve now (their model folders are present)."""
        return [form for form in INTERROGATOR_FORMS if getattr(self, form) is not None]

    def warm(self) -> None:
        """Load each model once and embed the term lists, so that the first jobs pay no start-up cost.
        Call at worker start, before the first pop."""
        for form in self.ready_forms():
            getattr(self, form).warm()


def build_interrogators(
    *,
    models_dir: Path,
    cache: Any,
    device: Any,
    forms: Sequence[str],
    low_memory: bool = False,
    caption_model: str | None = None,
    clip_model: str = CLIP_L14,
    nsfw_model: str = SAFETY_CHECKER,
    embeddings_dir: Path | None = None,
    terms_path: Path = DEFAULT_TERMS_PATH,
    torch_threads: int | None = None,
) -> InterrogatorSet:
    """Interrogators for `forms` (other forms are ignored), their models read from
    `<models_dir>/<kind>/<name>` (see interrogators/reference.py). Nothing is loaded here: weights go through
    `cache` on first use or `InterrogatorSet.warm()`. A form whose folder is missing is left out (logged),
    so the worker does not advertise it. `low_memory` picks BLIP base over BLIP large. `torch_threads`, when
    given, sets torch's intra-op thread count (an operator setting; never done at import)."""
    if torch_threads is not None:
        torch.set_num_threads(max(1, int(torch_threads)))
    dtype = getattr(device, "dtype", torch.float32)
    embeddings_dir = Path(embeddings_dir) if embeddings_dir else Path(models_dir) / CLIP_KIND / "embeddings"
    wanted = set(forms)
    found = InterrogatorSet()

    def folder(kind: str, name: str, form: str) -> Path | None:
        path = model_dir(models_dir, kind, name)
        if is_complete(path):
            return path
        logger.warning(
            "form %s needs model %s in %s, which is missing or incomplete; not serving it", form, name, path
        )
        return None

    if CAPTION_FORM in wanted:
        name = caption_model or (CAPTION_BASE if low_memory else CAPTION_LARGE)
        if path := folder(CAPTION_KIND, name, CAPTION_FORM):
            found.caption = Captioner(path, cache=cache, dtype=dtype)
    if INTERROGATION_FORM in wanted and (path := folder(CLIP_KIND, clip_model, INTERROGATION_FORM)):
        found.interrogation = ClipInterrogator(
            path, cache=cache, embeddings_dir=embeddings_dir, dtype=dtype, terms_path=terms_path
        )
    if NSFW_FORM in wanted and (path := folder(SAFETY_KIND, nsfw_model, NSFW_FORM)):
        found.nsfw = NsfwChecker(path, cache=cache, dtype=dtype)
    logger.info("interrogators ready for: %s", ", ".join(found.ready_forms()) or "nothing")
    return found
