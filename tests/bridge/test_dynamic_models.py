"""dynamic_models: the most-queued model the worker lacks is verified and served, within the limit."""

from __future__ import annotations

import pytest

from bridge.dynamic_models import DynamicModels
from bridge.horde_api import HordeClient
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.cache import ModelCache
from models.device import DevicePolicy
from models.downloads import Downloader
from models.manager import ModelManager
from models.reference import ModelReference


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    from models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("dynamic-tiny"))


def serving_tiny_sd1(tmp_path, tiny_reference):
    reference = ModelReference.load(cache_dir=tmp_path / "ref", upstream=None, extra_files=[tiny_reference])
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=1 << 30)
    manager = ModelManager(reference=reference, cache=cache, device=DevicePolicy.cpu(), cache_home=tmp_path,
                           models=["tiny-sd1"])
    return reference, manager


def following(client, manager, reference, tmp_path, *, number: int) -> DynamicModels:
    return DynamicModels(client=client, manager=manager, reference=reference, cache_home=tmp_path,
                         downloader=Downloader(tmp_path, progress=False), number=number)


def test_most_queued_missing_model_is_added_up_to_the_limit(tmp_path, tiny_reference):
    reference, manager = serving_tiny_sd1(tmp_path, tiny_reference)
    assert manager.ready_models() == ["tiny-sd1"]
    with LocalHorde(known_models=["tiny-sd1", "tiny-sd1-diffusers", "tiny-inpainting"]) as horde:
        for _ in range(3):
            horde.request_generation({"steps": 2, "width": 64, "height": 64}, models=["tiny-sd1-diffusers"])
        horde.request_generation({"steps": 2, "width": 64, "height": 64}, models=["tiny-inpainting"])
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="t:1:n")
        follower = following(client, manager, reference, tmp_path, number=1)
        assert follower.refresh_once() == ["tiny-sd1-diffusers"]  # the most queued
        assert follower.refresh_once() == []  # the limit is one extra model
    assert manager.ready_models() == ["tiny-sd1", "tiny-sd1-diffusers"]


def test_unreachable_queue_adds_nothing(tmp_path, tiny_reference, caplog):
    from bridge.retry import RetryPolicy

    reference, manager = serving_tiny_sd1(tmp_path, tiny_reference)
    client = HordeClient("http://127.0.0.1:9", DEFAULT_API_KEY, client_agent="t:1:n",
                         retry=RetryPolicy(max_attempts=1), timeout=1)
    follower = following(client, manager, reference, tmp_path, number=2)
    assert follower.refresh_once() == []
    assert "could not read the horde's model queue" in caplog.text
