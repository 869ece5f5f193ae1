"""Every fault kind, as a worker meets it on the wire."""

from __future__ import annotations

import io
import json
import struct
import time

import pytest
import requests
from PIL import Image

from local_horde import CORRUPT_IMAGE_BYTES, FaultKind, LocalHorde, huge_image_bytes
from tests.local_horde.conftest import WorkerClient, small_params, webp


def test_http_error_with_rc_body_then_recovers(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.faults.http_error("/api/v2/generate/pop", 503, rc="ServiceUnavailable", message="down for a bit")
    resp = worker.pop_raw()
    assert resp.status_code == 503 and resp.json() == {
        "message": "down for a bit",
        "rc": "ServiceUnavailable",
    }
    assert worker.pop_raw().status_code == 200
    assert [f.kind for f in horde.faults.fired()] == [FaultKind.STATUS]


def test_rate_limit_has_retry_after(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.faults.rate_limit("*/pop", retry_after=2, count=2)
    for _ in range(2):
        resp = worker.pop_raw()
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "2" and "rc" not in resp.json()
    assert worker.pop_raw().status_code == 200


def test_hang_before_times_the_client_out_and_hands_out_nothing(
    horde: LocalHorde, worker: WorkerClient
) -> None:
    horde.request_generation(small_params())
    horde.faults.hang("/api/v2/generate/pop", seconds=2.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        worker.pop_raw(timeout=0.3)
    assert horde.accounting().handed_out == []
    assert worker.pop()["id"] is not None


def test_hang_after_applies_the_submit_so_a_retry_is_duplicate(
    horde: LocalHorde, worker: WorkerClient
) -> None:
    horde.request_generation(small_params())
    jid = worker.pop()["id"]
    horde.faults.hang("*/generate/submit", seconds=2.0, after=True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        worker.submit(jid, timeout=0.3)
    assert worker.submit(jid).json()["rc"] == "DuplicateGen"
    assert len(horde.submits(jid)) == 2 and jid in horde.accounting().rewards


def test_drop_closes_without_a_response(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    horde.faults.drop("*/generate/pop")
    with pytest.raises(requests.exceptions.ConnectionError):
        worker.pop_raw()
    assert horde.accounting().handed_out == []  # dropped before handling
    jid = worker.pop()["id"]
    horde.faults.drop("*/generate/submit", after=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        worker.submit(jid)
    assert jid in horde.accounting().rewards  # handled, only the answer was lost


def test_malformed_body(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.faults.malformed("*/interrogate/pop")
    resp = worker.post("/interrogate/pop", {"name": "alch", "forms": ["caption"]})
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)


def test_expire_on_submit_forces_aborted_gen_and_requeue(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    jid = worker.pop()["id"]
    horde.faults.expire_on_submit()
    assert worker.submit(jid).json()["rc"] == "AbortedGen"
    assert worker.pop()["id"] not in (None, jid)


def test_global_latency_spares_the_requester_helpers() -> None:
    with LocalHorde(known_models=["tiny-sd1"], extra_latency_s=0.25) as horde:
        start = time.monotonic()
        horde.request_generation(small_params())
        assert time.monotonic() - start < 0.2
        start = time.monotonic()
        assert WorkerClient(horde).pop()["id"] is not None
        assert time.monotonic() - start >= 0.25


def test_upload_bandwidth_cap(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    url = worker.pop()["r2_upload"]
    horde.faults.upload_bandwidth = 200_000  # bytes/s
    payload = bytes(80_000)
    start = time.monotonic()
    assert requests.put(url, data=payload, timeout=5).status_code == 200
    assert time.monotonic() - start >= 0.35


def test_probability_faults_are_reproducible_with_a_seed() -> None:
    def pattern(seed: int) -> list[int]:
        with LocalHorde(known_models=["tiny-sd1"], fault_seed=seed) as horde:
            horde.faults.http_error("*/pop", 500, probability=0.5)
            worker = WorkerClient(horde)
            return [worker.pop_raw().status_code for _ in range(12)]

    first = pattern(3)
    assert first == pattern(3) and {200, 500} == set(first)


def test_method_filter_and_store_faults(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    job = worker.pop()
    horde.faults.http_error("/r2/*", 500, method="PUT")
    assert requests.put(job["r2_upload"], data=b"x", timeout=5).status_code == 500
    assert requests.put(job["r2_upload"], data=b"x", timeout=5).status_code == 200


def test_store_urls_are_signed_per_method(horde: LocalHorde, worker: WorkerClient) -> None:
    get_url = horde.host_image(webp())
    assert requests.put(get_url, data=b"x", timeout=5).status_code == 403
    tampered = get_url.replace("hosted/", "hosted/x")
    assert requests.get(tampered, timeout=5).status_code == 403
    assert requests.get(get_url, timeout=5).content == webp()


def test_corrupt_and_huge_sources_reach_the_worker_unchanged(horde: LocalHorde, worker: WorkerClient) -> None:
    huge = huge_image_bytes()
    assert len(huge) < 200_000
    assert struct.unpack(">II", huge[16:24]) == (20000, 20000)  # the IHDR width and height
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge))  # what a worker without its own pixel guard runs into
    horde.request_generation(small_params(), source_image=CORRUPT_IMAGE_BYTES)
    horde.request_interrogation(horde.host_image(huge), ["caption"])
    job = worker.pop()
    assert requests.get(job["source_image"], timeout=5).content == CORRUPT_IMAGE_BYTES
    (form,) = worker.ipop(["caption"])["forms"]
    assert requests.get(form["source_image"], timeout=5).content == huge


def test_chunked_upload_is_stored_whole(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params())
    job = worker.pop()
    image = webp("purple")
    parts = (image[i : i + 100] for i in range(0, len(image), 100))  # a generator: requests sends it chunked
    assert requests.put(job["r2_upload"], data=parts, timeout=5).status_code == 200
    worker.submit(job["id"])
    (gen,) = horde.wait_done([rid], timeout=5)[rid]["generations"]
    assert horde.download(gen["img"]) == image
