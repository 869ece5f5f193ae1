"""The interrogation form: tiny random-weight CLIP, real term lists, the on-disk embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interrogators import ClipInterrogator, InterrogatorSet
from interrogators.reference import CLIP_KIND, model_dir
from interrogators.terms import CATEGORIES, DEFAULT_TERMS_PATH, EmbeddingStore, load_terms, model_fingerprint
from interrogators.tiny import TINY_CLIP
from models.cache import ModelCache
from tests.interrogators.helpers import picture


def test_result_has_every_category_ranked(interrogators: InterrogatorSet) -> None:
    result = interrogators.interrogation.interrogate(picture(1), {"top_count": 3})
    assert list(result) == ["interrogation"]
    ranked = result["interrogation"]
    assert list(ranked) == list(CATEGORIES)
    terms = load_terms()
    for category, entries in ranked.items():
        assert len(entries) == 3
        assert all(set(e) == {"text", "confidence"} for e in entries)
        assert all(e["text"] in terms[category].terms for e in entries)
        confidences = [e["confidence"] for e in entries]
        assert confidences == sorted(confidences, reverse=True)
        assert all(isinstance(c, float) and -100 <= c <= 100 for c in confidences)


def test_top_count_default_clamp_and_rank_mode(interrogators: InterrogatorSet) -> None:
    clip = interrogators.interrogation
    assert len(clip.interrogate(picture(2), None)["interrogation"]["tags"]) == 5
    assert len(clip.interrogate(picture(2), {"top_count": 0})["interrogation"]["sites"]) == 1
    assert len(clip.interrogate(picture(2), {"top_count": 10_000})["interrogation"]["sites"]) == 17  # all
    similarity = clip.interrogate(picture(2), {"top_count": 17})["interrogation"]["sites"]
    ranked = clip.interrogate(picture(2), {"top_count": 17, "rank": True})["interrogation"]["sites"]
    # Rank mode: the same order, confidences are shares of 100 within the category.
    assert [e["text"] for e in ranked] == [e["text"] for e in similarity]
    assert sum(e["confidence"] for e in ranked) == pytest.approx(100, abs=0.2)


def test_different_images_rank_differently(interrogators: InterrogatorSet) -> None:
    clip = interrogators.interrogation
    a = clip.interrogate(picture(1), {"top_count": 5})["interrogation"]
    b = clip.interrogate(picture(3).rotate(90, expand=True), {"top_count": 5})["interrogation"]
    assert a != b


def _terms_copy(tmp_path: Path) -> Path:
    """The shipped lists cut to 40 terms each: the cache logic is the same, the test 10x faster."""
    data = json.loads(DEFAULT_TERMS_PATH.read_text(encoding="utf-8"))
    for entry in data["categories"].values():
        entry["terms"] = entry["terms"][:40]
    path = tmp_path / "terms.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_embeddings_are_cached_on_disk_and_invalidated_by_a_list_change(
    models_dir: Path, cache: ModelCache, tmp_path: Path
) -> None:
    folder = model_dir(models_dir, CLIP_KIND, TINY_CLIP)
    terms_path, store_dir = _terms_copy(tmp_path), tmp_path / "embeddings"

    first = ClipInterrogator(folder, cache=cache, embeddings_dir=store_dir, terms_path=terms_path)
    before = first.interrogate(picture(1), {"top_count": 4})
    assert first.embeddings_computed == len(CATEGORIES)
    files = sorted(store_dir.rglob("*.safetensors"))
    assert len(files) == len(CATEGORIES)

    # A new process (a new interrogator) reads the cache instead of embedding again, with the same results.
    second = ClipInterrogator(folder, cache=cache, embeddings_dir=store_dir, terms_path=terms_path)
    assert second.interrogate(picture(1), {"top_count": 4}) == before
    assert second.embeddings_computed == 0

    data = json.loads(terms_path.read_text(encoding="utf-8"))
    data["categories"]["mediums"]["terms"] = ["a zz-new-medium", "another zz-new-medium"]
    terms_path.write_text(json.dumps(data), encoding="utf-8")
    second.reload_terms()
    after = second.interrogate(picture(1), {"top_count": 4})
    assert second.embeddings_computed == 1  # only the changed category
    assert {e["text"] for e in after["interrogation"]["mediums"]} == {
        "a zz-new-medium",
        "another zz-new-medium",
    }
    assert after["interrogation"]["artists"] == before["interrogation"]["artists"]
    mediums = sorted(p.name for p in store_dir.rglob("mediums-*.safetensors"))
    assert len(mediums) == 1 and mediums != [p.name for p in files if p.name.startswith("mediums-")]


def test_cache_is_keyed_by_model(models_dir: Path, tmp_path: Path) -> None:
    terms = load_terms()["sites"]
    store = EmbeddingStore(tmp_path)
    clip_id = model_fingerprint(model_dir(models_dir, CLIP_KIND, TINY_CLIP))
    other_id = model_fingerprint(model_dir(models_dir, "blip", "tiny-blip"))
    assert clip_id != other_id
    import torch

    store.save(clip_id, terms, torch.ones(len(terms.terms), 4))
    assert store.load(clip_id, terms) is not None
    assert store.load(other_id, terms) is None
    # A file whose rows do not match the list (a torn write, a foreign file) is a miss, not a crash.
    store.save(clip_id, terms, torch.ones(3, 4))
    assert store.load(clip_id, terms) is None
    store.path(clip_id, terms).write_bytes(b"garbage")
    assert store.load(clip_id, terms) is None


def test_bad_terms_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "terms.json"
    path.write_text(json.dumps({"categories": {"tags": {"template": "{}", "terms": []}}}))
    with pytest.raises(ValueError, match="empty"):
        load_terms(path)
    path.write_text(json.dumps({"categories": {"tags": {"template": "no slot", "terms": ["a"]}}}))
    with pytest.raises(ValueError, match="template"):
        load_terms(path)
