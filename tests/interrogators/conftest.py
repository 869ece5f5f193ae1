from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from interrogators import InterrogatorSet
from models.cache import ModelCache
from tests.interrogators.helpers import cpu_cache, one_torch_thread, tiny_models_dir, tiny_set


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def cache() -> ModelCache:
    return cpu_cache()


@pytest.fixture(scope="session")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared so that the full term lists are embedded once per session, whichever test asks first."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="session")
def interrogators(models_dir: Path, cache: ModelCache, embeddings_dir: Path) -> InterrogatorSet:
    return tiny_set(models_dir, cache, embeddings_dir=embeddings_dir)
