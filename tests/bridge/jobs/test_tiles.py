"""max_tiles follows the measured upscaling speed: start-up calibration, each upscale form, the TTL share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from bridge.config import BridgeConfig
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import FORM_TTL, AlchemySource, PostProcessJob
from bridge.jobs.tiles import TileBudget, calibrate
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from local_horde import LocalHorde
from models.cache import ModelCache
from models.device import DevicePolicy
from postprocessors import PostProcessorRegistry
from tests.interrogators.helpers import encoded, one_torch_thread, picture

REGEN_AGENT = "AI Horde Worker reGen:9.0.0:https://github.com/Haidra-Org/horde-worker-reGen"
UPSCALER = "RealESRGAN_x4plus"
TILE = 512 * 512


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> PostProcessorRegistry:
    from spandrel.architectures.ESRGAN import ESRGAN

    weights_dir = tmp_path_factory.mktemp("tiles-weights")
    (weights_dir / "esrgan").mkdir()
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    torch.save(net.state_dict(), weights_dir / "esrgan" / f"{UPSCALER}.pth")
    cache = ModelCache(DevicePolicy.cpu(), ram_to_leave_free="50%")
    return PostProcessorRegistry(weights_dir=weights_dir, cache=cache, device=DevicePolicy.cpu())


def test_budget_gives_each_form_its_share_of_the_ttl():
    budget = TileBudget(ttl=180, queue_size=1, max_threads=1)
    assert budget.seconds_per_form == pytest.approx(180 * 0.8 / 2)
    assert budget.max_tiles([UPSCALER]) == 16  # nothing measured yet: the fallback
    budget.observe(UPSCALER, 2048 * 2048, 1000.0)  # the 2-core CPU: 1,000 s for 16 tiles
    assert budget.seconds_per_tile(UPSCALER) == pytest.approx(62.5)
    assert budget.max_tiles([UPSCALER, "caption"]) == 1
    budget.observe("RealESRGAN_x2plus", TILE, 2.0)
    assert budget.max_tiles(["RealESRGAN_x2plus"]) == 36
    assert budget.max_tiles(["RealESRGAN_x2plus", UPSCALER]) == 1  # the slowest offered form decides
    # Faster results are followed gradually, slower ones at once.
    budget.observe("RealESRGAN_x2plus", TILE, 1.0)
    assert budget.seconds_per_tile("RealESRGAN_x2plus") == pytest.approx(1.7)
    budget.observe("RealESRGAN_x2plus", TILE, 9.0)
    assert budget.seconds_per_tile("RealESRGAN_x2plus") == pytest.approx(9.0)
    # More forms queued per run slot: less time for each.
    assert TileBudget(ttl=180, queue_size=4, max_threads=2).seconds_per_form == pytest.approx(48)
    assert TileBudget(ttl=180, queue_size=0, max_threads=1).seconds_per_form == pytest.approx(144)


def test_an_upscaler_too_slow_for_one_tile_is_not_offered():
    budget = TileBudget(ttl=180)
    assert budget.fast_enough(UPSCALER)
    budget.observe(UPSCALER, TILE, 100.0)
    assert not budget.fast_enough(UPSCALER)
    assert budget.max_tiles([UPSCALER]) == 1


def test_calibration_times_each_configured_upscaler_once_loaded(registry):
    budget = TileBudget(ttl=FORM_TTL)
    calibrate(budget, registry, ["caption", UPSCALER, "GFPGAN"])
    rate = budget.seconds_per_tile(UPSCALER)
    assert rate is not None and 0 < rate < budget.seconds_per_form
    assert budget.seconds_per_tile("GFPGAN") is None and budget.seconds_per_tile("caption") is None
    assert budget.max_tiles([UPSCALER]) == min(256, int(budget.seconds_per_form / rate))


def test_pop_asks_for_max_tiles_from_the_measured_speed_and_each_form_updates_it(registry, tmp_path: Path):
    budget = TileBudget(ttl=FORM_TTL)
    budget.observe(UPSCALER, TILE, 8.0)  # as if calibrated at 8 s a tile: 72 s / 8 = 9 tiles
    source = AlchemySource(tiles=budget)
    with LocalHorde() as horde:
        config = BridgeConfig(api_key=horde.api_key, horde_url=horde.base_url, forms=[UPSCALER],
                              alchemist_name="tiles-alchemist", bridge_agent=REGEN_AGENT)  # fmt: skip
        fetcher = SourceFetcher(timeout=5.0, allow_private=True)  # the local horde is on loopback
        runtime = Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher,
                          postprocessors=registry)  # fmt: skip
        assert source.request(runtime, [UPSCALER], 1).max_tiles == 9
        # A 10-tile source is kept for another worker; a 2-tile one is ours.
        too_big = horde.request_interrogation(encoded(Image.new("RGB", (2560, 1024))), [UPSCALER])
        ours = horde.request_interrogation(encoded(picture(3, (600, 160))), [UPSCALER])
        with HordeClient(horde.base_url, horde.api_key, client_agent="t:1:n") as client:
            [job] = source.pop(client, runtime, 2)
            assert isinstance(job, PostProcessJob) and job.tiles is budget
            job.prepare(runtime)
            [submission] = job.execute(runtime)
            job.send(client, submission)
        assert horde.wait_done([ours])[ours]["state"] == "done"
        assert horde.interrogation_status(too_big)["state"] != "done"
    # The tiny upscaler is far faster than 8 s a tile: the estimate moved towards what the form took.
    assert budget.seconds_per_tile(UPSCALER) < 8.0
