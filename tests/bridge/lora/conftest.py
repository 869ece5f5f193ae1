"""Fixtures of the LoRA tests: tiny LoRAs/TIs in CivitAI's file layouts, published on the local horde's
CivitAI stand-in, and the tiny models served by the real ModelManager."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lora.civitai import CivitaiClient
from bridge.lora.service import LoraSupport
from bridge.lora.store import LoraStore
from bridge.lora.tiny import TinyItem, add_to_standin, build_tiny_extras
from local_horde import LocalHorde

TINY_MODELS = {"tiny-sd1-diffusers": "stable diffusion 1", "tiny-sd2-depth": "stable diffusion 2"}
MB = 1024**2


@pytest.fixture(scope="session")
def tiny_extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyItem]:
    return {item.name: item for item in build_tiny_extras(tmp_path_factory.mktemp("tiny-extras"))}


@pytest.fixture()
def horde(tiny_extras: dict[str, TinyItem]) -> Iterator[LocalHorde]:
    with LocalHorde(known_models=dict(TINY_MODELS)) as local:
        add_to_standin(local.civitai, list(tiny_extras.values()))
        yield local


class Clock:
    """A monotonic clock that sleeps instantly: retries and back-offs without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make_client(horde: LocalHorde, root: Path, clock: Clock | None = None, **kw: Any) -> CivitaiClient:
    timing = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
    return CivitaiClient(horde.civitai_url, root / "civitai", timeout=5, **timing, **kw)


def make_support(
    horde: LocalHorde,
    root: Path,
    *,
    budget: int = 64 * MB,
    nsfw: bool = True,
    clock: Clock | None = None,
    **kw: Any,
) -> LoraSupport:
    client = make_client(horde, root, clock, nsfw=nsfw, **kw)
    timing = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
    store = LoraStore(root / "lora", budget, client, **timing)
    return LoraSupport(enabled=True, civitai=client, store=store, nsfw=nsfw)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("lora-tiny-models"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared machine run fastest on one thread (see tests/bridge/generation/conftest.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
