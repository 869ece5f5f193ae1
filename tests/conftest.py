"""Shared fixtures. Tests never reach a hub: everything they load is built here with random weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


import pytest  # noqa: E402 - after the environment, which must be set before any library reads it


@pytest.fixture(scope="session")
def safety_models(tmp_path_factory: pytest.TempPathFactory):
    """The tiny safety-pass models (split CLIP, DeepDanbooru, aesthetic) and SD checkers, built once."""
    from interrogators.tiny import build_tiny_interrogators

    dest = tmp_path_factory.mktemp("tiny-safety")
    build_tiny_interrogators(dest)
    return dest


@pytest.fixture(scope="session")
def safety_cache():
    from models.cache import ModelCache
    from models.device import DevicePolicy

    return ModelCache(DevicePolicy.cpu(), ram_budget_bytes=512 * 2**20)


@pytest.fixture(scope="session")
def passing_safety(safety_models, safety_cache, tmp_path_factory: pytest.TempPathFactory):
    """The real safety pass on the split tiny CLIP, which flags nothing: every generation needs a safety
    pass (GenerationSource pops none without one); tests of the pass's decisions build their own."""
    from tests.interrogators.safety_helpers import tiny_safety

    safety = tiny_safety(safety_models, safety_cache, tmp_path_factory.mktemp("safety-embeddings"))
    safety.warm()
    return safety
