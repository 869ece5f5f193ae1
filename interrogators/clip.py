"""The interrogation form: CLIP ranks the term lists of each category against the image."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.common import option_bool, option_int
from interrogators.embedding import ClipBundle, ClipEmbedder, embed_texts, load_clip
from interrogators.terms import CATEGORIES, DEFAULT_TERMS_PATH, TermList, load_terms

logger = logging.getLogger(__name__)

DEFAULT_TOP_COUNT = 5
MAX_TOP_COUNT = 50

# Where these lived before the CLIP was shared (interrogators.embedding); kept importable from here.
__all__ = ["ClipBundle", "ClipInterrogator", "embed_texts", "load_clip"]


class ClipInterrogator:
    """`interrogate(image, payload)` -> {"interrogation": {category: [{"text", "confidence"}]}}.

    Confidence is the cosine similarity x100 (comparable across categories and images), or with payload
    `rank: true` the softmax share within the category x100, as the legacy horde interrogator's rank mode.
    The CLIP is a `ClipEmbedder`, shared with the nsfw and aesthetic forms and the safety pass when given.
    """

    def __init__(
        self,
        folder: Path,
        *,
        cache: Any,
        embeddings_dir: Path,
        dtype: torch.dtype = torch.float32,
        terms_path: Path = DEFAULT_TERMS_PATH,
        embedder: ClipEmbedder | None = None,
    ) -> None:
        self.embedder = embedder or ClipEmbedder(
            folder, cache=cache, embeddings_dir=embeddings_dir, dtype=dtype
        )
        self.folder = self.embedder.folder
        self.key = self.embedder.key
        self.terms_path = Path(terms_path)
        self._lists = self._read_lists()

    @property
    def load_seconds(self) -> float:
        """Seconds spent loading weights so far: jobs report the share of their run that was loading."""
        return self.embedder.load_seconds

    @property
    def embeddings_computed(self) -> int:
        """Term lists embedded from scratch (tests and stats read it)."""
        return self.embedder.embeddings_computed

    def _read_lists(self) -> dict[str, TermList]:
        lists = load_terms(self.terms_path)
        missing = [c for c in CATEGORIES if c not in lists]
        if missing:
            logger.warning(
                "terms file %s lacks categories %s; they come back empty", self.terms_path, missing
            )
        return lists

    def reload_terms(self) -> None:
        """Re-read the terms file; changed categories are re-embedded on next use."""
        self._lists = self._read_lists()

    def loaded(self) -> AbstractContextManager[ClipBundle]:
        """The model bundle, locked in the cache while the block runs."""
        return self.embedder.loaded()

    def warm(self) -> None:
        """Load the model and make sure every category's embeddings exist: done at start, the first
        interrogation on a CPU would otherwise spend a minute of its 3-minute TTL embedding terms."""
        self.embedder.warm(list(self._lists.values()))

    def interrogate(self, image: Image.Image, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        payload = options or {}
        top_count = option_int(payload, "top_count", DEFAULT_TOP_COUNT, 1, MAX_TOP_COUNT)
        rank = option_bool(payload, "rank", False)
        image_features = self.embedder.image_embedding(image)
        tables = {c: self.embedder.term_embeddings(t) for c, t in self._lists.items()}
        result: dict[str, list[dict[str, Any]]] = {c: [] for c in CATEGORIES}
        for category, embeddings in tables.items():
            result[category] = _top_terms(self._lists[category], embeddings @ image_features, top_count, rank)
        return {"interrogation": result}


def _top_terms(terms: TermList, cosine: torch.Tensor, top_count: int, rank: bool) -> list[dict[str, Any]]:
    # CLIP's logit scale is 100: softmax over 100*cosine is its zero-shot probability within the category.
    scores = torch.softmax(100.0 * cosine, dim=-1) * 100.0 if rank else cosine * 100.0
    values, indices = scores.topk(min(top_count, scores.numel()))
    return [
        {"text": terms.terms[i], "confidence": round(float(v), 2)}
        for v, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
