"""ttl expiry, faulted submits and requeues: the ids a worker sees change, the request survives."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from local_horde import LocalHorde
from tests.local_horde.conftest import WorkerClient, small_params


@pytest.fixture
def fast_horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=["tiny-sd1"], job_ttl=0.15, form_ttl=0.15) as h:
        yield h


def test_expired_job_is_aborted_and_requeued_under_a_new_id(fast_horde: LocalHorde) -> None:
    worker = WorkerClient(fast_horde)
    rid = fast_horde.request_generation(small_params(seed="77"))
    first = worker.pop()["id"]
    time.sleep(0.2)
    resp = worker.submit(first)
    assert resp.status_code == 400 and resp.json()["rc"] == "AbortedGen"
    fast_horde.generations.job_ttl = 60.0  # the retry must not race the short ttl on a loaded machine
    again = worker.pop()
    assert again["id"] not in (None, first) and again["payload"]["seed"] == "77"  # same image slot, same seed
    assert worker.submit(again["id"], seed=77).status_code == 200
    status = fast_horde.wait_done([rid], timeout=5)[rid]
    assert status["restarted"] == 1 and [g["id"] for g in status["generations"]] == [again["id"]]
    acc = fast_horde.accounting()
    assert acc.requeues == [(first, "expired")] and acc.drops == [(first, "AbortedGen")]
    assert acc.handed_out == [first, again["id"]] and acc.unfinished() == []


def test_forced_expiry_without_waiting(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    jid = worker.pop()["id"]
    assert horde.expire(jid) == [jid]
    assert worker.submit(jid).json()["rc"] == "AbortedGen"


def test_faulted_submit_pays_nothing_and_requeues(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params())
    first = worker.pop()["id"]
    resp = worker.submit(first, state="faulted", generation="faulted", seed=-1)
    assert resp.status_code == 200 and resp.json() == {"reward": 0}
    assert worker.submit(first).json()["rc"] == "DuplicateGen"
    second = worker.pop()["id"]
    assert second not in (None, first)
    assert horde.generation_status(rid)["restarted"] == 1
    assert horde.accounting().requeues == [(first, "faulted")]


def test_a_slot_faulted_three_times_faults_the_request(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params())
    for _ in range(3):
        worker.submit(worker.pop()["id"], state="faulted")
    assert worker.pop()["id"] is None
    status = horde.wait_done([rid], timeout=2)[rid]
    assert status["faulted"] is True and status["done"] is False


def test_expired_form_is_requeued_then_faulted(fast_horde: LocalHorde) -> None:
    worker = WorkerClient(fast_horde)
    rid = fast_horde.request_interrogation(fast_horde.host_image(b"img"), ["caption"])
    ids = []
    for _ in range(3):
        (form,) = worker.ipop(["caption"])["forms"]
        ids.append(form["id"])
        time.sleep(0.2)
    resp = worker.isubmit(ids[0], {"caption": "late"})
    assert resp.status_code == 400 and resp.json()["rc"] == "DuplicateGen"
    assert len(set(ids)) == 3 and worker.ipop(["caption"])["forms"] is None
    status = fast_horde.wait_done([rid], timeout=2)[rid]
    assert status["state"] == "faulted" and status["forms"][0]["state"] == "faulted"


def test_faulted_form_is_requeued(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_interrogation(horde.host_image(b"img"), ["nsfw"])
    (form,) = worker.ipop(["nsfw"])["forms"]
    assert worker.isubmit(form["id"], {}, state="faulted").json() == {"reward": 0}
    (again,) = worker.ipop(["nsfw"])["forms"]
    assert again["id"] != form["id"]
    assert worker.isubmit(again["id"], {"nsfw": False}).json() == {"reward": 1.0}
    status = horde.wait_done([rid], timeout=2)[rid]
    assert status["forms"] == [{"form": "nsfw", "state": "done", "result": {"nsfw": False}}]


def test_too_many_aborts_put_the_worker_into_maintenance(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.registry.auto_maintenance_aborts = 2  # the real horde's limit is 20 per hour
    stranger = horde.add_user("stranger")
    for _ in range(3):
        horde.request_generation(small_params(), api_key=stranger)
        horde.expire(worker.pop()["id"])
    resp = worker.pop_raw()
    assert resp.status_code == 403 and resp.json()["rc"] == "WorkerMaintenance"
    assert "dropping too many jobs" in resp.json()["message"]
    assert horde.worker_details(worker.name)["maintenance_mode"] is True
