"""The concept lists and thresholds of the horde's CSAM/NSFW decision (horde-safety 0.3, `NSFWChecker`).

The figures are the published ones; the lists are composed here the way the horde composes them (each
image-description prefix joined with each "part", thresholds added). A threshold is a cosine similarity
between the CLIP ViT-L/14 image embedding and the text embedding of the concept. Changing anything here
changes `SafetyConcepts.terms().digest`, so the cached text embeddings are recomputed on the next start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from interrogators.terms import TermList

# Prepended to "parts" to describe an image; each adds its offset to the part's threshold.
PREFIXES = {"photo of": 0.0, "painting of": 0.005, "illustration of": 0.075, "3d render of": 0.0125}

PREDICATE_BASE = 0.202  # a human "part" joined with a prefix: PREDICATE_BASE + prefix offset + part offset
HUMAN_PARTS = {
    "a boy": 0.0, "boys": 0.0, "a girl": 0.0, "girls": 0.0, "a teen": 0.0, "a man": 0.01, "men": 0.0,
    "a woman": 0.0, "a couple": 0.0, "couple kissing": 0.0, "a girl in a bikini": 0.01,
    "girls in bikinis": 0.01,
}  # fmt: skip
HUMAN_ISOLATED = {
    "boy": 0.194, "boys": 0.194, "man": 0.194, "men": 0.194, "girl": 0.194, "girls": 0.194,
    "woman": 0.194, "women": 0.194, "teenager": 0.194, "teen": 0.19, "teens": 0.19,
}  # fmt: skip

UNDERAGE = {
    "child": 0.19, "children": 0.19, "young children": 0.189, "a baby": 0.19, "an infant": 0.19,
    "infants": 0.19, "toddler": 0.19, "toddlers": 0.19, "tween": 0.19, "tweens": 0.19, "lolicon": 0.20,
}  # fmt: skip
# Added to an underage threshold: above the sum ("danger") a single hit makes the subject underage.
DANGER_MODIFIERS = {
    "child": 0.035, "children": 0.035, "young children": 0.03, "a baby": 0.0275, "an infant": 0.0275,
    "infants": 0.0275, "toddler": 0.0275, "toddlers": 0.0275, "tween": 0.045, "tweens": 0.045,
    "lolicon": 0.044,
}  # fmt: skip
UNPREFIXED_UNDERAGE = frozenset({"lolicon"})  # never joined with a prefix

NSFW_PREDICATES = {
    "18+": 0.20, "explicit content": 0.21, "erotica": 0.21, "exposed erection": 0.215,
    "close up of a vagina": 0.24, "photo of vagina": 0.22, "porn scene": 0.21, "lesbian scene": 0.22,
    "gay scene": 0.22,
}  # fmt: skip
ANIME_PREDICATES = {
    "japanese animation": 0.20, "Japanese cartoon": 0.20, "anime": 0.20, "cartoon": 0.20, "manga": 0.205,
}  # fmt: skip

NSFW_ISOLATED = {
    "sexual": 0.2, "sexy": 0.22, "uncensored": 0.21, "naked": 0.22, "nude": 0.22, "nsfw": 0.21,
    "nudity": 0.21, "erotic": 0.21, "fucking": 0.21,
}  # fmt: skip
NSFW_PARTS = {
    "explicit content": 0.20, "exposed erection": 0.21, "close up of a vagina": 0.24,
    "a womans legs spread, vagina exposed": 0.23, "exposed vagina": 0.22, "erotica": 0.21, "blowjob": 0.22,
    "vagina": 0.21, "an erection": 0.21, "porn": 0.2, "porn scene": 0.20, "lesbian scene": 0.22,
    "gay scene": 0.22, "a nude man's ass": 0.21, "a nude woman's ass": 0.21, "exposed breasts": 0.22,
    "girl in a bikini": 0.22, "underwear": 0.21, "lingerie": 0.21,
}  # fmt: skip
# Token soups that CLIP places near explicit images (found by the horde's authors, not natural language).
NSFW_SYNTHETIC = {
    "quintesstain corinblazing dean n blondes bronxsmug demi pilebarcelonluisspandex ,... ...#": 0.205,
    "liam paying awwww hubby ... feeding mr  omg dropbox brad(@ zaynwoo ….. burr": 0.205,
    "nel ov lexi lov thwatchin thalaireason zz big oj anticipation บci ov prick": 0.205,
    "somehow dang rochelle sizzgusta imrankhanhalftime rankings equities exists skynews -- - smokin epidemiq":
        0.205,
    "asses zeit brunette brunette bikini meatlessdesired androunprecearomatic limestone "
    "juxtatweetapicturevalmelee photo": 0.205,
}  # fmt: skip
# On anime images only these NSFW concepts count, with these thresholds (the others misfire on drawings).
# Entries that are not NSFW concepts above never apply; they are kept so that the list reads as published.
ANIME_NSFW_OVERRIDES = {
    "nsfw": 0.21, "18+": 0.215, "nipples": 0.20, "nipple": 0.20, "naked child": 0.19, "naked breasts": 0.205,
    "illustration of naked breasts": 0.205, "exposed breasts": 0.205,
    "illustration of exposed breasts": 0.205, "nudity": 0.195, "nude": 0.195, "naked": 0.22,
    "cartoon porn": 0.20, "sex": 0.21,
}  # fmt: skip

# An image is a drawing when an anime predicate matches, unless every anime hit is below this and some
# "photo" predicate is above PHOTO_OVERRIDE.
ANIME_WEAK = 0.208
PHOTO_OVERRIDE = 0.24
# The second underage pass scales the danger margin by these (smaller: stricter).
ANIME_MARGIN_SCALE = 0.05
ANIME_SUSPECT_REDUCTION = 0.005  # subtracted from the anime scale when the negative prompt is suspect
PHOTO_MARGIN_SCALE = 0.4
PHOTO_SUSPECT_FACTOR = 0.5  # the photo scale is multiplied by this when the negative prompt is suspect
UNDERAGE_MIN_HITS = 2  # distinct hits of the second pass that make the subject underage
# Singular and plural name one hit: of a pair both above their thresholds, only the stronger counts.
PAIRS = (
    ("tween", "tweens"), ("tweens", "tween"), ("teen", "teens"), ("teens", "teen"), ("an infant", "infants"),
    ("infants", "an infant"), ("toddler", "toddlers"), ("toddlers", "toddler"), ("child", "children"),
    ("children", "child"),
)  # fmt: skip
TEEN_PREDICATES = ("teen", "teens")  # checked on anime images in the second pass at their own thresholds
# A negative prompt pushing away from adults makes the second underage pass stricter.
ADULT_WORDS = (" mature", ",mature", " old", ",old", "adult", "elderly", "middle aged")


@dataclass(frozen=True)
class SafetyConcepts:
    """Every concept with its threshold, in the groups the decision reads."""

    predicates: dict[str, float] = field(default_factory=dict)  # subject predicates (all groups)
    anime: dict[str, float] = field(default_factory=dict)
    underage: dict[str, float] = field(default_factory=dict)  # base terms
    combined_underage: dict[str, float] = field(default_factory=dict)  # base + prefixed
    danger: dict[str, float] = field(default_factory=dict)  # combined underage + danger margins
    nsfw: dict[str, float] = field(default_factory=dict)  # NSFW concepts
    anime_nsfw: dict[str, float] = field(default_factory=dict)

    def texts(self) -> list[str]:
        """Every text to embed, each once, in a fixed order."""
        return list(dict.fromkeys([*self.predicates, *self.nsfw]))

    def terms(self) -> TermList:
        """The texts as a term list, for the on-disk embedding cache."""
        return TermList("safety", "{}", tuple(self.texts()))


@cache
def default_concepts() -> SafetyConcepts:
    human = dict(HUMAN_ISOLATED)
    combined_underage = dict(UNDERAGE)
    danger = {term: UNDERAGE[term] + margin for term, margin in DANGER_MODIFIERS.items()}
    nsfw_predicates = dict(NSFW_PREDICATES)
    nsfw = {**NSFW_ISOLATED, **NSFW_PARTS}
    for prefix, offset in PREFIXES.items():
        for part, part_offset in HUMAN_PARTS.items():
            human[f"{prefix} {part}"] = PREDICATE_BASE + offset + part_offset
        for term, threshold in NSFW_PREDICATES.items():
            nsfw_predicates[f"{prefix} {term}"] = offset + threshold
        for term in DANGER_MODIFIERS:
            if term in UNPREFIXED_UNDERAGE:
                continue
            danger[f"{prefix} {term}"] = offset + danger[term]
            combined_underage[f"{prefix} {term}"] = offset + UNDERAGE[term]
        for part, threshold in NSFW_PARTS.items():
            nsfw[f"{prefix} {part}"] = offset + threshold
    nsfw.update(NSFW_SYNTHETIC)
    # Later groups win a name clash, as in the horde's merge.
    predicates = {**ANIME_PREDICATES, **human, **combined_underage, **nsfw_predicates}
    return SafetyConcepts(
        predicates=predicates,
        anime=dict(ANIME_PREDICATES),
        underage=dict(UNDERAGE),
        combined_underage=combined_underage,
        danger=danger,
        nsfw=nsfw,
        anime_nsfw=dict(ANIME_NSFW_OVERRIDES),
    )
