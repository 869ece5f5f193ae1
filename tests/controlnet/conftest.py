"""Fixtures of the ControlNet tests: the tiny models plus tiny ControlNets (full and diff files, the horde's
record names) and annotators (real layouts), built once per session and served by the real managers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bridge.config import BridgeConfig
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from controlnet import ControlNets
from models.cache import ModelCache
from models.device import DevicePolicy
from models.manager import ModelManager
from models.reference import ModelReference

SD1 = "tiny-sd1-diffusers"
SD2 = "tiny-sd2"
CONTROL_MODELS = (SD1, SD2, "tiny-inpainting", "tiny-sd2-depth")
# Annotators are loaded at their real sizes (MiDaS, LeReS ~0.5 GB each in float32): room for them.
BUDGET = 3 * 2**30


@dataclass
class ControlStack:
    reference: ModelReference
    cache: ModelCache
    models: ModelManager
    controlnets: ControlNets
    home: Path
    safety: Any = None  # a generation's safety pass: the daemon pops no generation without one

    def runtime(self, **config: object) -> Runtime:
        settings = {"max_power": 8, "allow_controlnet": True, **config}
        fetcher = SourceFetcher(allow_private=True)  # the local horde is on loopback
        return Runtime(config=BridgeConfig(**settings), device=DevicePolicy.cpu(), fetcher=fetcher,
                       models=self.models, controlnets=self.controlnets, safety=self.safety)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny networks: one OpenMP thread avoids waiting at every op's barrier on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("cn-tiny-models"))


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from controlnet.tiny import build_tiny_controlnets

    return build_tiny_controlnets(tmp_path_factory.mktemp("cn-tiny-controlnets"))


def make_stack(tiny_models_json: Path, tiny_controlnets: dict[str, Path], root: Path,
               budget: int = BUDGET) -> ControlStack:
    files = [tiny_models_json, *tiny_controlnets.values()]
    reference = ModelReference.load(cache_dir=root / "ref-cache", upstream=None, extra_files=files)
    device = DevicePolicy.cpu()
    cache = ModelCache(device, ram_budget_bytes=budget)
    home = root / "home"
    models = ModelManager(reference=reference, cache=cache, device=device, cache_home=home,
                          models=list(CONTROL_MODELS))
    controlnets = ControlNets(reference=reference, cache=cache, device=device, cache_home=home)
    return ControlStack(reference, cache, models, controlnets, home)


@pytest.fixture(scope="session")
def stack(tiny_models_json: Path, tiny_controlnets: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory, passing_safety: Any) -> ControlStack:
    built = make_stack(tiny_models_json, tiny_controlnets, tmp_path_factory.mktemp("cn-stack"))
    built.safety = passing_safety
    assert built.models.ready_models() == list(CONTROL_MODELS)
    return built


@pytest.fixture(scope="session")
def picture() -> Image.Image:
    """64x64: a gradient with a dark square (edges for canny and lines, dark strokes for scribble)."""
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    image.paste((20, 20, 20), (12, 16, 44, 40))
    return image
