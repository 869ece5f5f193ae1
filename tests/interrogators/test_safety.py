"""The safety pass: each branch of the horde's decision reached on purpose, through the real pass (tiny split
CLIP with placed concepts, tiny DeepDanbooru files in the real layout), and the published lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from interrogators import SafetyPass
from interrogators.safety_concepts import default_concepts
from interrogators.safety_decision import AnimeVerdict, decide, negative_prompt_suspect, normalise_prompt
from models.cache import ModelCache
from tests.interrogators.helpers import picture
from tests.interrogators.safety_helpers import (
    ADULT_NUDE,
    ANIME_UNDERAGE,
    BORDERLINE_UNDERAGE,
    EXPLICIT,
    PHOTO_CSAM,
    add_deepdanbooru,
    place_concepts,
    tiny_safety,
)


@pytest.fixture()
def safety(models_dir: Path, cache: ModelCache, tmp_path: Path) -> SafetyPass:
    return tiny_safety(models_dir, cache, tmp_path / "embeddings")


def verdict(safety: SafetyPass, negative_prompt: str | None = None):
    [result] = safety.check([picture(1, (64, 64))], negative_prompt)
    return result.verdict


def test_nothing_found_in_an_ordinary_image(safety: SafetyPass) -> None:
    # The split CLIP's real text embeddings are orthogonal to its images: every similarity is 0.
    [result] = safety.check([picture(2)])
    assert not (result.verdict.is_csam or result.verdict.is_nsfw or result.verdict.is_underage)
    assert isinstance(result.aesthetic, float)
    assert safety.is_nsfw(picture(3)) is False


def test_nsfw_photo_of_an_adult_is_nsfw_not_csam(safety: SafetyPass) -> None:
    place_concepts(safety, ADULT_NUDE)
    found = verdict(safety)
    assert found.is_nsfw and not found.is_csam and not found.is_underage and not found.is_anime
    assert "nude" in found.nsfw_hits and "photo of a woman" in found.subjects


def test_csam_photo(safety: SafetyPass) -> None:
    place_concepts(safety, PHOTO_CSAM)
    found = verdict(safety)
    assert found.is_csam and found.is_nsfw and found.is_underage and not found.is_anime
    assert "child" in found.underage_hits


def test_an_underage_subject_without_nsfw_is_not_csam(safety: SafetyPass) -> None:
    place_concepts(safety, {"photo of a girl": 0.25, "child": 0.24})
    found = verdict(safety)
    assert found.is_underage and not found.is_nsfw and not found.is_csam


def test_nsfw_concepts_count_only_with_a_subject(safety: SafetyPass) -> None:
    place_concepts(safety, {"nude": 0.3, "naked": 0.3})  # no human, underage, scene or drawing predicate
    assert not verdict(safety).is_nsfw


def test_csam_anime_through_deepdanbooru(models_dir: Path, cache: ModelCache, tmp_path: Path) -> None:
    explicit = add_deepdanbooru(models_dir, "tiny-deepdanbooru-explicit", EXPLICIT)
    safety = tiny_safety(models_dir, cache, tmp_path / "e", danbooru=explicit)
    place_concepts(safety, ANIME_UNDERAGE)
    found = verdict(safety)
    assert found.is_anime and found.is_underage and found.is_nsfw and found.is_csam
    assert found.nsfw_hits["rating:explicit"] > 0.125  # the DeepDanbooru rating decided NSFW
    # The same drawing rated safe by DeepDanbooru (the default tiny model): underage, not NSFW, not CSAM.
    safe = tiny_safety(models_dir, cache, tmp_path / "s")
    place_concepts(safe, ANIME_UNDERAGE)
    rated_safe = verdict(safe)
    assert rated_safe.is_anime and rated_safe.is_underage
    assert not rated_safe.is_nsfw and not rated_safe.is_csam


def test_deepdanbooru_realistic_tag_makes_a_drawing_a_photo(
    models_dir: Path, cache: ModelCache, tmp_path: Path
) -> None:
    realistic = add_deepdanbooru(models_dir, "tiny-deepdanbooru-realistic", {**EXPLICIT, "realistic": 1.0})
    safety = tiny_safety(models_dir, cache, tmp_path / "e", danbooru=realistic)
    place_concepts(safety, ANIME_UNDERAGE)
    found = verdict(safety)
    # NSFW by its rating; read as a photo, the two weak hits stay below the photo pass: not underage.
    assert found.is_nsfw and not found.is_anime and not found.is_underage and not found.is_csam


def test_negative_prompt_with_adult_words_makes_the_underage_pass_stricter(safety: SafetyPass) -> None:
    place_concepts(safety, BORDERLINE_UNDERAGE)
    plain = verdict(safety, "blurry, lowres")
    assert plain.is_nsfw and not plain.is_underage and not plain.is_csam
    steered = verdict(safety, "blurry, (mature woman:1.3), Elderly")
    assert steered.negative_prompt_suspect and steered.is_underage and steered.is_csam


def test_weak_anime_hits_give_way_to_a_strong_photo_predicate(safety: SafetyPass) -> None:
    place_concepts(safety, {"anime": 0.205, "photo of a man": 0.25})
    assert not verdict(safety).is_anime
    place_concepts(safety, {"anime": 0.21, "photo of a man": 0.25})  # a strong anime hit stays anime
    assert verdict(safety).is_anime


def test_concept_embeddings_are_computed_once_and_kept_on_disk(
    models_dir: Path, cache: ModelCache, tmp_path: Path
) -> None:
    first = tiny_safety(models_dir, cache, tmp_path / "shared")
    first.warm()
    assert first.embedder.embeddings_computed == 1
    assert len(list((tmp_path / "shared").rglob("safety-*.safetensors"))) == 1
    second = tiny_safety(models_dir, cache, tmp_path / "shared")
    second.check([picture(0)])
    assert second.embedder.embeddings_computed == 0


def test_one_clip_forward_per_image_serves_decision_and_score(safety: SafetyPass) -> None:
    images = [picture(i, (48, 48)) for i in range(3)]
    before = safety.embedder.image_forwards
    results = safety.check(images)
    assert safety.embedder.image_forwards - before == 3
    assert all(r.aesthetic is not None for r in results)
    safety.aesthetic_score(images[0])  # the aesthetic form on a source just checked: no new forward
    assert safety.embedder.image_forwards - before == 3


def test_lists_match_the_published_counts_and_thresholds() -> None:
    concepts = default_concepts()
    prefixes, parts = 4, 12
    assert len(concepts.anime) == 5 and len(concepts.underage) == 11
    human = [t for t in concepts.predicates if t.split(" of ", 1)[-1] in {"a boy", "girls in bikinis"}]
    assert len(human) == 2 * prefixes
    assert len(concepts.predicates) == 5 + 11 + parts * prefixes + 11 + 10 * prefixes + 9 * (1 + prefixes)
    assert concepts.predicates["photo of a boy"] == pytest.approx(0.202)
    assert concepts.predicates["illustration of a man"] == pytest.approx(0.202 + 0.075 + 0.01)
    assert concepts.danger["tween"] == pytest.approx(0.19 + 0.045)
    assert concepts.danger["painting of child"] == pytest.approx(0.005 + 0.19 + 0.035)
    assert "photo of lolicon" not in concepts.danger and concepts.danger["lolicon"] == pytest.approx(0.244)
    assert concepts.nsfw["3d render of lingerie"] == pytest.approx(0.0125 + 0.21)
    assert len(concepts.nsfw) == 9 + 19 * (1 + prefixes) + 5
    assert concepts.terms().digest == default_concepts().terms().digest


def test_pure_decision_calls_deepdanbooru_only_for_anime() -> None:
    concepts = default_concepts()
    base = dict.fromkeys(concepts.texts(), 0.0)
    calls: list[int] = []

    def rater() -> AnimeVerdict:
        calls.append(1)
        return AnimeVerdict(nsfw=True, realistic=False)

    decide({**base, **ADULT_NUDE}, concepts=concepts, rate_anime=rater)
    assert calls == []
    anime = decide({**base, **ANIME_UNDERAGE}, concepts=concepts, rate_anime=rater)
    assert calls == [1] and anime.is_csam


@pytest.mark.parametrize(
    ("negative", "suspect"),
    [
        (None, False),
        ("blurry, bad hands", False),
        ("ugly, old", True),
        ("(ADULT:1.4)", True),
        ("a d u l t", True),
        ("ｍｉｄｄｌｅ ａｇｅｄ", True),  # full-width letters
        ("máture skin, wrinkles", True),
        ("bold colours, golden", False),  # " old" is a word, not a syllable
        ("young, cute", False),
    ],
)
def test_negative_prompt_adult_words(negative: str | None, suspect: bool) -> None:
    assert negative_prompt_suspect(negative) is suspect


def test_prompt_normalisation_undoes_hiding_tricks() -> None:
    assert normalise_prompt("(adult:1.2), e_l_d_e_r_l_y") == "adult elderly"
    assert normalise_prompt("ëlderly") == "elderly"
