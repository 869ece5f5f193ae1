"""Fixtures of the generation tests: the tiny models, built once, loaded from disk, shared by every test.

`TinyPipelines` stands in for `ModelManager.pipeline()`, which is being written beside this package: it
loads each tiny model's real diffusers pipeline from its saved folder and builds variants with
`from_pipe`, as the manager does. The pipelines, schedulers and runner under test are all real.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bridge.config import BridgeConfig
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from models.device import DevicePolicy
from models.reference import ModelRecord, parse_reference


class TinyPipelines:
    """ready_models / record / pipeline(name, cls): the part of ModelManager the generation code uses."""

    def __init__(self, folders: dict[str, Path], records: dict[str, ModelRecord]) -> None:
        self.folders = folders
        self.records = records
        self._base: dict[str, Any] = {}
        self._variants: dict[tuple[str, type], Any] = {}
        self.calls: list[tuple[str, type | None]] = []

    def ready_models(self) -> list[str]:
        return sorted(self.folders)

    def record(self, name: str) -> ModelRecord:
        return self.records[name]

    def base(self, name: str) -> Any:
        from diffusers import DiffusionPipeline

        if name not in self._base:
            pipe = DiffusionPipeline.from_pretrained(self.folders[name], local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            self._base[name] = pipe
        return self._base[name]

    @contextlib.contextmanager
    def pipeline(self, name: str, pipeline_class: type | None = None) -> Iterator[Any]:
        self.calls.append((name, pipeline_class))
        base = self.base(name)
        if pipeline_class is None or type(base) is pipeline_class:
            yield base
            return
        key = (name, pipeline_class)
        if key not in self._variants:
            variant = pipeline_class.from_pipe(base)
            variant.set_progress_bar_config(disable=True)
            self._variants[key] = variant
        yield self._variants[key]


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("gen-tiny-models"))


@pytest.fixture(scope="session")
def tiny_records(tiny_reference: Path) -> dict[str, ModelRecord]:
    data = json.loads(tiny_reference.read_text(encoding="utf-8"))
    return parse_reference(data, category="stable_diffusion", base_dir=tiny_reference.parent)


@pytest.fixture(scope="session")
def pipelines(tiny_reference: Path, tiny_records: dict[str, ModelRecord], tmp_path_factory) -> TinyPipelines:
    """tiny-sd1 (4-channel), tiny-sd2-depth and tiny-inpainting (9-channel) as diffusers folders."""
    from models.tiny import tiny_pipeline

    root = tiny_reference.parent
    inpainting = tmp_path_factory.mktemp("gen-inpainting") / "tiny-inpainting"
    # The reference ships the inpainting model as a .ckpt; single-file loading is the manager's job,
    # so the same tiny model is saved here as a folder.
    tiny_pipeline("inpainting", seed=4, work=inpainting.parent).save_pretrained(inpainting)
    folders = {
        "tiny-sd1-diffusers": root / "tiny-sd1-diffusers",
        "tiny-sd2-depth": root / "tiny-sd2-depth",
        "tiny-inpainting": inpainting,
    }
    return TinyPipelines(folders, {name: tiny_records[name] for name in folders})


@pytest.fixture(scope="session")
def safety_checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The interrogators' real NsfwChecker on two tiny safety checkers: one never flags, one always does."""
    from interrogators.nsfw import NsfwChecker
    from interrogators.reference import model_dir
    from interrogators.tiny import TINY_SAFETY, TINY_SAFETY_FLAGS, build_tiny_interrogators
    from models.cache import ModelCache

    dest = tmp_path_factory.mktemp("gen-safety")
    build_tiny_interrogators(dest)
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=512 * 2**20)
    return {
        "clean": NsfwChecker(model_dir(dest, "safety_checker", TINY_SAFETY), cache=cache),
        "flags": NsfwChecker(model_dir(dest, "safety_checker", TINY_SAFETY_FLAGS), cache=cache),
    }


def make_runtime(pipelines: TinyPipelines, **config: Any) -> Runtime:
    overrides = {"max_power": 8, **config}
    return Runtime(
        config=BridgeConfig(**overrides),
        device=DevicePolicy.cpu(),
        fetcher=SourceFetcher(),
        models=pipelines,
    )


@pytest.fixture()
def runtime(pipelines: TinyPipelines) -> Runtime:
    return make_runtime(pipelines)


@pytest.fixture(scope="session")
def source_image() -> Image.Image:
    """A 64x64 picture with structure (gradient + a square), so img2img has something to keep."""
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    image.paste((200, 40, 40), (8, 12, 40, 36))  # off-centre: no mirror symmetry
    return image
