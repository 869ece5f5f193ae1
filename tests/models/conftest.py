"""Fixtures of the models package: tiny random-weight models built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference json of the tiny models (tiny-sd1, tiny-sd1-diffusers, tiny-sd2-depth, tiny-inpainting),
    built once per session; files sit beside it."""
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def checkpoint_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference json of single files in the layouts of real downloads (models.tiny_checkpoints):
    training-sd1, legacy-sd1, civitai-fp16, civitai-fp16-ema, sd2-768-v, inpainting-sd1, sdxl-single."""
    from models.tiny_checkpoints import build_checkpoint_fixtures

    return build_checkpoint_fixtures(tmp_path_factory.mktemp("checkpoint-fixtures"))
