"""The horde's CSAM/NSFW decision on one image, from its CLIP similarities (a pure function).

Steps (horde-safety 0.3 `NSFWChecker.check_for_nsfw`, reimplemented on this project's CLIP):
1. Anime: an anime predicate above its threshold, unless every such hit is weak and a "photo" predicate
   is strong. Anime images are rated by DeepDanbooru; its verdict sets `nsfw`, and its `realistic` tag
   makes the image a photo again for the steps below.
2. Subject: any predicate above its threshold (humans, underage terms, explicit scenes, drawings).
3. NSFW (only with a subject and no DeepDanbooru verdict yet): any NSFW concept above its threshold;
   on anime images only the anime overrides, at their thresholds.
4. Underage: one "danger" hit suffices; otherwise a second pass with thresholds lowered towards the
   danger level (anime: base terms and teen(s); photos: every prefixed term), stricter when the negative
   prompt pushes away from adults, needs two distinct hits (a singular and its plural count once).
5. CSAM = underage and NSFW.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from interrogators import safety_concepts as sc
from interrogators.safety_concepts import SafetyConcepts

_WEIGHTED = re.compile(r"\((.*?):\d+\.\d+\)")  # "(word:1.2)" -> "word"
_PUNCTUATION = re.compile(r"([^\w\s]|_)")
_SPACED_LETTERS = re.compile(r"(\s(\w)){3,}\b")  # "a d u l t" -> "adult"


@dataclass(frozen=True)
class AnimeVerdict:
    """What DeepDanbooru said about an anime image."""

    nsfw: bool
    realistic: bool
    ratings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    is_csam: bool
    is_nsfw: bool
    is_anime: bool
    is_underage: bool
    negative_prompt_suspect: bool = False
    # Why, for logs and tests: concept -> similarity (or rating) that crossed its threshold.
    subjects: dict[str, float] = field(default_factory=dict)
    nsfw_hits: dict[str, float] = field(default_factory=dict)
    underage_hits: dict[str, float] = field(default_factory=dict)


def normalise_prompt(text: str) -> str:
    """Undo the tricks a prompt may use to hide words: weights, punctuation, spaced letters, accents,
    lookalike (full-width, accented) letters."""
    text = _WEIGHTED.sub(r"\1", text)
    text = _PUNCTUATION.sub(" ", text)
    for match in list(_SPACED_LETTERS.finditer(text)):
        spaced = match.group(0).strip()
        text = text.replace(spaced, re.sub(r"\s+", "", spaced))
    text = re.sub(r"\s+", " ", text)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def negative_prompt_suspect(negative_prompt: str | None) -> bool:
    """True when the negative prompt holds adult-age words (the requester steers away from adults).
    Stricter than a plain substring test in two ways, so that neither evades the stricter pass: capitals
    count, and so does a word at the very start (" old" must not match "bold", but "old, ugly" must)."""
    if not negative_prompt:
        return False
    text = normalise_prompt(" " + negative_prompt).lower()
    return any(word in text for word in sc.ADULT_WORDS)


def _above(similarities: Mapping[str, float], thresholds: Mapping[str, float]) -> dict[str, float]:
    return {k: similarities[k] for k, limit in thresholds.items() if similarities[k] > limit}


def looks_anime(similarities: Mapping[str, float], concepts: SafetyConcepts) -> bool:
    hits = _above(similarities, concepts.anime)
    if not hits:
        return False
    if all(v < sc.ANIME_WEAK for v in hits.values()):
        photo = any(similarities[name] > sc.PHOTO_OVERRIDE for name in concepts.predicates if "photo" in name)
        return not photo
    return True


def _nsfw_hits(similarities: Mapping[str, float], concepts: SafetyConcepts, anime: bool) -> dict[str, float]:
    if not anime:
        return _above(similarities, concepts.nsfw)
    only = {k: v for k, v in concepts.anime_nsfw.items() if k in concepts.nsfw}
    return _above(similarities, only)


def _second_pass(
    similarities: Mapping[str, float], concepts: SafetyConcepts, anime: bool, suspect: bool
) -> dict[str, float]:
    hits: dict[str, float] = {}
    if anime:
        scale = sc.ANIME_MARGIN_SCALE - (sc.ANIME_SUSPECT_REDUCTION if suspect else 0.0)
        hits.update(_above(similarities, {t: concepts.predicates[t] for t in sc.TEEN_PREDICATES}))
        lowered = {
            term: limit + sc.DANGER_MODIFIERS[term] * scale
            for term, limit in concepts.underage.items()
            if term not in sc.UNPREFIXED_UNDERAGE and "photo" not in term
        }
    else:
        scale = sc.PHOTO_MARGIN_SCALE * (sc.PHOTO_SUSPECT_FACTOR if suspect else 1.0)
        lowered = {
            term: limit + (concepts.danger[term] - limit) * scale
            for term, limit in concepts.combined_underage.items()
        }
    hits.update(_above(similarities, lowered))
    for one, other in sc.PAIRS:
        if one in hits and other in hits:
            del hits[other if hits[one] > hits[other] else one]
    return hits


def decide(
    similarities: Mapping[str, float],
    *,
    concepts: SafetyConcepts,
    negative_prompt: str | None = None,
    rate_anime: Callable[[], AnimeVerdict] | None = None,
) -> Verdict:
    """The verdict for one image. `similarities` maps every concept text to its cosine similarity with the
    image; `rate_anime` runs DeepDanbooru on the image (called only when the image looks anime)."""
    suspect = negative_prompt_suspect(negative_prompt)
    anime = looks_anime(similarities, concepts)
    nsfw = False
    nsfw_hits: dict[str, float] = {}
    if anime and rate_anime is not None:
        rated = rate_anime()
        nsfw = rated.nsfw
        anime = anime and not rated.realistic
        if rated.nsfw:
            nsfw_hits.update(rated.ratings)
    subjects = _above(similarities, concepts.predicates)
    if not nsfw and subjects:
        nsfw_hits = _nsfw_hits(similarities, concepts, anime)
        nsfw = bool(nsfw_hits)
    underage_hits = _above(similarities, concepts.danger)
    underage = bool(underage_hits)
    if not underage:
        underage_hits = _second_pass(similarities, concepts, anime, suspect)
        underage = len(underage_hits) >= sc.UNDERAGE_MIN_HITS
    return Verdict(
        is_csam=underage and nsfw,
        is_nsfw=nsfw,
        is_anime=anime,
        is_underage=underage,
        negative_prompt_suspect=suspect,
        subjects=subjects,
        nsfw_hits=nsfw_hits,
        underage_hits=underage_hits,
    )
