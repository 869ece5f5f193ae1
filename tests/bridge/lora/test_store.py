"""The LoRA/TI cache on disk: verified, resumable downloads from the stand-in; final download errors at once
and remembered; the byte budget with least-recently-used eviction; hand-placed files kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.lora.civitai import CivitaiError
from bridge.lora.store import LoraStore
from local_horde import LocalHorde
from tests.bridge.lora.conftest import Clock, make_client

KB = 1024


def store_for(horde: LocalHorde, root: Path, budget: int = 10 * 1024**2, clock: Clock | None = None, **kw):
    client = make_client(horde, root, clock, **kw)
    timing = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
    return LoraStore(root / "lora", budget, client, **timing)


def test_download_is_verified_and_reused(horde: LocalHorde, tmp_path: Path, tiny_extras) -> None:
    store = store_for(horde, tmp_path)
    resolved = store.civitai.resolve("lora", "Tiny Glow")
    path = store.ensure(resolved)
    assert path.read_bytes() == tiny_extras["Tiny Glow"].path.read_bytes()
    assert path.parent == tmp_path / "lora" / "loras"
    assert store.ensure(resolved) == path and horde.civitai.calls("/api/download/") == 1
    (entry,) = store.entries()
    assert entry.uses == 2 and entry.size == path.stat().st_size
    # A new worker process knows the file from the index without downloading again.
    again = store_for(horde, tmp_path)
    assert again.ensure(resolved) == path and horde.civitai.calls("/api/download/") == 1


def test_an_interrupted_download_resumes(
    horde: LocalHorde, tmp_path: Path, clock: Clock, tiny_extras
) -> None:
    horde.civitai.cut_download_once(2002, after_bytes=1000)
    store = store_for(horde, tmp_path, clock=clock)
    path = store.ensure(store.civitai.resolve("lora", "Tiny Ink"), deadline=clock() + 60)
    assert path.read_bytes() == tiny_extras["Tiny Ink"].path.read_bytes()
    ranges = [q for p, q in horde.civitai.requests if "/api/download/" in p]
    assert len(ranges) == 2 and clock.slept  # one cut transfer, one resumed request after a pause


def test_a_sha256_mismatch_is_refused_and_remembered(horde: LocalHorde, tmp_path: Path, clock: Clock) -> None:
    horde.civitai.set_download_fault(2001, "corrupt")
    store = store_for(horde, tmp_path, clock=clock)
    resolved = store.civitai.resolve("lora", "Tiny Glow")
    for _ in range(2):
        with pytest.raises(CivitaiError) as err:
            store.ensure(resolved, deadline=clock() + 60)
        assert err.value.final and "sha256" in str(err.value)
    assert horde.civitai.calls("/api/download/") == 1
    assert not list((tmp_path / "lora" / "loras").iterdir())  # nothing unverified left behind


@pytest.mark.parametrize("fault, status", [("451", 451), ("401", 401), ("login", 401)])
def test_geo_blocks_and_logins_are_final_at_once(
    horde: LocalHorde, tmp_path: Path, clock: Clock, fault: str, status: int
) -> None:
    horde.civitai.set_download_fault(2001, fault)
    store = store_for(horde, tmp_path, clock=clock, token="tok123")
    resolved = store.civitai.resolve("lora", "Tiny Glow")
    for _ in range(3):
        with pytest.raises(CivitaiError) as err:
            store.ensure(resolved, deadline=clock() + 600)
        assert err.value.final and err.value.status == status
    assert horde.civitai.calls("/api/download/") == 1 and clock.slept == []  # no retry storm, no waiting
    assert "tok123" not in str(err.value)
    assert store.civitai.reachable()


def test_transient_download_errors_stop_at_the_deadline(
    horde: LocalHorde, tmp_path: Path, clock: Clock
) -> None:
    horde.civitai.set_download_fault(2001, "500")
    store = store_for(horde, tmp_path, clock=clock)
    resolved = store.civitai.resolve("lora", "Tiny Glow")
    with pytest.raises(CivitaiError) as err:
        store.ensure(resolved, deadline=clock() + 5)
    assert not err.value.final and sum(clock.slept) < 5
    horde.civitai.set_download_fault(2001, "500", times=1)  # a passing hiccup: the next try succeeds
    assert store.ensure(resolved, deadline=clock() + 60).is_file()


def test_eviction_is_least_recently_used_within_the_budget(
    horde: LocalHorde, tmp_path: Path, tiny_extras
) -> None:
    sizes = {n: tiny_extras[n].path.stat().st_size for n in ("Tiny Glow", "Tiny Ink", "Tiny Spicy")}
    budget = sizes["Tiny Glow"] + sizes["Tiny Ink"] + 10 * KB  # room for two of the three
    store = store_for(horde, tmp_path, budget=budget)
    glow, ink, spicy = (store.civitai.resolve("lora", n) for n in sizes)
    hand = tmp_path / "lora" / "loras" / "my_own_lora.safetensors"
    hand.parent.mkdir(parents=True, exist_ok=True)
    hand.write_bytes(b"x" * (2 * budget))  # an operator's file: never evicted, not counted
    store.ensure(glow)
    store.ensure(ink)
    store.ensure(glow)  # glow used last: ink is the least recently used now
    store.ensure(spicy)
    names = {e.name for e in store.entries()}
    assert names == {"Tiny Glow", "Tiny Spicy"} and store.used_bytes() <= budget
    assert hand.is_file() and store.local("lora", "MY_OWN_LORA") == hand
    assert not any("Tiny_Ink" in p.name for p in hand.parent.iterdir())


def test_files_in_use_are_not_evicted(horde: LocalHorde, tmp_path: Path, tiny_extras) -> None:
    size = tiny_extras["Tiny Glow"].path.stat().st_size
    store = store_for(horde, tmp_path, budget=size + 10 * KB)
    glow = store.civitai.resolve("lora", "Tiny Glow")
    path = store.ensure(glow)
    with store.in_use([f"lora:{glow.version_id}"]):
        store.ensure(store.civitai.resolve("lora", "Tiny Ink"))
        assert path.is_file()  # over budget for a while rather than pulling a file from under a job
    store.ensure(store.civitai.resolve("lora", "Tiny Spicy"))
    assert not path.is_file()


def test_size_limits_and_budget(horde: LocalHorde, tmp_path: Path) -> None:
    from dataclasses import replace

    store = store_for(horde, tmp_path, budget=1000)
    glow = store.civitai.resolve("lora", "Tiny Glow")
    with pytest.raises(CivitaiError, match="over the 400 MB limit"):
        store.ensure(replace(glow, size_bytes=401 * 1024**2))
    ti = store.civitai.resolve("ti", "tinyneg")
    with pytest.raises(CivitaiError, match="over the 20 MB limit"):
        store.ensure(replace(ti, size_bytes=21 * 1024**2))
    with pytest.raises(CivitaiError, match="does not fit max_lora_cache_size") as err:
        store.ensure(glow)
    assert err.value.final


def test_a_file_changed_on_disk_is_downloaded_again(horde: LocalHorde, tmp_path: Path, tiny_extras) -> None:
    store = store_for(horde, tmp_path)
    resolved = store.civitai.resolve("lora", "Tiny Glow")
    path = store.ensure(resolved)
    path.write_bytes(b"broken")
    os.utime(path, (1, 1))
    assert store.ensure(resolved).read_bytes() == tiny_extras["Tiny Glow"].path.read_bytes()
