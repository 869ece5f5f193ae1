"""The interrogation form: CLIP ranks the term lists of each category against the image."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.common import module_place, option_bool, option_int, pooled, rgb
from interrogators.terms import (
    CATEGORIES,
    DEFAULT_TERMS_PATH,
    EmbeddingStore,
    TermList,
    load_terms,
    model_fingerprint,
)

logger = logging.getLogger(__name__)

DEFAULT_TOP_COUNT = 5
MAX_TOP_COUNT = 50
TEXT_BATCH = 256


@dataclass
class ClipBundle:
    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor

    def torch_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}


def load_clip(folder: Path, dtype: torch.dtype) -> ClipBundle:
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    model = CLIPModel.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    return ClipBundle(model=model, processor=processor)


def embed_texts(bundle: ClipBundle, texts: list[str], batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """L2-normalised float32 CPU text embeddings, in the order of `texts`."""
    device, _ = module_place(bundle.model)
    # Sorting by length keeps padding (wasted compute) small within each batch.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            tokens = bundle.processor.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(device)
            features = pooled(bundle.model.get_text_features(**tokens)).float().cpu()
            if out.numel() == 0:
                out = torch.empty(len(texts), features.shape[-1])
            out[torch.tensor(chunk)] = features
    return torch.nn.functional.normalize(out, dim=-1)


class ClipInterrogator:
    """`interrogate(image, payload)` -> {"interrogation": {category: [{"text", "confidence"}]}}.

    Confidence is the cosine similarity x100 (comparable across categories and images), or with payload
    `rank: true` the softmax share within the category x100, as the legacy horde interrogator's rank mode.
    """

    def __init__(
        self,
        folder: Path,
        *,
        cache: Any,
        embeddings_dir: Path,
        dtype: torch.dtype = torch.float32,
        terms_path: Path = DEFAULT_TERMS_PATH,
    ) -> None:
        self.folder = Path(folder)
        self.key = f"interrogator:clip:{self.folder.name}"
        self.terms_path = Path(terms_path)
        self._cache = cache
        self._dtype = dtype
        # Seconds spent loading weights so far: jobs report the share of their run that was loading.
        self.load_seconds = 0.0
        self._store = EmbeddingStore(embeddings_dir)
        self._model_id = model_fingerprint(self.folder)
        self._lists = self._read_lists()
        self._embeddings: dict[str, tuple[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.embeddings_computed = 0  # categories embedded from scratch (tests and stats read it)

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

    def _load(self) -> ClipBundle:
        started = time.perf_counter()
        try:
            return load_clip(self.folder, self._dtype)
        finally:
            self.load_seconds += time.perf_counter() - started

    def loaded(self) -> AbstractContextManager[ClipBundle]:
        """The model bundle on the execution device, locked in the cache while the block runs."""
        return self._cache.use(self.key, self._load)

    def warm(self) -> None:
        """Load the model and make sure every category's embeddings exist: done at start, the first
        interrogation on a CPU would otherwise spend a minute of its 3-minute TTL embedding terms."""
        with self.loaded() as bundle:
            for terms in self._lists.values():
                self._term_embeddings(bundle, terms)

    def _term_embeddings(self, bundle: ClipBundle, terms: TermList) -> torch.Tensor:
        with self._lock:
            held = self._embeddings.get(terms.category)
            if held is not None and held[0] == terms.digest:
                return held[1]
            embeddings = self._store.load(self._model_id, terms)
            if embeddings is None:
                started = time.perf_counter()
                embeddings = embed_texts(bundle, terms.prompts)
                self._store.save(self._model_id, terms, embeddings)
                self.embeddings_computed += 1
                logger.info(
                    "embedded %d %s terms in %.1fs",
                    len(terms.terms),
                    terms.category,
                    time.perf_counter() - started,
                )
            self._embeddings[terms.category] = (terms.digest, embeddings)
            return embeddings

    def image_embedding(self, bundle: ClipBundle, image: Image.Image) -> torch.Tensor:
        inputs = bundle.processor(images=rgb(image), return_tensors="pt")
        device, dtype = module_place(bundle.model)
        with torch.inference_mode():
            features = bundle.model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype))
        return torch.nn.functional.normalize(pooled(features).float().cpu(), dim=-1)[0]

    def interrogate(self, image: Image.Image, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        payload = options or {}
        top_count = option_int(payload, "top_count", DEFAULT_TOP_COUNT, 1, MAX_TOP_COUNT)
        rank = option_bool(payload, "rank", False)
        with self.loaded() as bundle:
            image_features = self.image_embedding(bundle, image)
            tables = {c: self._term_embeddings(bundle, t) for c, t in self._lists.items()}
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
