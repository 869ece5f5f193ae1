"""The CivitAI client against the local horde's CivitAI stand-in: resolution by name, id and version; the
metadata cache on disk; final answers at once and remembered; transient errors retried within the deadline;
the back-off after repeated failures; the token on download URLs only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.lora.civitai import FAILURES_BEFORE_BACKOFF, CivitaiError, redact
from local_horde import LocalHorde
from tests.bridge.lora.conftest import Clock, make_client


def test_a_name_resolves_to_the_latest_version_of_the_best_match(
    horde: LocalHorde, tmp_path: Path, tiny_extras
) -> None:
    client = make_client(horde, tmp_path)
    resolved = client.resolve("lora", "tiny glow")  # case-insensitive exact name preferred
    item = tiny_extras["Tiny Glow"]
    assert (resolved.model_id, resolved.version_id, resolved.name) == (1001, 2001, "Tiny Glow")
    assert resolved.sha256 == item.sha256 and resolved.base_model == "SD 1.5"
    assert resolved.trained_words == ("glowing", "neon light", "glowstick")
    assert resolved.size_bytes == item.path.stat().st_size and resolved.file_name == item.path.name
    assert resolved.url == f"{horde.civitai_url}/api/download/models/2001" and not resolved.nsfw


def test_an_id_and_a_version_id_resolve(horde: LocalHorde, tmp_path: Path) -> None:
    client = make_client(horde, tmp_path)
    assert client.resolve("lora", "1002").name == "Tiny Ink"
    by_version = client.resolve("lora", "2003", is_version=True)
    assert (by_version.model_id, by_version.name, by_version.base_model) == (
        1003,
        "Tiny XL Detail",
        "SDXL 1.0",
    )
    assert client.resolve("ti", "tinyneg").version_id == 2101


def test_a_new_version_is_what_a_model_id_means(horde: LocalHorde, tmp_path: Path, tiny_extras) -> None:
    data = tiny_extras["Tiny Ink"].path.read_bytes()
    horde.civitai.add_model(model_id=1002, version_id=2999, name="Tiny Ink", kind="LORA", base_model="SD 1.5",
                            data=data, file_name="ink2.safetensors")  # fmt: skip
    assert make_client(horde, tmp_path).resolve("lora", "1002").version_id == 2999


def test_metadata_is_cached_on_disk_and_resolves_offline(horde: LocalHorde, tmp_path: Path) -> None:
    first = make_client(horde, tmp_path).resolve("lora", "Tiny Glow")
    horde.stop()  # CivitAI is gone: the next worker start still resolves the name the same way
    again = make_client(horde, tmp_path)
    assert again.resolve("lora", "Tiny Glow") == first and again.requests == 0


def test_wrong_kind_and_unknown_names_are_final(horde: LocalHorde, tmp_path: Path) -> None:
    client = make_client(horde, tmp_path)
    with pytest.raises(CivitaiError) as unknown:
        client.resolve("lora", "no such lora")
    assert unknown.value.final
    with pytest.raises(CivitaiError) as wrong:
        client.resolve("ti", "1001")  # a LORA's id asked as a TI
    assert wrong.value.final and "not a TextualInversion" in str(wrong.value)


@pytest.mark.parametrize("status", [401, 403, 404, 451])
def test_final_statuses_are_not_retried_and_are_remembered(
    horde: LocalHorde, tmp_path: Path, clock: Clock, status: int
) -> None:
    horde.civitai.set_metadata_fault("/api/v1/models/1001", status)
    client = make_client(horde, tmp_path, clock)
    for _ in range(3):
        with pytest.raises(CivitaiError) as err:
            client.resolve("lora", "1001", deadline=clock() + 60)
        assert err.value.final and err.value.status == status
    assert horde.civitai.calls("/api/v1/models/1001") == 1 and clock.slept == []  # asked once, no waiting
    assert client.reachable()  # a refused file is not CivitAI being down


def test_transient_errors_are_retried_within_the_deadline(
    horde: LocalHorde, tmp_path: Path, clock: Clock
) -> None:
    horde.civitai.set_metadata_fault("/api/v1/models/1002", 500, times=2)
    client = make_client(horde, tmp_path, clock)
    assert client.resolve("lora", "1002", deadline=clock() + 60).name == "Tiny Ink"
    assert horde.civitai.calls("/api/v1/models/1002") == 3 and clock.slept == [0.5, 1.0]

    horde.civitai.set_metadata_fault("/api/v1/models/1003", 503)
    with pytest.raises(CivitaiError) as err:
        client.resolve("lora", "1003", deadline=clock() + 4)
    assert not err.value.final and sum(clock.slept[2:]) < 4  # gave up before the deadline, not after


def test_repeated_failures_back_off_and_cached_metadata_still_serves(
    horde: LocalHorde, tmp_path: Path, clock: Clock
) -> None:
    client = make_client(horde, tmp_path, clock)
    cached = client.resolve("lora", "Tiny Glow")
    horde.civitai.set_metadata_fault("/api/v1/", 502)
    for name in ("a", "b", "c")[:FAILURES_BEFORE_BACKOFF]:
        with pytest.raises(CivitaiError):
            client.resolve("lora", name, deadline=clock())
    assert not client.reachable()
    clock.now += 10**6  # the cached entry is stale now, CivitAI is down: the cached answer is used
    assert client.resolve("lora", "Tiny Glow", deadline=clock()) == cached
    assert client.reachable()  # and the back-off ended


def test_the_token_goes_on_download_urls_only_and_is_redacted(horde: LocalHorde, tmp_path: Path) -> None:
    client = make_client(horde, tmp_path, token="s3cr3t-token")
    resolved = client.resolve("lora", "Tiny Glow")
    assert all("token" not in query for _, query in horde.civitai.requests)
    url = client.download_url(resolved)
    assert url.endswith("?token=s3cr3t-token") and redact(url).endswith("token=***")
