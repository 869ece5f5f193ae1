"""InterrogatorSet and build_interrogators: the interrogators a worker's forms need, and nothing else.

One CLIP (`ClipEmbedder`) serves the interrogation form and the safety pass (`SafetyPass`), which in turn
serves the nsfw and aesthetic forms and checks generated images; `build_safety` builds that pass alone for
a worker that only generates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interrogators import aesthetic, deepdanbooru
from interrogators.caption import Captioner
from interrogators.clip import ClipInterrogator
from interrogators.embedding import ClipEmbedder
from interrogators.nsfw import NsfwChecker
from interrogators.reference import (
    AESTHETIC,
    AESTHETIC_KIND,
    CAPTION_BASE,
    CAPTION_KIND,
    CAPTION_LARGE,
    CLIP_KIND,
    CLIP_L14,
    DEEPDANBOORU,
    DEEPDANBOORU_KIND,
    SAFETY_CHECKER,
    SAFETY_KIND,
    is_complete,
    model_dir,
    reference_sha256,
)
from interrogators.safety import SafetyPass, WeightsFile
from interrogators.terms import DEFAULT_TERMS_PATH

logger = logging.getLogger(__name__)

CAPTION_FORM = "caption"
INTERROGATION_FORM = "interrogation"
NSFW_FORM = "nsfw"
AESTHETIC_FORM = "aesthetic"
INTERROGATOR_FORMS = (CAPTION_FORM, INTERROGATION_FORM, NSFW_FORM, AESTHETIC_FORM)


@dataclass
class InterrogatorSet:
    caption: Captioner | None = None
    interrogation: ClipInterrogator | None = None
    safety: SafetyPass | None = None  # the nsfw and aesthetic forms

    def ready_forms(self) -> list[str]:
        """The interrogator forms this set can serve now (their models are present)."""
        ready = {
            CAPTION_FORM: self.caption is not None,
            INTERROGATION_FORM: self.interrogation is not None,
            NSFW_FORM: self.safety is not None and self.safety.can_decide,
            AESTHETIC_FORM: self.safety is not None and self.safety.scores_aesthetics,
        }
        return [form for form in INTERROGATOR_FORMS if ready[form]]

    def warm(self) -> None:
        """Load each model once and embed the term lists, so that the first jobs pay no start-up cost.
        Call at worker start, before the first pop."""
        for model in (self.caption, self.interrogation, self.safety):
            if model is not None:
                model.warm()


def _weights_file(models_dir: Path, kind: str, name: str, file_name: str, default: str) -> WeightsFile | None:
    """A single-file model of the safety pass, with the reference's sha256 for the default name."""
    path = model_dir(models_dir, kind, name) / file_name
    if not path.is_file():
        logger.warning("the safety pass needs %s at %s, which is missing", name, path)
        return None
    return WeightsFile(path, reference_sha256(default) if name == default else None)


def _folder(models_dir: Path, kind: str, name: str, needed_by: str) -> Path | None:
    path = model_dir(models_dir, kind, name)
    if is_complete(path):
        return path
    logger.warning("%s needs model %s in %s, which is missing or incomplete", needed_by, name, path)
    return None


def build_safety(
    *,
    models_dir: Path,
    cache: Any,
    clip_model: str = CLIP_L14,
    danbooru_model: str | None = DEEPDANBOORU,
    aesthetic_model: str | None = AESTHETIC,
    embeddings_dir: Path | None = None,
    embedder: ClipEmbedder | None = None,
) -> SafetyPass | None:
    """The safety pass from `<models_dir>/<kind>/<name>` (nothing loaded yet), or None without its CLIP.
    Without DeepDanbooru (`danbooru_model=None` or a missing file) it only scores aesthetics (`can_decide`
    is False); without the aesthetic predictor it only decides."""
    if embedder is None:
        folder = _folder(models_dir, CLIP_KIND, clip_model, "the safety pass")
        if folder is None:
            return None
        embeddings = _embeddings_dir(models_dir, embeddings_dir)
        embedder = ClipEmbedder(folder, cache=cache, embeddings_dir=embeddings)
    danbooru = scorer = None
    if danbooru_model is not None:
        danbooru = _weights_file(
            models_dir, DEEPDANBOORU_KIND, danbooru_model, deepdanbooru.FILE_NAME, DEEPDANBOORU
        )
    if aesthetic_model is not None:
        scorer = _weights_file(models_dir, AESTHETIC_KIND, aesthetic_model, aesthetic.FILE_NAME, AESTHETIC)
    return SafetyPass(embedder, cache=cache, danbooru=danbooru, aesthetic=scorer)


def build_sd_safety_checker(*, models_dir: Path, cache: Any, device: Any, name: str = SAFETY_CHECKER):
    """Stable Diffusion's own safety checker (the operator's optional second opinion), or None."""
    path = _folder(models_dir, SAFETY_KIND, name, "sd_safety_checker")
    return NsfwChecker(path, cache=cache, dtype=getattr(device, "dtype", torch.float32)) if path else None


def _embeddings_dir(models_dir: Path, embeddings_dir: Path | None) -> Path:
    return Path(embeddings_dir) if embeddings_dir else Path(models_dir) / CLIP_KIND / "embeddings"


def build_interrogators(
    *,
    models_dir: Path,
    cache: Any,
    device: Any,
    forms: Sequence[str],
    low_memory: bool = False,
    caption_model: str | None = None,
    clip_model: str = CLIP_L14,
    danbooru_model: str = DEEPDANBOORU,
    aesthetic_model: str = AESTHETIC,
    embeddings_dir: Path | None = None,
    terms_path: Path = DEFAULT_TERMS_PATH,
    torch_threads: int | None = None,
) -> InterrogatorSet:
    """Interrogators for `forms` (other forms are ignored), their models read from
    `<models_dir>/<kind>/<name>` (see interrogators/reference.py). Nothing is loaded here: weights go through
    `cache` on first use or `InterrogatorSet.warm()`. A form whose model is missing is left out (logged),
    so the worker does not advertise it. `low_memory` picks BLIP base over BLIP large. `torch_threads`, when
    given, sets torch's intra-op thread count (an operator setting; never done at import). The CLIP runs in
    float32 whatever the device: it may run on the CPU (see interrogators.safety)."""
    if torch_threads is not None:
        torch.set_num_threads(max(1, int(torch_threads)))
    dtype = getattr(device, "dtype", torch.float32)
    embeddings = _embeddings_dir(models_dir, embeddings_dir)
    wanted = set(forms)
    found = InterrogatorSet()

    if CAPTION_FORM in wanted:
        name = caption_model or (CAPTION_BASE if low_memory else CAPTION_LARGE)
        if path := _folder(models_dir, CAPTION_KIND, name, f"form {CAPTION_FORM}"):
            found.caption = Captioner(path, cache=cache, dtype=dtype)
    clip_forms = wanted & {INTERROGATION_FORM, NSFW_FORM, AESTHETIC_FORM}
    clip = _folder(models_dir, CLIP_KIND, clip_model, f"forms {sorted(clip_forms)}") if clip_forms else None
    if clip is not None:
        embedder = ClipEmbedder(clip, cache=cache, embeddings_dir=embeddings)
        if INTERROGATION_FORM in wanted:
            found.interrogation = ClipInterrogator(
                clip, cache=cache, embeddings_dir=embeddings, terms_path=terms_path, embedder=embedder
            )
        if wanted & {NSFW_FORM, AESTHETIC_FORM}:
            found.safety = build_safety(
                models_dir=models_dir,
                cache=cache,
                danbooru_model=danbooru_model if NSFW_FORM in wanted else None,
                aesthetic_model=aesthetic_model if AESTHETIC_FORM in wanted else None,
                embedder=embedder,
            )
    logger.info("interrogators ready for: %s", ", ".join(found.ready_forms()) or "nothing")
    return found
