"""The safety pass: the horde's CSAM/NSFW decision and the aesthetic score, from one CLIP embedding.

`SafetyPass.check(images, negative_prompt)` embeds each image once (shared `ClipEmbedder`), compares the
embedding with the cached text embeddings of the safety concepts (`safety_concepts`), decides
(`safety_decision.decide`, DeepDanbooru for anime images) and scores the same embedding with the aesthetic
head. The nsfw and aesthetic alchemy forms are served from the same object, so an alchemy request with
nsfw, interrogation and aesthetic forms on one source pays one CLIP forward.

Models go through the shared model cache with `if_room=True`: on the GPU when there is room in its budget
without evicting, else on the CPU. They are kept in float32 for that reason (half precision convolutions
run hundreds of times slower on a CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.aesthetic import AestheticHead, load_aesthetic
from interrogators.deepdanbooru import DeepDanbooru, load_deepdanbooru, rate
from interrogators.embedding import ClipEmbedder
from interrogators.safety_concepts import SafetyConcepts, default_concepts
from interrogators.safety_decision import AnimeVerdict, Verdict, decide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafetyResult:
    verdict: Verdict
    aesthetic: float | None = None  # None when the pass has no aesthetic head or was not asked for it


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    sha256: str | None = None  # checked before loading when known (the reference's)


class SafetyPass:
    def __init__(
        self,
        embedder: ClipEmbedder,
        *,
        cache: Any,
        danbooru: WeightsFile | None,
        aesthetic: WeightsFile | None,
        concepts: SafetyConcepts | None = None,
    ) -> None:
        self.embedder = embedder
        self.concepts = concepts or default_concepts()
        self.terms = self.concepts.terms()
        self._cache = cache
        self._danbooru = danbooru
        self._aesthetic = aesthetic
        self._own_load_seconds = 0.0

    @property
    def can_decide(self) -> bool:
        """The full decision needs DeepDanbooru for anime images: without it nothing is checked."""
        return self._danbooru is not None

    @property
    def scores_aesthetics(self) -> bool:
        return self._aesthetic is not None

    @property
    def load_seconds(self) -> float:
        return self.embedder.load_seconds + self._own_load_seconds

    def _load(self, loader: Any, weights: WeightsFile) -> Any:
        started = time.perf_counter()
        try:
            return loader(weights.path, weights.sha256)
        finally:
            self._own_load_seconds += time.perf_counter() - started

    def _use_danbooru(self) -> AbstractContextManager[DeepDanbooru]:
        weights = self._danbooru
        if weights is None:
            raise RuntimeError("the safety pass has no DeepDanbooru model")
        key = f"interrogator:deepdanbooru:{weights.path}"
        return self._cache.use(key, lambda: self._load(load_deepdanbooru, weights), if_room=True)

    def _use_aesthetic(self) -> AbstractContextManager[AestheticHead]:
        weights = self._aesthetic
        if weights is None:
            raise RuntimeError("the safety pass has no aesthetic predictor")
        key = f"interrogator:aesthetic:{weights.path}"
        return self._cache.use(key, lambda: self._load(load_aesthetic, weights), if_room=True)

    def warm(self) -> None:
        """Load every model once and embed the concept lists (cached on disk): at start, not in a job."""
        self.embedder.warm([self.terms])
        if self._danbooru is not None:
            with self._use_danbooru():
                pass
        if self._aesthetic is not None:
            with self._use_aesthetic() as head:
                self._check_width(head)

    def _check_width(self, head: AestheticHead) -> None:
        width = int(self.embedder.term_embeddings(self.terms).shape[-1])
        if head.input_width != width:
            raise ValueError(
                f"the aesthetic predictor reads {head.input_width}-wide embeddings; this CLIP gives {width}"
            )

    def similarities(self, embeddings: torch.Tensor) -> list[dict[str, float]]:
        """Per image: concept text -> cosine similarity, rounded to 4 decimals as the horde compares."""
        table = self.embedder.term_embeddings(self.terms)
        scores = (embeddings @ table.T).tolist()
        return [{t: round(s, 4) for t, s in zip(self.terms.terms, row, strict=True)} for row in scores]

    def _rate_anime(self, image: Image.Image) -> AnimeVerdict:
        with self._use_danbooru() as model:
            ratings = rate(model, image)
        return AnimeVerdict(nsfw=ratings.is_nsfw, realistic=ratings.realistic, ratings=ratings.as_dict())

    def _aesthetic_scores(self, embeddings: torch.Tensor) -> list[float]:
        with self._use_aesthetic() as head:
            self._check_width(head)
            return [head.score(row) for row in embeddings]

    def check(
        self, images: Sequence[Image.Image], negative_prompt: str | None = None, *, aesthetic: bool = True
    ) -> list[SafetyResult]:
        """One result per image. Raises when any part fails: the caller must not pass unchecked images."""
        if not self.can_decide:
            raise RuntimeError("the safety pass cannot decide without its DeepDanbooru model")
        if not images:
            return []
        embeddings = self.embedder.image_embeddings(images)
        verdicts: list[Verdict] = []
        for image, similarities in zip(images, self.similarities(embeddings), strict=True):
            verdict = decide(
                similarities,
                concepts=self.concepts,
                negative_prompt=negative_prompt,
                rate_anime=lambda image=image: self._rate_anime(image),
            )
            if verdict.is_nsfw or verdict.is_underage:
                logger.info(
                    "safety: csam=%s nsfw=%s anime=%s underage=%s (nsfw hits %s; underage hits %s)",
                    verdict.is_csam, verdict.is_nsfw, verdict.is_anime, verdict.is_underage,
                    sorted(verdict.nsfw_hits), sorted(verdict.underage_hits),
                )  # fmt: skip
            verdicts.append(verdict)
        scores: list[float | None] = [None] * len(images)
        if aesthetic and self.scores_aesthetics:
            scores = list(self._aesthetic_scores(embeddings))
        return [SafetyResult(v, s) for v, s in zip(verdicts, scores, strict=True)]

    def is_nsfw(self, image: Image.Image) -> bool:
        """The nsfw form: the horde's NSFW verdict on one image (no prompt: alchemy has none)."""
        return self.check([image], aesthetic=False)[0].verdict.is_nsfw

    def aesthetic_score(self, image: Image.Image) -> float:
        """The aesthetic form: the predictor's score of one image."""
        return self._aesthetic_scores(self.embedder.image_embeddings([image]))[0]
