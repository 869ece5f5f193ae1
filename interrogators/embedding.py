"""One CLIP model, shared: image embeddings computed once per image, text embeddings cached on disk.

The interrogation form, the nsfw and aesthetic forms and the safety pass over generated images all read
the same CLIP ViT-L/14. A `ClipEmbedder` owns it (through the model cache, under one key), so that

* an image is embedded by one CLIP forward whoever asks: the latest embeddings are kept by the image's
  content, so the forms of one alchemy request (each a job with its own download of the same source) and
  the safety pass and aesthetic score of a generated image share one forward;
* a term list (the interrogation categories, the safety concepts) is embedded once per (model, list) and
  kept on disk (`interrogators.terms.EmbeddingStore`).

The model runs on the GPU when it is there already or fits the VRAM budget without evicting anything, and
on the CPU otherwise (`ModelCache.use(if_room=True)`): a side pass never pushes a generation model out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from interrogators.common import module_place, pooled, rgb
from interrogators.terms import EmbeddingStore, TermList, model_fingerprint

logger = logging.getLogger(__name__)

TEXT_BATCH = 256
# Embeddings kept by image content: enough for the forms of a few requests in flight and a generation batch.
MEMO_IMAGES = 32


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


def embed_images(bundle: ClipBundle, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalised float32 CPU image embeddings [n, dim]: one batched CLIP vision forward."""
    inputs = bundle.processor(images=[rgb(i) for i in images], return_tensors="pt")
    device, dtype = module_place(bundle.model)
    with torch.inference_mode():
        features = bundle.model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype))
    return torch.nn.functional.normalize(pooled(features).float().cpu(), dim=-1)


def image_digest(image: Image.Image) -> str:
    """Identity of an image's pixels (two downloads of one source give the same digest)."""
    digest = hashlib.blake2b(f"{image.mode}:{image.size}".encode(), digest_size=20)
    digest.update(image.tobytes())
    return digest.hexdigest()


class ClipEmbedder:
    """CLIP from a transformers-format folder, loaded through the shared model cache on first use."""

    def __init__(
        self,
        folder: Path,
        *,
        cache: Any,
        embeddings_dir: Path,
        dtype: torch.dtype = torch.float32,
        memo_images: int = MEMO_IMAGES,
    ) -> None:
        self.folder = Path(folder)
        self.key = f"interrogator:clip:{self.folder.name}"
        self.model_id = model_fingerprint(self.folder)
        self.store = EmbeddingStore(embeddings_dir)
        self._cache = cache
        self._dtype = dtype
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memo_size = memo_images
        self._texts: dict[str, tuple[str, torch.Tensor]] = {}
        self._text_lock = threading.Lock()
        # One image forward at a time: a second form on the same source waits and then finds it memoised.
        self._image_lock = threading.Lock()
        self.load_seconds = 0.0  # jobs report the share of their run that was loading
        self.embeddings_computed = 0  # term lists embedded from scratch (tests and stats read it)
        self.image_forwards = 0  # images that went through the CLIP vision tower

    def _load(self) -> ClipBundle:
        started = time.perf_counter()
        try:
            return load_clip(self.folder, self._dtype)
        finally:
            self.load_seconds += time.perf_counter() - started

    def loaded(self) -> AbstractContextManager[ClipBundle]:
        """The bundle, locked in the cache: on the GPU when it fits there without evicting, else the CPU."""
        return self._cache.use(self.key, self._load, if_room=True)

    def term_embeddings(self, terms: TermList) -> torch.Tensor:
        """[len(terms), dim] L2-normalised embeddings of a list's prompts: memory, then disk, then CLIP."""
        with self._text_lock:
            held = self._texts.get(terms.category)
            if held is not None and held[0] == terms.digest:
                return held[1]
            embeddings = self.store.load(self.model_id, terms)
            if embeddings is None:
                started = time.perf_counter()
                with self.loaded() as bundle:
                    embeddings = embed_texts(bundle, terms.prompts)
                self.store.save(self.model_id, terms, embeddings)
                self.embeddings_computed += 1
                logger.info(
                    "embedded %d %s terms in %.1fs",
                    len(terms.terms),
                    terms.category,
                    time.perf_counter() - started,
                )
            self._texts[terms.category] = (terms.digest, embeddings)
            return embeddings

    def forget_terms(self) -> None:
        """Drop the in-memory term embeddings (the disk cache stays): the next use reads the disk again."""
        with self._text_lock:
            self._texts.clear()

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, dim] L2-normalised float32 embeddings; images seen recently are not embedded again."""
        if not images:
            return torch.empty(0)
        digests = [image_digest(image) for image in images]
        with self._image_lock:
            missing = {d: i for i, d in reversed(list(enumerate(digests))) if d not in self._memo}
            if missing:
                with self.loaded() as bundle:
                    fresh = embed_images(bundle, [images[i] for i in missing.values()])
                self.image_forwards += len(missing)
                for digest, row in zip(missing, fresh, strict=True):
                    self._memo[digest] = row
            for digest in digests:
                self._memo.move_to_end(digest)
            rows = torch.stack([self._memo[d] for d in digests])
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return rows

    def forget_images(self) -> None:
        """Drop the kept image embeddings (benchmarks time real forwards with this)."""
        with self._image_lock:
            self._memo.clear()

    def image_embedding(self, image: Image.Image) -> torch.Tensor:
        return self.image_embeddings([image])[0]

    def warm(self, lists: Sequence[TermList] = ()) -> None:
        """Load the model once and make sure the lists' embeddings exist (at start, before the first pop)."""
        with self.loaded():
            for terms in lists:
                self.term_embeddings(terms)
