"""build_interrogators: only what the forms need, missing models left out, CPU-only without CUDA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from interrogators import build_interrogators
from interrogators.reference import CAPTION_KIND, model_dir
from interrogators.tiny import TINY_AESTHETIC, TINY_CAPTION, TINY_DEEPDANBOORU
from models.cache import ModelCache
from models.device import DevicePolicy
from tests.interrogators.helpers import picture, tiny_set


def test_only_the_requested_forms_are_built(models_dir: Path, cache: ModelCache) -> None:
    only_nsfw = tiny_set(models_dir, cache, forms=["nsfw", "RealESRGAN_x4plus"])
    assert only_nsfw.ready_forms() == ["nsfw"]
    assert only_nsfw.caption is None and only_nsfw.interrogation is None
    assert not only_nsfw.safety.scores_aesthetics  # the aesthetic form was not asked for
    only_aesthetic = tiny_set(models_dir, cache, forms=["aesthetic"])
    assert only_aesthetic.ready_forms() == ["aesthetic"]
    assert tiny_set(models_dir, cache, forms=[]).ready_forms() == []


def test_one_clip_serves_interrogation_nsfw_and_aesthetic(models_dir: Path, cache: ModelCache) -> None:
    built = tiny_set(models_dir, cache)
    assert built.ready_forms() == ["caption", "interrogation", "nsfw", "aesthetic"]
    assert built.interrogation.embedder is built.safety.embedder


def test_nothing_loads_until_used(models_dir: Path, embeddings_dir: Path) -> None:
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=1 << 30)
    built = tiny_set(models_dir, cache, embeddings_dir=embeddings_dir)
    assert cache.resident() == []
    built.safety.aesthetic_score(picture())
    head = models_dir / "aesthetic" / TINY_AESTHETIC / "sac+logos+ava1-l14-linearMSE.pth"
    assert sorted(cache.resident()) == sorted([built.safety.embedder.key, f"interrogator:aesthetic:{head}"])
    built.warm()
    assert len(cache.resident()) == 4  # + BLIP and DeepDanbooru; CLIP is one entry for three forms
    assert built.caption.load_seconds > 0 and built.safety.load_seconds > 0


def test_a_missing_model_drops_its_form(models_dir: Path, cache: ModelCache, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    shutil.copytree(models_dir, partial)
    (model_dir(partial, CAPTION_KIND, TINY_CAPTION) / "model.safetensors").unlink()
    built = tiny_set(partial, cache)
    assert built.ready_forms() == ["interrogation", "nsfw", "aesthetic"]
    shutil.rmtree(model_dir(partial, "deepdanbooru", TINY_DEEPDANBOORU))
    assert tiny_set(partial, cache).ready_forms() == ["interrogation", "aesthetic"]  # no anime path: no nsfw
    # The real default names are not present in a folder of tiny models.
    real = build_interrogators(
        models_dir=models_dir,
        cache=cache,
        device=DevicePolicy.cpu(),
        forms=["caption", "interrogation", "nsfw", "aesthetic"],
    )
    assert real.ready_forms() == []


def test_cpu_policy_never_touches_cuda(
    models_dir: Path, embeddings_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[str] = []

    def forbidden(name: str):
        def guard(*args, **kwargs):
            touched.append(name)
            raise AssertionError(f"torch.cuda.{name} called under a CPU policy")

        return guard

    for name in (
        "_lazy_init",
        "is_available",
        "current_device",
        "device_count",
        "synchronize",
        "mem_get_info",
    ):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=1 << 30, vram_budget_bytes=0)
    threads = torch.get_num_threads()
    try:
        built = tiny_set(models_dir, cache, embeddings_dir=embeddings_dir, torch_threads=1)
        assert torch.get_num_threads() == 1  # the injected setting, applied by the builder only
    finally:
        torch.set_num_threads(threads)
    assert built.caption.caption(picture(), {"num_beams": 2})["caption"]
    assert len(built.interrogation.interrogate(picture(), None)["interrogation"]["tags"]) == 5
    assert built.safety.is_nsfw(picture()) in (True, False)
    assert isinstance(built.safety.aesthetic_score(picture()), float)
    assert touched == []
    assert not torch.cuda.is_initialized()
