"""ClipEmbedder: one CLIP forward per image content, whichever form or pass asks, and the forms on one
source (nsfw, interrogation, aesthetic) embedding it once."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import torch
from PIL import Image

from interrogators import ClipEmbedder
from interrogators.reference import CLIP_KIND, model_dir
from interrogators.tiny import TINY_CLIP
from models.cache import ModelCache
from tests.interrogators.helpers import encoded, picture, tiny_set


def embedder(models_dir: Path, cache: ModelCache, tmp_path: Path, **kw) -> ClipEmbedder:
    folder = model_dir(models_dir, CLIP_KIND, TINY_CLIP)
    return ClipEmbedder(folder, cache=cache, embeddings_dir=tmp_path, **kw)


def test_same_pixels_are_embedded_once(models_dir: Path, cache: ModelCache, tmp_path: Path) -> None:
    clip = embedder(models_dir, cache, tmp_path)
    first = clip.image_embedding(picture(1))
    again = clip.image_embedding(Image.open(io.BytesIO(encoded(picture(1)))))  # another download, same pixels
    assert clip.image_forwards == 1 and torch.equal(first, again)
    assert abs(float(first.norm()) - 1.0) < 1e-5
    batch = clip.image_embeddings([picture(1), picture(2), picture(3)])
    assert clip.image_forwards == 3  # only the two new images went through CLIP, in one batch
    assert torch.equal(batch[0], first) and not torch.equal(batch[1], batch[2])


def test_memo_is_bounded(models_dir: Path, cache: ModelCache, tmp_path: Path) -> None:
    clip = embedder(models_dir, cache, tmp_path, memo_images=2)
    for seed in (1, 2, 3):
        clip.image_embedding(picture(seed, (32, 32)))
    clip.image_embedding(picture(1, (32, 32)))  # evicted by the third: embedded again
    assert clip.image_forwards == 4


def test_forms_on_one_source_share_one_forward(models_dir: Path, cache: ModelCache, tmp_path: Path) -> None:
    forms = tiny_set(models_dir, cache, embeddings_dir=tmp_path)
    forms.warm()
    clip = forms.interrogation.embedder
    before = clip.image_forwards
    source = encoded(picture(5))
    results: list[object] = []
    jobs = [
        lambda: results.append(forms.safety.is_nsfw(Image.open(io.BytesIO(source)))),
        lambda: results.append(forms.interrogation.interrogate(Image.open(io.BytesIO(source)), None)),
        lambda: results.append(forms.safety.aesthetic_score(Image.open(io.BytesIO(source)))),
    ]
    threads = [threading.Thread(target=job) for job in jobs]  # as the daemon runs forms: concurrently
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    assert clip.image_forwards - before == 1
