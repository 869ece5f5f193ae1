"""Both validation layers and every application error row of the contract, over real HTTP."""

from __future__ import annotations

import requests

from local_horde import ANON_API_KEY, LocalHorde
from tests.local_horde.conftest import WorkerClient, small_params

VALIDATION = "Input payload validation failed"


def _validation_errors(resp: requests.Response) -> dict[str, str]:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["message"] == VALIDATION and "rc" not in body
    return body["errors"]


def _rc(resp: requests.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"message", "rc"} and body["message"]
    return body["rc"]


def test_pop_schema_errors_use_jsonschema_wording(worker: WorkerClient) -> None:
    errors = _validation_errors(worker.pop_raw(nsfw="yes", amount=21, threads=0, models="tiny-sd1"))
    assert errors == {
        "nsfw": "'yes' is not of type 'boolean'",
        "amount": "21 is greater than the maximum of 20",
        "threads": "0 is less than the minimum of 1",
        "models": "'tiny-sd1' is not of type 'array'",
    }
    assert _validation_errors(worker.post("/generate/pop", {"models": ["tiny-sd1"]})) == {
        "name": "'name' is a required property"
    }
    assert "max_pixels" in _validation_errors(worker.pop_raw(max_pixels=1.5))


def test_missing_apikey_is_a_validation_error(horde: LocalHorde) -> None:
    for route in ("/generate/pop", "/generate/submit", "/interrogate/pop", "/interrogate/submit"):
        resp = requests.post(
            horde.api_url + route,
            json={"name": "w", "id": "x", "seed": 1, "generation": "R2", "result": {}},
            timeout=5,
        )
        assert "apikey" in _validation_errors(resp), route


def test_submit_schema_errors(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    jid = worker.pop()["id"]
    assert _validation_errors(worker.submit(jid, seed="123")) == {"seed": "'123' is not of type 'integer'"}
    assert _validation_errors(worker.submit(jid, state="done")) == {
        "state": "'done' is not one of ['ok', 'censored', 'faulted', 'csam']"
    }
    bad_meta = [{"type": "nsfw", "value": "nsfw"}, {"type": "information", "value": "oops", "ref": "x" * 256}]
    errors = _validation_errors(worker.submit(jid, gen_metadata=bad_meta))
    assert set(errors) == {"gen_metadata.0.type", "gen_metadata.1.value", "gen_metadata.1.ref"}
    no_seed = worker.post("/generate/submit", {"id": jid, "generation": "R2"})
    assert _validation_errors(no_seed) == {"seed": "'seed' is a required property"}
    assert "generation" in _validation_errors(worker.post("/generate/submit", {"id": jid, "seed": 1}))
    too_many = [{"type": "information", "value": "see_ref", "ref": str(i)} for i in range(51)]
    assert _rc(worker.submit(jid, gen_metadata=too_many), 400) == "BadRequest"
    assert worker.submit(jid).status_code == 200  # none of the rejected submits consumed the job
    assert len(horde.submits(jid)) == 7


def test_auth_errors_on_pop(horde: LocalHorde) -> None:
    assert _rc(WorkerClient(horde, api_key=ANON_API_KEY).pop_raw(), 403) == "AnonForbiddenWorker"
    assert _rc(WorkerClient(horde, api_key="x" * 22).pop_raw(), 401) == "InvalidAPIKey"


def test_worker_name_belongs_to_its_owner_and_type(horde: LocalHorde, worker: WorkerClient) -> None:
    worker.pop()
    other = WorkerClient(horde, api_key=horde.add_user("other"), name=worker.name)
    assert _rc(other.pop_raw(), 403) == "WrongCredentials"
    alchemist = worker.post("/interrogate/pop", {"name": worker.name, "forms": ["caption"]})
    assert _rc(alchemist, 400) == "PolymorphicNameConflict"


def test_models_unknown_dropped_or_rejected(horde: LocalHorde, worker: WorkerClient) -> None:
    assert _rc(worker.pop_raw(models=["nope-model"]), 400) == "BadRequest"
    assert "unrecognised models" in worker.pop_raw(models=["nope-model"]).json()["message"]
    worker.pop(models=["nope-model", "tiny-sd1"])
    assert horde.worker_details(worker.name)["models"] == ["tiny-sd1"]
    worker.pop(models=[])
    assert horde.worker_details(worker.name)["models"] == ["stable_diffusion"]


def test_invalid_priority_username(worker: WorkerClient) -> None:
    assert _rc(worker.pop_raw(priority_usernames=["nobody"]), 400) == "InvalidPriorityUsername"
    assert worker.pop_raw(priority_usernames=["someone#12"]).status_code == 200


def test_submit_application_errors(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_generation(small_params())
    jid = worker.pop()["id"]
    assert _rc(worker.submit("00000000-0000-0000-0000-000000000000"), 404) == "InvalidJobID"
    intruder = WorkerClient(horde, api_key=horde.add_user("intruder"), name="intruder-worker")
    assert _rc(intruder.submit(jid), 403) == "WrongCredentials"
    unknown = WorkerClient(horde, api_key="y" * 22)
    assert unknown.submit(jid).status_code == 500  # the real server's KeyError quirk
    assert worker.submit(jid).status_code == 200
    assert _rc(worker.submit(jid), 400) == "DuplicateGen"
    drops = horde.accounting().drops
    assert [rc for _, rc in drops] == ["InvalidJobID", "WrongCredentials", "DuplicateGen"]


def test_maintenance_serves_own_jobs_then_403_until_cleared(horde: LocalHorde, worker: WorkerClient) -> None:
    worker.pop()
    worker_id = horde.worker_details(worker.name)["id"]
    put = worker.session.put(f"{worker.url}/workers/{worker_id}", json={"maintenance": True}, timeout=5)
    assert put.status_code == 200 and put.json() == {"maintenance": True}
    stranger_key = horde.add_user("stranger")
    horde.request_generation(small_params(), api_key=stranger_key)
    resp = worker.pop_raw()
    assert _rc(resp, 403) == "WorkerMaintenance" and "maintenance mode" in resp.json()["message"]
    horde.request_generation(small_params())  # the owner's own request is still served
    assert worker.pop()["id"] is not None
    worker.session.put(f"{worker.url}/workers/{worker_id}", json={"maintenance": False}, timeout=5)
    assert worker.pop()["id"] is not None  # now the stranger's request too


def test_worker_modify_errors(horde: LocalHorde, worker: WorkerClient) -> None:
    worker.pop()
    url = f"{worker.url}/workers/{horde.worker_details(worker.name)['id']}"
    assert _rc(worker.session.put(url, json={}, timeout=5), 400) == "NoWorkerModSelected"
    assert _rc(worker.session.put(url, json={"paused": True}, timeout=5), 403) == "NotModerator"
    stranger = requests.put(
        url, json={"maintenance": True}, headers={"apikey": horde.add_user("s")}, timeout=5
    )
    assert _rc(stranger, 403) == "NotOwner"
    assert _rc(worker.session.get(worker.url + "/workers/nope", timeout=5), 404) == "WorkerNotFound"
    assert "maintenance" in _validation_errors(
        worker.session.put(url, json={"maintenance": "yes"}, timeout=5)
    )


def test_find_user_errors(horde: LocalHorde) -> None:
    assert _rc(requests.get(horde.api_url + "/find_user", timeout=5), 401) == "InvalidAPIKey"
    assert (
        _rc(requests.get(horde.api_url + "/find_user", headers={"apikey": "z" * 22}, timeout=5), 404)
        == "UserNotFound"
    )


def test_interrogate_submit_requires_an_object_result(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.request_interrogation(horde.host_image(b"x"), ["caption"])
    (form,) = worker.ipop(["caption"])["forms"]
    assert "result" in _validation_errors(worker.isubmit(form["id"], "a caption"))
    assert "result" in _validation_errors(worker.post("/interrogate/submit", {"id": form["id"]}))
    assert _rc(worker.isubmit("no-such-id", {"caption": "x"}), 404) == "InvalidJobID"
    assert worker.isubmit(form["id"], {"caption": "x"}).status_code == 200
    assert _rc(worker.isubmit(form["id"], {"caption": "x"}), 400) == "DuplicateGen"


def test_interrogate_pop_schema(worker: WorkerClient) -> None:
    errors = _validation_errors(
        worker.post("/interrogate/pop", {"name": "a-1", "forms": ["caption", "bogus"]})
    )
    assert list(errors) == ["forms.1"] and errors["forms.1"].startswith("'bogus' is not one of ['caption', ")
    assert "forms" in _validation_errors(
        worker.post("/interrogate/pop", {"name": "a-1", "forms": ["nsfw", "nsfw"]})
    )
    assert "max_tiles" in _validation_errors(
        worker.post("/interrogate/pop", {"name": "a-1", "max_tiles": 257})
    )


def test_bad_json_and_unknown_routes(horde: LocalHorde, worker: WorkerClient) -> None:
    resp = worker.session.post(worker.url + "/generate/pop", data=b"{not json", timeout=5)
    assert resp.status_code == 400
    assert worker.session.get(worker.url + "/nothing/here", timeout=5).status_code == 404
    assert worker.session.get(worker.url + "/generate/pop", timeout=5).status_code == 405
