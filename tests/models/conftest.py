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
