"""Alchemy interrogators and the safety pass: caption (BLIP), interrogation (CLIP term ranking), nsfw and
aesthetic (the safety pass on the same CLIP), and the pass over every generated image.

Public API (binding, see docs/INTERFACES.md): Captioner, ClipInterrogator, ClipEmbedder, SafetyPass,
NsfwChecker (Stable Diffusion's checker, the operator's optional second opinion), InterrogatorSet,
build_interrogators, build_safety. Models live under `<models_dir>/<kind>/<name>`; where they come from is
in interrogators/reference.json (see interrogators/reference.py).
"""

from interrogators.builder import (
    AESTHETIC_FORM,
    CAPTION_FORM,
    INTERROGATION_FORM,
    INTERROGATOR_FORMS,
    NSFW_FORM,
    InterrogatorSet,
    build_interrogators,
    build_safety,
    build_sd_safety_checker,
)
from interrogators.caption import Captioner, CaptionOptions
from interrogators.clip import ClipInterrogator
from interrogators.embedding import ClipEmbedder
from interrogators.nsfw import NsfwChecker
from interrogators.safety import SafetyPass, SafetyResult, WeightsFile

__all__ = [
    "AESTHETIC_FORM",
    "CAPTION_FORM",
    "INTERROGATION_FORM",
    "INTERROGATOR_FORMS",
    "NSFW_FORM",
    "CaptionOptions",
    "Captioner",
    "ClipEmbedder",
    "ClipInterrogator",
    "InterrogatorSet",
    "NsfwChecker",
    "SafetyPass",
    "SafetyResult",
    "WeightsFile",
    "build_interrogators",
    "build_safety",
    "build_sd_safety_checker",
]
