"""LoraSupport: the pop flag follows what works (config, writable cache, CivitAI or cached files, back-off);
the background prefetch; what --check-config says."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from bridge.config import BridgeConfig
from bridge.lora.civitai import FAILURES_BEFORE_BACKOFF, CivitaiError
from bridge.lora.plan import pick_trigger
from bridge.lora.service import LoraSupport, describe
from local_horde import LocalHorde
from tests.bridge.lora.conftest import Clock, make_support


def test_the_pop_flag_follows_what_works(horde: LocalHorde, tmp_path: Path, clock: Clock, caplog) -> None:
    support = make_support(horde, tmp_path, clock=clock)
    assert support.available()  # not probed yet: asks, the first jobs tell
    support.enabled = False
    assert support.state() == (False, "allow_lora is false")
    support.enabled = True
    assert support.probe() and support.available()
    horde.civitai.set_metadata_fault("/api/v1/", 503)
    for name in ("x", "y", "z")[:FAILURES_BEFORE_BACKOFF]:
        with contextlib.suppress(CivitaiError):
            support.civitai.resolve("lora", name, deadline=clock())
    assert not support.available() and "backing off" in support.state()[1]
    assert "not asking for LoRA jobs for 10 minutes" in caplog.text
    clock.now += 601
    assert support.available()


def test_unreachable_civitai_with_an_empty_cache_means_no_lora_jobs(
    horde: LocalHorde, tmp_path: Path
) -> None:
    support = make_support(horde, tmp_path)
    horde.stop()
    assert not support.probe()
    assert support.state() == (False, "CivitAI is unreachable and the LoRA cache is empty")
    (tmp_path / "lora" / "loras").mkdir(parents=True, exist_ok=True)
    (tmp_path / "lora" / "loras" / "mine.safetensors").write_bytes(b"x")
    assert support.state() == (True, "serving the LoRA cache")


def test_a_cache_that_cannot_be_written_means_no_lora_jobs(horde: LocalHorde, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    support = make_support(horde, blocker)
    assert support.state()[0] is False and "not writable" in support.state()[1]


def test_prefetch_downloads_top_loras_for_the_served_baselines(horde: LocalHorde, tmp_path: Path) -> None:
    support = make_support(horde, tmp_path, nsfw=False)
    thread = support.start_background(count=10, baselines={"stable diffusion 1"})
    thread.join(timeout=30)
    names = sorted(e.name for e in support.store.entries())
    assert names == ["Tiny Glow", "Tiny Ink"]  # SD 1.5 LoRAs only, the NSFW one left out on an SFW worker
    assert support.available()


def test_prefetch_never_blocks_serving(horde: LocalHorde, tmp_path: Path) -> None:
    support = make_support(horde, tmp_path)
    gate = threading.Event()
    original = support.civitai.top
    support.civitai.top = lambda *a, **k: (gate.wait(10), original(*a, **k))[1]  # a slow CivitAI
    thread = support.start_background(count=1, baselines={"stable diffusion 1"})
    assert thread.is_alive() and support.available()  # the worker pops meanwhile
    gate.set()
    thread.join(timeout=30)
    assert len(support.store.entries()) == 1


def test_check_config_describes_lora_support(tmp_path: Path) -> None:
    off = describe(BridgeConfig(cache_home=str(tmp_path)))
    assert off == ["allow_lora is false: pops never ask for LoRA or textual-inversion jobs"]
    on = describe(BridgeConfig(cache_home=str(tmp_path), allow_lora=True, civitai_api_token="abc"))
    text = "\n".join(on)
    assert "(it is)" in text and "https://civitai.com" in text and "set (sent on download URLs only)" in text
    assert "abc" not in text


def test_from_config(tmp_path: Path) -> None:
    config = BridgeConfig(allow_lora=True, max_lora_cache_size=3, civitai_url="http://mirror.example/",
                          civitai_api_token="tok", nsfw=False)  # fmt: skip
    support = LoraSupport.from_config(config, tmp_path)
    assert support.civitai.base_url == "http://mirror.example" and support.civitai.token == "tok"
    assert support.store.budget_bytes == 3 * 1024**3 and support.store.root == tmp_path / "lora"
    assert not support.nsfw and not support.civitai.nsfw


def test_any_trigger_is_chosen_with_the_seed() -> None:
    words = ["alpha", "beta", "gamma", "delta"]
    picks = {pick_trigger(words, "any", seed) for seed in range(40)}
    assert picks == set(words)
    assert pick_trigger(words, "any", 5) == pick_trigger(words, "any", 5)
    assert pick_trigger(words, "zzz", 1) is None and pick_trigger([], "all", 1) is None
    assert pick_trigger(words, "GAMMA", 1) == "gamma" and pick_trigger(words, "delt", 1) == "delta"


def test_the_worker_builds_lora_support_only_when_allowed(tmp_path: Path) -> None:
    from bridge.worker import lora_support

    assert lora_support(BridgeConfig(cache_home=str(tmp_path))) is None
    support = lora_support(BridgeConfig(cache_home=str(tmp_path), allow_lora=True))
    assert isinstance(support, LoraSupport) and support.store.root == tmp_path / "lora"
