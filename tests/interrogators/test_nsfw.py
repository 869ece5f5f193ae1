"""Stable Diffusion's safety checker (the operator's optional second opinion on generations): diffusers'
StableDiffusionSafetyChecker, tiny CLIP config, from a local folder."""

from __future__ import annotations

from pathlib import Path

from interrogators import build_sd_safety_checker
from interrogators.tiny import TINY_SAFETY, TINY_SAFETY_FLAGS
from models.cache import ModelCache
from models.device import DevicePolicy
from tests.interrogators.helpers import picture


def checker(models_dir: Path, cache: ModelCache, name: str):
    built = build_sd_safety_checker(models_dir=models_dir, cache=cache, device=DevicePolicy.cpu(), name=name)
    assert built is not None
    return built


def test_default_thresholds_pass_ordinary_images(models_dir: Path, cache: ModelCache) -> None:
    clean = checker(models_dir, cache, TINY_SAFETY)
    assert clean.is_nsfw([picture(i) for i in range(3)]) == [False, False, False]
    assert clean.nsfw(picture(0)) == {"nsfw": False}
    assert clean.is_nsfw([]) == []


def test_a_checker_whose_thresholds_are_negative_flags_everything(
    models_dir: Path, cache: ModelCache
) -> None:
    flags = checker(models_dir, cache, TINY_SAFETY_FLAGS)
    images = [picture(0), picture(1, mode="RGBA"), picture(2, size=(20, 300), mode="L")]
    assert flags.is_nsfw(images) == [True, True, True]
    assert flags.nsfw(picture(3)) == {"nsfw": True}


def test_a_missing_folder_gives_no_checker(tmp_path: Path, cache: ModelCache) -> None:
    assert build_sd_safety_checker(models_dir=tmp_path, cache=cache, device=DevicePolicy.cpu()) is None
