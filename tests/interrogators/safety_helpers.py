"""A safety pass whose similarities the test chooses (shared by the interrogator, generation and job tests).

The pass runs on the tiny split CLIP (interrogators/tiny.py): every image embeds to one vector e0 and
every text lands orthogonal to it, so all similarities are 0 (nothing found) unless a test writes the
concept embeddings itself: `place_concepts` puts each concept at exactly the cosine it is given, in the
pass's real on-disk cache, and the real pass reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image

from interrogators import SafetyPass, build_safety
from interrogators.tiny import TINY_AESTHETIC, TINY_DEEPDANBOORU, TINY_SPLIT_CLIP, write_deepdanbooru

# Scenarios: concept -> similarity (every other concept at 0). Thresholds in interrogators/safety_concepts.
ADULT_NUDE = {"photo of a woman": 0.25, "nude": 0.25}
PHOTO_CSAM = {"photo of a girl": 0.25, "nude": 0.25, "child": 0.24}  # "child" above its danger level 0.225
# Anime: two weak underage hits pass the anime second pass (child > 0.19175, toddler > 0.191375).
ANIME_UNDERAGE = {"anime": 0.25, "cartoon": 0.22, "child": 0.2, "toddler": 0.2}
# Below the photo second pass (child 0.204, toddler 0.201) unless the negative prompt is suspect (0.197,
# 0.1955): adult-age words in it make this image CSAM.
BORDERLINE_UNDERAGE = {**ADULT_NUDE, "child": 0.2, "toddler": 0.2}
EXPLICIT = {"rating:explicit": 1.0, "rating:safe": -1.0, "rating:questionable": -1.0, "realistic": -1.0}


def tiny_safety(
    models_dir: Path,
    cache,
    embeddings_dir: Path,
    *,
    danbooru: str = TINY_DEEPDANBOORU,
    aesthetic: bool = True,
) -> SafetyPass:
    safety = build_safety(
        models_dir=models_dir,
        cache=cache,
        clip_model=TINY_SPLIT_CLIP,
        danbooru_model=danbooru,
        aesthetic_model=TINY_AESTHETIC if aesthetic else None,
        embeddings_dir=embeddings_dir,
    )
    assert safety is not None and safety.can_decide
    return safety


def add_deepdanbooru(models_dir: Path, name: str, leaning: Mapping[str, float]) -> str:
    """Another tiny DeepDanbooru next to the default one, whose ratings lean as asked."""
    folder = models_dir / "deepdanbooru" / name
    if not (folder / "model-resnet_custom_v3.pt").is_file():
        write_deepdanbooru(folder / "model-resnet_custom_v3.pt", dict(leaning))
    return name


def image_vector(safety: SafetyPass) -> torch.Tensor:
    """e0: what the split CLIP makes of any image."""
    return safety.embedder.image_embedding(Image.new("RGB", (8, 8), (1, 2, 3)))


def place_concepts(safety: SafetyPass, similarities: Mapping[str, float], default: float = 0.0) -> None:
    """Write the concept embeddings so that each concept's cosine with every image is as given."""
    e0 = image_vector(safety)
    half = e0.numel() // 2
    assert float(e0[half:].abs().max()) == 0.0, "not the split CLIP"
    unknown = set(similarities) - set(safety.terms.terms)
    assert not unknown, f"not safety concepts: {unknown}"
    rows = []
    for index, text in enumerate(safety.terms.terms):
        cosine = similarities.get(text, default)
        away = torch.zeros_like(e0)
        away[half + index % half] = 1.0  # orthogonal to every image embedding
        rows.append(cosine * e0 + math.sqrt(1.0 - cosine * cosine) * away)
    safety.embedder.store.save(safety.embedder.model_id, safety.terms, torch.stack(rows))
    safety.embedder.forget_terms()
