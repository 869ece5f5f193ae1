"""The interrogators on CUDA (weights moved by the model cache): BLIP in float16, the shared CLIP and the
safety pass in float32 on the GPU when their VRAM budget has room. Run with `-m gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.cache import ModelCache
from models.device import DevicePolicy
from tests.interrogators.helpers import picture, tiny_set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_forms_run_on_the_gpu_in_half_precision(models_dir: Path, tmp_path: Path) -> None:
    device = DevicePolicy.detect()
    cache = ModelCache(device, ram_budget_bytes=1 << 30, vram_budget_bytes=1 << 30)
    found = tiny_set(models_dir, cache, embeddings_dir=tmp_path, device=device)
    assert found.caption.caption(picture(), {"num_beams": 2})["caption"]
    ranked = found.interrogation.interrogate(picture(), {"top_count": 3})["interrogation"]
    assert all(len(entries) == 3 for entries in ranked.values())
    assert found.safety.is_nsfw(picture()) in (True, False)
    assert isinstance(found.safety.aesthetic_score(picture(1)), float)
    with found.caption.loaded() as bundle:
        parameter = next(bundle.model.parameters())
        assert parameter.device.type == "cuda" and parameter.dtype == torch.float16
    with found.safety.embedder.loaded() as bundle:
        parameter = next(bundle.model.parameters())
        assert parameter.device.type == "cuda" and parameter.dtype == torch.float32  # room: on the GPU
    assert {found.caption.key, found.interrogation.key} <= set(cache.on_device())
