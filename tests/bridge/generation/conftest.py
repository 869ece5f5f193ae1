"""Fixtures of the generation tests: the tiny models, built once, served by the real ModelManager (loaded
from disk: a single-file SD1 .ckpt/.safetensors, diffusers folders), shared by every test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bridge.config import BridgeConfig
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from models.cache import ModelCache
from models.device import DevicePolicy
from models.manager import ModelManager
from models.reference import ModelReference

GENERATION_MODELS = ("tiny-sd1-diffusers", "tiny-sd2-depth", "tiny-inpainting")


class RecordingManager(ModelManager):
    """The real ModelManager; it also notes which pipeline class each call asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, type | None]] = []

    @contextlib.contextmanager
    def pipeline(self, name: str, pipeline_class: type | None = None) -> Iterator[Any]:
        self.calls.append((name, pipeline_class))
        with super().pipeline(name, pipeline_class) as pipe:
            yield pipe


def make_manager(reference_json: Path, models: Sequence[str] = GENERATION_MODELS) -> RecordingManager:
    root = reference_json.parent
    reference = ModelReference.load(cache_dir=root / "ref-cache", upstream=None, extra_files=[reference_json])
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=512 * 2**20)
    return RecordingManager(
        reference=reference, cache=cache, device=DevicePolicy.cpu(), cache_home=root / "home", models=models
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run thousands of microsecond ops: with two OpenMP threads on a shared, busy machine every
    op waits for the descheduled thread at its barrier (measured: 5 s instead of 0.04 s per image)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("gen-tiny-models"))


@pytest.fixture(scope="session")
def pipelines(tiny_reference: Path) -> RecordingManager:
    manager = make_manager(tiny_reference)
    assert manager.ready_models() == list(GENERATION_MODELS)
    return manager


@pytest.fixture()
def safety(safety_models: Path, safety_cache: ModelCache, tmp_path: Path) -> Any:
    """The real safety pass on the split tiny CLIP: finds nothing until a test places concepts
    (tests/interrogators/safety_helpers.place_concepts); concept embeddings are per test."""
    from tests.interrogators.safety_helpers import tiny_safety

    return tiny_safety(safety_models, safety_cache, tmp_path / "safety-embeddings")


@pytest.fixture(scope="session")
def safety_checkers(safety_models: Path, safety_cache: ModelCache) -> dict[str, Any]:
    """Stable Diffusion's checker (the optional second opinion) on two tiny models: one never flags, one
    always does."""
    from interrogators.nsfw import NsfwChecker
    from interrogators.tiny import TINY_SAFETY, TINY_SAFETY_FLAGS

    folder = safety_models / "safety_checker"
    return {
        "clean": NsfwChecker(folder / TINY_SAFETY, cache=safety_cache),
        "flags": NsfwChecker(folder / TINY_SAFETY_FLAGS, cache=safety_cache),
    }


def make_runtime(pipelines: ModelManager, safety: Any = None, **config: Any) -> Runtime:
    overrides = {"max_power": 8, **config}
    return Runtime(
        config=BridgeConfig(**overrides),
        device=DevicePolicy.cpu(),
        fetcher=SourceFetcher(allow_private=True),  # the local horde is on loopback
        models=pipelines,
        safety=safety,
    )


@pytest.fixture()
def runtime(pipelines: RecordingManager) -> Runtime:
    return make_runtime(pipelines)


@pytest.fixture(scope="session")
def source_image() -> Image.Image:
    """A 64x64 picture with structure (gradient + a square), so img2img has something to keep."""
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    image.paste((200, 40, 40), (8, 12, 40, 36))  # off-centre: no mirror symmetry
    return image
