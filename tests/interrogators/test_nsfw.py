"""The nsfw form: diffusers' StableDiffusionSafetyChecker (tiny CLIP config) from a local folder."""

from __future__ import annotations

from pathlib import Path

from interrogators import InterrogatorSet
from interrogators.tiny import TINY_SAFETY_FLAGS
from models.cache import ModelCache
from tests.interrogators.helpers import picture, tiny_set


def test_default_thresholds_pass_ordinary_images(interrogators: InterrogatorSet) -> None:
    images = [picture(i) for i in range(3)]
    assert interrogators.nsfw.is_nsfw(images) == [False, False, False]
    assert interrogators.nsfw.nsfw(picture(0)) == {"nsfw": False}
    assert interrogators.nsfw.is_nsfw([]) == []


def test_a_checker_whose_thresholds_are_negative_flags_everything(
    models_dir: Path, cache: ModelCache
) -> None:
    flags = tiny_set(models_dir, cache, forms=["nsfw"], nsfw_model=TINY_SAFETY_FLAGS).nsfw
    images = [picture(0), picture(1, mode="RGBA"), picture(2, size=(20, 300), mode="L")]
    assert flags.is_nsfw(images) == [True, True, True]
    assert flags.nsfw(picture(3)) == {"nsfw": True}
