"""An SDXL job with a LoRA and a TI through the real generation runner (a tiny SDXL diffusers folder served by
the ModelManager): both change the image, both go away for the next job."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from bridge.api_models import GenerationPayload
from bridge.generation.masks import SourceImages
from bridge.generation.request import SourceKind, WorkerLimits, build_request
from bridge.generation.runner import run_generation
from bridge.images import encode_webp
from bridge.lora.plan import JobExtras, PlannedLora
from bridge.lora.tiny import a1111_ti, kohya_lora, save_safetensors
from bridge.lora.weights import parse_ti
from local_horde import LocalHorde
from models.cache import ModelCache
from models.device import DevicePolicy
from models.manager import ModelManager
from models.reference import ModelReference
from models.tiny import tiny_pipeline
from tests.bridge.generation.conftest import make_runtime
from tests.bridge.lora.conftest import make_support

NAME = "tiny-sdxl-folder"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelManager, Path, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_pipeline("sdxl", seed=0, work=root / "work")
    pipe.save_pretrained(root / NAME, safe_serialization=True)
    files = [
        {"path": p.relative_to(root).as_posix(), "sha256sum": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted((root / NAME).rglob("*"))
        if p.is_file()
    ]
    record = {
        "name": NAME,
        "baseline": "stable_diffusion_xl",
        "type": "diffusers",
        "inpainting": False,
        "style": "generalist",
        "nsfw": False,
        "config": {"files": files, "download": []},
    }
    (root / "reference.json").write_text(json.dumps({NAME: record}))
    reference = ModelReference.load(
        cache_dir=root / "ref", upstream=None, extra_files=[root / "reference.json"]
    )
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=512 * 2**20)
    manager = ModelManager(
        reference=reference, cache=cache, device=DevicePolicy.cpu(), cache_home=root / "home", models=[NAME]
    )
    lora = save_safetensors(kohya_lora(pipe, seed=3), root / "xl-lora.safetensors")
    ti = save_safetensors(a1111_ti(pipe, seed=4), root / "xl-ti.safetensors")
    return manager, lora, ti


def test_sdxl_lora_and_ti_through_the_runner(sdxl, tmp_path: Path) -> None:
    manager, lora, ti = sdxl
    assert manager.ready_models() == [NAME]
    runtime = make_runtime(manager)
    with LocalHorde() as horde:  # the CivitAI stand-in is not asked: the files are given
        runtime.loras = make_support(horde, tmp_path)
        payload = GenerationPayload(
            prompt="a red fox###blurry", ddim_steps=2, width=64, height=64, seed=5, sampler_name="k_euler"
        )
        request, _ = build_request(payload, manager.record(NAME), SourceKind(), WorkerLimits(1024 * 1024))

        def image(extras: Any = None, prompt: str = "a red fox", negative: str = "blurry") -> bytes:
            job = dataclasses.replace(request, extras=extras, prompt=prompt, negative_prompt=negative)
            return encode_webp(run_generation(runtime, job, SourceImages()).images[0].image)

        plain = image()
        with_lora = JobExtras(loras=[PlannedLora("xl", "xl", lora, "xl-key", 0.9, 0.7)])
        lora_image = image(with_lora)
        assert with_lora.patch is not None and with_lora.patch.changed and not with_lora.patch.skipped
        embedding = parse_ti(ti)
        assert sorted(embedding.by_width) == [32, 64]  # clip_l for the first encoder, clip_g for the second
        ti_image = image(JobExtras(tis={"xlneg": embedding}), negative="blurry,(embedding:xlneg:1)")
        assert len({plain, lora_image, ti_image}) == 3
        assert image() == plain
