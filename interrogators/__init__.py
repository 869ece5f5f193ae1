"""Alchemy interrogators: caption (BLIP), interrogation (CLIP term ranking), nsfw (safety checker).

Public API (binding, see docs/INTERFACES.md): Captioner, ClipInterrogator, NsfwChecker, InterrogatorSet,
build_interrogators. Models are transformers-format folders under `<models_dir>/<kind>/<name>`; where they
come from is in interrogators/reference.json (see interrogators/reference.py).
"""

from interrogators.builder import (
    CAPTION_FORM,
    INTERROGATION_FORM,
    INTERROGATOR_FORMS,
    NSFW_FORM,
    InterrogatorSet,
    build_interrogators,
)
from interrogators.caption import Captioner, CaptionOptions
from interrogators.clip import ClipInterrogator
from interrogators.nsfw import NsfwChecker

__all__ = [
    "CAPTION_FORM",
    "INTERROGATION_FORM",
    "INTERROGATOR_FORMS",
    "NSFW_FORM",
    "CaptionOptions",
    "Captioner",
    "ClipInterrogator",
    "InterrogatorSet",
    "NsfwChecker",
    "build_interrogators",
]
