from __future__ import annotations

from pathlib import Path

import pytest

from models.cache import ModelCache
from postprocessors import PostProcessorRegistry
from tests.postprocessors.helpers import cpu_cache, tiny_registry, tiny_weights_dir


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_weights_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def cache() -> ModelCache:
    return cpu_cache()


@pytest.fixture(scope="session")
def registry(weights_dir: Path, cache: ModelCache) -> PostProcessorRegistry:
    return tiny_registry(weights_dir, cache)
