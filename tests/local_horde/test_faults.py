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


# ---- hostile kinds -----------------------------------------------------------------------------------------


def test_redirect_answers_3xx_with_location_and_handles_nothing(
    horde: LocalHorde, worker: WorkerClient
) -> None:
    horde.request_generation(small_params())
    horde.faults.redirect("*/generate/pop", "http://127.0.0.2:9/api/v2/generate/pop", status=302)
    resp = worker.session.post(worker.url + "/generate/pop", json={"name": "w"}, allow_redirects=False)
    assert resp.status_code == 302 and resp.headers["Location"] == "http://127.0.0.2:9/api/v2/generate/pop"
    assert horde.accounting().handed_out == []


def test_trickle_sends_header_bytes_slowly_and_never_ends_them(horde: LocalHorde) -> None:
    import socket

    url = horde.host_image(webp(), "slow.webp")
    horde.faults.trickle("/r2/hosted/slow.webp", seconds=1.0, interval_s=0.1)
    path = url.split(horde.base_url, 1)[1]
    with socket.create_connection(("127.0.0.1", int(horde.base_url.rsplit(":", 1)[1])), timeout=2) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received, reads = b"", 0
        while chunk := sock.recv(1024):
            received += chunk
            reads += 1
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n" not in received  # headers never end
    assert reads >= 5  # every read got a little: a per-read timeout never fires


def test_html_error_page_and_an_error_echoing_the_key(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.faults.http_error("*/generate/pop", 403, html=True)
    page = worker.pop_raw()
    assert page.status_code == 403 and page.headers["Content-Type"].startswith("text/html")
    assert "<html>" in page.text
    horde.faults.http_error("*/generate/submit", 400, rc="BadRequest", message="bad key {apikey}")
    assert horde.api_key in worker.submit("some-id").json()["message"]


def test_wrong_type_rewrites_only_replies_with_a_job(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.faults.wrong_type("payload.ddim_steps", "many")
    horde.faults.messages("line one\nline two \x1b[2J")
    idle = worker.pop()
    assert idle["ids"] == [] and idle["payload"]["ddim_steps"] == 30  # the idle pop is not edited
    assert idle["messages"][0]["message"] == "line one\nline two \x1b[2J"
    horde.request_generation(small_params())
    job = worker.pop()
    assert job["payload"]["ddim_steps"] == "many" and job["ids"]
    assert [f.kind for f in horde.faults.fired()] == [FaultKind.REWRITE, FaultKind.REWRITE]


def test_over_delivery_hands_out_more_than_asked(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params(n=4))
    horde.faults.over_deliver("*/generate/pop", extra=2)
    assert len(worker.pop(amount=1)["ids"]) == 3
    url = horde.host_image(webp())
    horde.request_interrogation(url, ["caption", "nsfw", "caption"])
    horde.faults.over_deliver("*/interrogate/pop", extra=1)
    assert len(worker.ipop(["caption", "nsfw"], amount=1)["forms"]) == 2
