"""Full requester -> worker -> requester loops over real HTTP."""

from __future__ import annotations

import base64
import threading

import requests

from local_horde import DEFAULT_API_KEY, LocalHorde
from tests.local_horde.conftest import WorkerClient, small_params, webp


def test_generation_loop_returns_the_exact_uploaded_bytes(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params(seed="1234"), prompt="a cat###ugly", models=["tiny-sd1"])
    job = worker.pop()
    assert job["ids"] == [job["id"]] and job["model"] == "tiny-sd1"
    assert job["payload"]["prompt"] == "a cat###ugly"
    assert (
        job["payload"]["seed"] == "1234"
        and job["payload"]["ddim_steps"] == 2
        and job["payload"]["n_iter"] == 1
    )
    assert job["r2_uploads"] == [job["r2_upload"]]
    image = webp("blue")
    assert requests.put(job["r2_upload"], data=image, timeout=5).status_code == 200
    resp = worker.submit(job["id"], seed=1234)
    assert resp.status_code == 200 and resp.json()["reward"] > 0

    status = horde.wait_done([rid], timeout=5)[rid]
    assert status["done"] and status["finished"] == 1 and not status["faulted"]
    (gen,) = status["generations"]
    assert gen["id"] == job["id"] and gen["seed"] == "1234" and gen["worker_name"] == worker.name
    assert gen["state"] == "ok" and gen["censored"] is False and gen["model"] == "tiny-sd1"
    assert horde.download(gen["img"]) == image
    assert horde.submits(job["id"]) == [{"id": job["id"], "generation": "R2", "state": "ok", "seed": 1234}]
    acc = horde.accounting()
    assert acc.handed_out == [job["id"]] and acc.unfinished() == [] and acc.rewards[job["id"]] > 0


def test_batched_pop_gives_one_id_and_upload_per_image(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params(seed="10"), n=3, models=["tiny-sd1"])
    job = worker.pop(amount=2)
    assert len(job["ids"]) == 2 and len(set(job["r2_uploads"])) == 2 and job["payload"]["n_iter"] == 2
    rest = worker.pop(amount=2)
    assert len(rest["ids"]) == 1 and rest["payload"]["seed"] == "12"
    for i, (jid, url) in enumerate(
        zip(job["ids"] + rest["ids"], job["r2_uploads"] + rest["r2_uploads"], strict=True)
    ):
        requests.put(url, data=webp(), timeout=5)
        assert worker.submit(jid, seed=10 + i).status_code == 200
    status = horde.wait_done([rid], timeout=5)[rid]
    assert sorted(g["seed"] for g in status["generations"]) == ["10", "11", "12"]


def test_base64_submit_and_censorship(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_generation(small_params(), r2=False)
    job = worker.pop()
    image = webp("green")
    meta = [{"type": "censorship", "value": "nsfw"}]
    resp = worker.submit(
        job["id"], generation=base64.b64encode(image).decode(), state="censored", gen_metadata=meta
    )
    assert resp.status_code == 200 and resp.json()["reward"] > 0
    (gen,) = horde.wait_done([rid], timeout=5)[rid]["generations"]
    assert gen["censored"] is True and gen["gen_metadata"] == meta
    assert base64.b64decode(gen["img"]) == image  # r2=False: the requester gets base64


def test_alchemy_loop_caption_and_post_processor(horde: LocalHorde, worker: WorkerClient) -> None:
    source = webp("white", (600, 300))
    rid = horde.request_interrogation(horde.host_image(source), ["caption", "RealESRGAN_x2plus"])
    popped = worker.ipop(["caption", "RealESRGAN_x2plus"], amount=5)
    forms = {f["form"]: f for f in popped["forms"]}
    assert set(forms) == {"caption", "RealESRGAN_x2plus"} and popped["skipped"] == {}
    assert "r2_upload" not in forms["caption"] and "payload" not in forms["caption"]
    assert requests.get(forms["caption"]["source_image"], timeout=5).content == source

    assert worker.isubmit(forms["caption"]["id"], {"caption": "a white square"}).json() == {"reward": 1.0}
    upscaled = webp("white", (128, 128))
    requests.put(forms["RealESRGAN_x2plus"]["r2_upload"], data=upscaled, timeout=5)
    reward = worker.isubmit(forms["RealESRGAN_x2plus"]["id"], {"RealESRGAN_x2plus": "R2"}).json()["reward"]
    assert reward == 3.0 * 2  # 600x300 is two 512 tiles

    status = horde.wait_done([rid], timeout=5)[rid]
    assert status["state"] == "done"
    results = {f["form"]: f["result"] for f in status["forms"]}
    assert results["caption"] == {"caption": "a white square"}
    assert horde.download(results["RealESRGAN_x2plus"]["RealESRGAN_x2plus"]) == upscaled


def test_alchemy_with_base64_source_and_payload(horde: LocalHorde, worker: WorkerClient) -> None:
    source = webp("black")
    horde.request_interrogation(source, [{"name": "interrogation", "payload": {"top_count": 3}}])
    (form,) = worker.ipop(["interrogation"])["forms"]
    assert form["payload"] == {"top_count": 3}
    assert form["source_image"].startswith(horde.base_url)  # base64 from the client -> an R2 URL for workers
    assert requests.get(form["source_image"], timeout=5).content == source
    assert worker.isubmit(form["id"], {"interrogation": {"tags": []}}).json() == {"reward": 3.0}


def test_users_workers_and_status_endpoints(horde: LocalHorde, worker: WorkerClient) -> None:
    worker.pop()
    user = worker.session.get(worker.url + "/find_user", timeout=5).json()
    assert user["username"] == "local#1" and user["worker_count"] == 1
    details = worker.session.get(f"{worker.url}/workers/{user['worker_ids'][0]}", timeout=5).json()
    assert details["name"] == worker.name and details["type"] == "image" and details["models"] == ["tiny-sd1"]
    assert details["bridge_agent"].startswith("AI Horde Worker reGen") and details["online"] is True
    by_name = worker.session.get(f"{worker.url}/workers/name/{worker.name}", timeout=5).json()
    assert by_name["id"] == details["id"]
    beat = requests.get(worker.url + "/status/heartbeat", timeout=5).json()
    assert beat["message"] == "OK" and beat["version"] == "5.1.5"
    models = {m["name"]: m for m in requests.get(worker.url + "/status/models", timeout=5).json()}
    assert models["tiny-sd1"]["count"] == 1 and models["stable_diffusion"]["count"] == 0
    assert requests.get(worker.url + "/status/models?model_state=bogus", timeout=5).status_code == 400


def test_model_stats_shape_for_top_n(horde: LocalHorde, worker: WorkerClient) -> None:
    horde.set_model_stats({"day": {"A": 5}, "month": {"A": 50, "B": 70}, "total": {"B": 900}})
    horde.request_generation(small_params())
    job = worker.pop()
    worker.submit(job["id"])
    stats = requests.get(worker.url + "/stats/img/models", timeout=5).json()
    assert set(stats) == {"day", "month", "total"}
    assert (
        stats["day"] == {"A": 5, "tiny-sd1": 1} and stats["month"]["B"] == 70 and stats["total"]["B"] == 900
    )


def test_default_key_is_a_22_char_token() -> None:
    assert len(DEFAULT_API_KEY) == 22 and DEFAULT_API_KEY.replace("_", "").replace("-", "").isalnum()


def test_concurrent_workers_get_each_id_exactly_once(horde: LocalHorde) -> None:
    rids = [horde.request_generation(small_params(), n=2) for _ in range(15)]

    def run(name: str) -> None:
        client = WorkerClient(horde, name=name)
        while (job := client.pop(amount=2))["id"] is not None:
            for jid, url in zip(job["ids"], job["r2_uploads"], strict=True):
                requests.put(url, data=jid.encode(), timeout=5)
                assert client.submit(jid).status_code == 200

    threads = [threading.Thread(target=run, args=(f"worker-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    statuses = horde.wait_done(rids, timeout=5)
    acc = horde.accounting()
    assert len(acc.handed_out) == len(set(acc.handed_out)) == 30
    assert all(len(acc.submits[i]) == 1 for i in acc.handed_out) and acc.unfinished() == []
    for status in statuses.values():
        assert all(horde.download(g["img"]) == g["id"].encode() for g in status["generations"])


def test_aesthetic_form_is_accepted_and_paid_one_kudos(horde: LocalHorde, worker: WorkerClient) -> None:
    rid = horde.request_interrogation(horde.host_image(webp("white", (300, 200))), ["aesthetic"])
    popped = worker.ipop(["aesthetic"])
    [form] = popped["forms"]
    assert form["form"] == "aesthetic" and "r2_upload" not in form
    assert worker.isubmit(form["id"], {"aesthetic": 6.1234}).json() == {"reward": 1.0}
    [view] = horde.interrogation_status(rid)["forms"]
    assert view["state"] == "done" and view["result"] == {"aesthetic": 6.1234}


def test_only_a_csam_censorship_entry_records_a_problem_job(horde: LocalHorde, worker: WorkerClient) -> None:
    rids = [horde.request_generation(small_params(), models=["tiny-sd1"]) for _ in range(3)]
    bodies = [
        {"state": "csam", "gen_metadata": [{"type": "censorship", "value": "csam"}]},
        {"state": "csam"},  # a bare state: the server acts on the entry, not the state
        {"state": "censored", "gen_metadata": [{"type": "censorship", "value": "nsfw"}]},
    ]
    ids = []
    for body in bodies:
        job = worker.pop()
        requests.put(job["r2_upload"], data=webp("grey"), timeout=5)
        assert worker.submit(job["id"], **body).status_code == 200
        ids.append(job["id"])
    assert horde.accounting().problem_jobs == [ids[0]]
    censored = {g["id"]: g["censored"] for s in horde.wait_done(rids).values() for g in s["generations"]}
    assert censored == {ids[0]: True, ids[1]: False, ids[2]: True}
