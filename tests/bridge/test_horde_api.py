"""HordeClient against the local horde over real HTTP: every error row, retries, uploads, idle pops.

Backoff waits are recorded by an injected `sleep` (no test waits for a real backoff); the jitter RNG is
seeded so delays are reproducible.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from bridge.api_models import (
    GenerationPopRequest,
    GenerationSubmit,
    InterrogationPopRequest,
    InterrogationSubmit,
)
from bridge.errors import (
    HordeError,
    JobDroppedError,
    JobFaultError,
    MaintenanceError,
    Policy,
    RetryableError,
    WorkerStopError,
    already_delivered,
)
from bridge.horde_api import HordeClient, parse_retry_after
from bridge.retry import RetryPolicy
from local_horde import ANON_API_KEY, DEFAULT_API_KEY, FaultKind, LocalHorde, RecordingHost

REGEN = "AI Horde Worker reGen:10.0.0:https://github.com/Haidra-Org/horde-worker-reGen"
MODELS = ("stable_diffusion", "tiny-sd1")
AGENT = "test-bridge:0.1:tests"
SMALL = {"steps": 2, "width": 64, "height": 64}
POP = "/api/v2/generate/pop"
SUBMIT = "/api/v2/generate/submit"


class Sleeps(list):
    """An injected sleep: records each backoff instead of waiting it."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def webp(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="WEBP")
    return buffer.getvalue()


@pytest.fixture
def horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=MODELS) as local:
        yield local


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_client(
    horde: LocalHorde, sleeps: Sleeps, *, api_key: str = DEFAULT_API_KEY, **kw: Any
) -> HordeClient:
    retry = RetryPolicy(max_attempts=kw.pop("max_attempts", 4), sleep=sleeps, rng=random.Random(7))
    return HordeClient(
        horde.base_url, api_key, client_agent=AGENT, retry=retry, timeout=kw.pop("timeout", 5.0)
    )


@pytest.fixture
def client(horde: LocalHorde, sleeps: Sleeps) -> Iterator[HordeClient]:
    with make_client(horde, sleeps) as c:
        yield c


def pop_request(name: str = "api-test-worker", **kw: Any) -> GenerationPopRequest:
    return GenerationPopRequest(name=name, models=["tiny-sd1"], bridge_agent=REGEN, **kw)


def pop_one(horde: LocalHorde, client: HordeClient, **params: Any) -> str:
    horde.request_generation({**SMALL, **params}, models=["tiny-sd1"])
    popped = client.pop_generation(pop_request())
    assert not popped.is_idle
    return popped.job_ids[0]


def ok_submit(job_id: str, **kw: Any) -> GenerationSubmit:
    return GenerationSubmit(id=job_id, generation="R2", seed=kw.pop("seed", 1), **kw)


# ---- pops, the loop, idle recognition -----------------------------------------------------------------


def test_idle_pops_of_both_kinds(client: HordeClient) -> None:
    idle = client.pop_generation(pop_request())
    assert idle.is_idle and idle.job_ids == []
    assert idle.payload.ddim_steps == 30  # the idle reply's default payload is not a job
    idle_forms = client.pop_interrogation(InterrogationPopRequest(name="api-alchemist", forms=["caption"]))
    assert idle_forms.is_idle and idle_forms.forms == []


def test_batch_pop_upload_and_submit_round_trip(horde: LocalHorde, client: HordeClient) -> None:
    rid = horde.request_generation({**SMALL, "seed": "1234"}, models=["tiny-sd1"], n=2)
    popped = client.pop_generation(pop_request(amount=2))
    assert len(popped.job_ids) == 2 and popped.payload.n_iter == 2
    assert isinstance(popped.payload.seed, int) and popped.payload.seed == 1234
    images = {job_id: webp(color) for job_id, color in zip(popped.job_ids, ("red", "blue"), strict=True)}
    for job_id, data in images.items():
        client.upload(popped.upload_url_for(job_id), data)
        assert client.submit_generation(ok_submit(job_id, seed=popped.payload.seed)) > 0
    status = horde.wait_done([rid])[rid]
    received = {gen["id"]: horde.download(gen["img"]) for gen in status["generations"]}
    assert received == images  # each id's bytes landed at its own presigned URL
    assert all(len(horde.submits(job_id)) == 1 for job_id in images)


def test_interrogation_round_trip_and_duplicate(horde: LocalHorde, client: HordeClient) -> None:
    horde.request_interrogation(horde.host_image(webp()), ["caption"])
    popped = client.pop_interrogation(
        InterrogationPopRequest(name="api-alchemist", forms=["caption", "nsfw"])
    )
    (form,) = popped.forms
    assert form.form == "caption" and form.source_image.startswith("http")
    reward = client.submit_interrogation(InterrogationSubmit(id=form.id, result={"caption": "a red square"}))
    assert reward == pytest.approx(1.0)
    with pytest.raises(JobDroppedError) as dup:
        client.submit_interrogation(InterrogationSubmit(id=form.id, result={"caption": "again"}))
    assert dup.value.rc == "DuplicateGen"


def test_base_url_may_end_in_api(horde: LocalHorde, sleeps: Sleeps) -> None:
    retry = RetryPolicy(sleep=sleeps)
    with HordeClient(horde.base_url + "/api/", DEFAULT_API_KEY, client_agent=AGENT, retry=retry) as c:
        assert c.heartbeat()["message"] == "OK"


# ---- error rows ---------------------------------------------------------------------------------------


def test_submit_drop_rows(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    job_id = pop_one(horde, client)
    with pytest.raises(JobDroppedError) as unknown:
        client.submit_generation(ok_submit("00000000-0000-0000-0000-000000000000"))
    assert (unknown.value.status, unknown.value.rc) == (404, "InvalidJobID")
    intruder_key = horde.add_user("intruder")
    with (
        make_client(horde, sleeps, api_key=intruder_key) as intruder,
        pytest.raises(JobDroppedError) as creds,
    ):
        intruder.submit_generation(ok_submit(job_id))
    assert creds.value.rc == "WrongCredentials"
    assert client.submit_generation(ok_submit(job_id)) > 0
    with pytest.raises(JobDroppedError) as dup:
        client.submit_generation(ok_submit(job_id))
    assert dup.value.rc == "DuplicateGen"
    aborted_id = pop_one(horde, client)
    horde.expire(aborted_id)
    with pytest.raises(JobDroppedError) as aborted:
        client.submit_generation(ok_submit(aborted_id))
    assert aborted.value.rc == "AbortedGen"
    assert sleeps == []  # none of these is worth a retry


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic notices the deliberately wrong seed type
def test_submit_validation_error_faults_the_job(horde: LocalHorde, client: HordeClient) -> None:
    job_id = pop_one(horde, client)
    # A bug that slips a string seed through: the server's jsonschema 400 has no rc, only `errors`.
    broken = GenerationSubmit.model_construct(
        id=job_id, generation="R2", state="ok", seed="123", gen_metadata=[]
    )
    with pytest.raises(JobFaultError) as fault:
        client.submit_generation(broken)
    assert fault.value.rc is None and "seed" in fault.value.errors
    faulted = GenerationSubmit(id=job_id, generation="faulted", state="faulted", seed=-1)
    assert client.submit_generation(faulted) == 0.0  # the policy's next step is accepted


@pytest.mark.parametrize(
    ("api_key", "rc", "cls"),
    [(ANON_API_KEY, "AnonForbiddenWorker", WorkerStopError), ("x" * 22, "InvalidAPIKey", RetryableError)],
)
def test_pop_auth_rows(horde: LocalHorde, sleeps: Sleeps, api_key: str, rc: str, cls: type) -> None:
    with make_client(horde, sleeps, api_key=api_key) as c, pytest.raises(cls) as err:
        c.pop_generation(pop_request())
    assert err.value.rc == rc
    # InvalidAPIKey is retried (as reGen does) until the budget runs out; the anon key is never retried.
    assert len(sleeps) == (3 if cls is RetryableError else 0)


def test_pop_config_rows_stop_the_worker(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    client.pop_generation(pop_request(name="taken-name"))
    other = make_client(horde, sleeps, api_key=horde.add_user("other"))
    with other, pytest.raises(WorkerStopError) as taken:
        other.pop_generation(pop_request(name="taken-name"))
    assert taken.value.rc == "WrongCredentials" and "worker_name" in taken.value.message
    with pytest.raises(WorkerStopError) as poly:
        client.pop_interrogation(InterrogationPopRequest(name="taken-name"))
    assert poly.value.rc == "PolymorphicNameConflict"
    with pytest.raises(WorkerStopError) as models:
        client.pop_generation(GenerationPopRequest(name="w2", models=["no-such-model"]))
    assert models.value.rc == "BadRequest" and "models_to_load" in models.value.message
    bad_names = GenerationPopRequest.model_construct(
        name="w3", models=["tiny-sd1"], priority_usernames=["db0"]
    )
    with pytest.raises(WorkerStopError) as names:
        client.pop_generation(bad_names)
    assert names.value.rc == "InvalidPriorityUsername"
    assert sleeps == []


@pytest.mark.parametrize(
    "rc",
    ["UnsafeIP", "TimeoutIP", "TooManySameIPs", "TooManyWorkers", "WorkerInviteOnly", "DeletedUser"],
)
def test_injected_ip_and_account_rows_stop(horde: LocalHorde, client: HordeClient, rc: str) -> None:
    horde.faults.http_error(POP, 403, rc=rc, message=f"{rc} says no")
    with pytest.raises(WorkerStopError) as err:
        client.pop_generation(pop_request())
    assert err.value.rc == rc and f"{rc} says no" in err.value.message
    assert "->" in err.value.message  # followed by what the operator should do


def test_too_many_new_ips_is_transient(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    horde.faults.http_error(POP, 403, rc="TooManyNewIPs", count=2)
    assert client.pop_generation(pop_request()).is_idle
    assert len(sleeps) == 2


def test_maintenance_detected_exposed_and_cleared(
    horde: LocalHorde, client: HordeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client.pop_generation(pop_request())
    (worker_id,) = client.find_user()["worker_ids"]
    client.set_maintenance(worker_id, True)
    assert client.get_worker(worker_id)["maintenance_mode"] is True
    with caplog.at_level(logging.WARNING, logger="bridge.horde_api"):
        for _ in range(2):
            with pytest.raises(MaintenanceError) as err:
                client.pop_generation(pop_request())
    assert err.value.rc == "WorkerMaintenance" and err.value.policy is Policy.MAINTENANCE
    assert client.maintenance and "maintenance mode" in client.maintenance_message
    warned = [r for r in caplog.records if r.name == "bridge.horde_api" and r.levelno == logging.WARNING]
    assert len(warned) == 1  # once, not per poll
    client.set_maintenance(worker_id, False)
    assert client.pop_generation(pop_request()).is_idle
    assert not client.maintenance and client.maintenance_message is None


def test_flagged_maintenance_on_alchemy_pop(horde: LocalHorde, client: HordeClient) -> None:
    horde.faults.http_error("/api/v2/interrogate/pop", 403, rc="WorkerFlaggedMaintenance")
    with pytest.raises(MaintenanceError):
        client.pop_interrogation(InterrogationPopRequest(name="api-alchemist"))
    assert client.maintenance


def test_informational_endpoints(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    horde.set_model_stats({"day": {"tiny-sd1": 3}, "month": {}, "total": {}})
    assert client.model_stats()["day"]["tiny-sd1"] == 3
    assert client.find_user()["username"].endswith("#1")
    client.pop_generation(pop_request())
    (worker_id,) = client.find_user()["worker_ids"]
    stranger = make_client(horde, sleeps, api_key=horde.add_user("stranger"))
    with stranger, pytest.raises(JobDroppedError) as not_owner:
        stranger.set_maintenance(worker_id, True)
    assert not_owner.value.rc == "NotOwner"
    with pytest.raises(JobDroppedError) as missing:
        client.get_worker("no-such-worker")
    assert missing.value.rc == "WorkerNotFound"
    with make_client(horde, sleeps, api_key="z" * 22) as nobody, pytest.raises(WorkerStopError) as unknown:
        nobody.find_user()
    assert unknown.value.rc == "UserNotFound"


# ---- transient failures and retries --------------------------------------------------------------------


def test_5xx_is_retried_with_full_jitter(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    horde.faults.http_error(POP, 503, count=3)
    assert client.pop_generation(pop_request()).is_idle
    assert len(sleeps) == 3
    # Full jitter: attempt n waits uniformly in [0, base * 2**(n-1)] (base 1 s).
    assert all(0 <= delay <= 2**i for i, delay in enumerate(sleeps))
    assert len(set(sleeps)) == 3


def test_persistent_5xx_gives_up_after_max_attempts(horde: LocalHorde, client: HordeClient) -> None:
    horde.faults.http_error(POP, 500, count=None)
    with pytest.raises(RetryableError) as err:
        client.pop_generation(pop_request())
    assert err.value.status == 500
    assert len(horde.faults.fired(FaultKind.STATUS)) == 4


def test_429_honours_retry_after(horde: LocalHorde, client: HordeClient, sleeps: Sleeps) -> None:
    horde.faults.rate_limit(POP, retry_after=7)
    assert client.pop_generation(pop_request()).is_idle
    (delay,) = sleeps
    assert 7 <= delay <= 8  # the server's value plus at most base_delay of jitter


@pytest.mark.parametrize("kind", ["hang", "drop", "malformed"])
def test_transport_failures_are_retried(
    horde: LocalHorde, sleeps: Sleeps, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    {
        "hang": lambda: horde.faults.hang(POP, 3.0),
        "drop": lambda: horde.faults.drop(POP),
        "malformed": lambda: horde.faults.malformed(POP),
    }[kind]()
    with caplog.at_level(logging.DEBUG), make_client(horde, sleeps, timeout=0.5) as c:
        assert c.pop_generation(pop_request()).is_idle
    assert len(sleeps) == 1
    assert DEFAULT_API_KEY not in caplog.text


def test_lost_submit_answer_then_duplicate_is_a_drop(horde: LocalHorde, client: HordeClient) -> None:
    job_id = pop_one(horde, client)
    horde.faults.drop(SUBMIT, after=True)  # the horde counts the submit, the answer never arrives
    with pytest.raises(JobDroppedError) as err:
        client.submit_generation(ok_submit(job_id))
    assert err.value.rc == "DuplicateGen"
    assert len(horde.submits(job_id)) == 2
    # The first attempt's answer was lost (no response): the horde has the result, it was delivered.
    assert [e.status for e in err.value.earlier] == [None]
    assert already_delivered(err.value)


def test_unknown_key_on_submit_is_a_500_and_never_leaks(
    horde: LocalHorde, client: HordeClient, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = pop_one(horde, client)
    secret = "S3cretKeyNobodyKnows22"
    with caplog.at_level(logging.DEBUG), make_client(horde, sleeps, api_key=secret) as c:
        with pytest.raises(RetryableError) as err:
            c.submit_generation(ok_submit(job_id))
        assert secret not in repr(c)
    assert err.value.status == 500
    assert secret not in str(err.value) and secret not in caplog.text


def test_cancel_interrupts_a_real_backoff(horde: LocalHorde) -> None:
    horde.faults.rate_limit(POP, retry_after=30)
    retry = RetryPolicy()  # real waiting: only the cancel event can make this quick
    with HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent=AGENT, retry=retry) as c:
        threading.Timer(0.2, retry.cancel.set).start()
        started = time.monotonic()
        with pytest.raises(RetryableError) as err:
            c.pop_generation(pop_request())
    assert time.monotonic() - started < 5
    assert err.value.status == 429 and err.value.retry_after == 30


# ---- uploads ------------------------------------------------------------------------------------------


def test_upload_retries_5xx_and_faults_on_bad_signature(
    horde: LocalHorde, client: HordeClient, sleeps: Sleeps
) -> None:
    rid = horde.request_generation(SMALL, models=["tiny-sd1"])
    popped = client.pop_generation(pop_request())
    (job_id,) = popped.job_ids
    url = popped.upload_url_for(job_id)
    horde.faults.http_error("/r2/*", 500, method="PUT")
    client.upload(url, webp("green"))
    assert len(sleeps) == 1
    with pytest.raises(JobFaultError) as bad_sig:
        client.upload(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), b"x")
    assert bad_sig.value.status == 403 and "Signature" in bad_sig.value.message
    assert "X-Amz-Signature" not in str(bad_sig.value)  # the presigned query is a credential
    client.submit_generation(ok_submit(job_id))
    (gen,) = horde.wait_done([rid])[rid]["generations"]
    assert horde.download(gen["img"]) == webp("green")


class _Recorder(BaseHTTPRequestHandler):
    """Records what arrives: headers are exactly what we must prove absent or present."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str], bytes]]

    def _record(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, {k.lower(): v for k, v in self.headers.items()}, body))
        reply = json.dumps({"message": "OK"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_PUT = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list]]:
    seen: list = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_headers_upload_has_no_content_type_and_no_key(recorder: tuple[str, list], sleeps: Sleeps) -> None:
    base, seen = recorder
    with HordeClient(base, DEFAULT_API_KEY, client_agent=AGENT, retry=RetryPolicy(sleep=sleeps)) as c:
        c.heartbeat()
        c.upload(f"{base}/r2/obj?X-Amz-Signature=abc", b"RIFF-bytes")
        with pytest.raises(JobFaultError):
            c.upload("file:///etc/passwd", b"x")
    (get_method, api_headers, _), (put_method, put_headers, put_body) = seen
    assert get_method == "GET" and api_headers["apikey"] == DEFAULT_API_KEY
    assert api_headers["client-agent"] == AGENT
    assert put_method == "PUT" and put_body == b"RIFF-bytes"
    assert "content-type" not in put_headers
    assert "apikey" not in put_headers  # the key never travels to the object store


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= parse_retry_after(later) <= 61


# ---- the retry policy itself --------------------------------------------------------------------------


def test_retry_policy_budget_and_pass_through() -> None:
    now = [0.0]
    sleeps = Sleeps()

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    policy = RetryPolicy(max_attempts=100, max_elapsed=10.0, sleep=fake_sleep, clock=lambda: now[0])
    calls = []

    def always_busy() -> None:
        calls.append(now[0])
        raise RetryableError("busy", status=503)

    with pytest.raises(RetryableError):
        policy.call(always_busy)
    assert now[0] <= 10.0 and len(calls) >= 2  # stopped by elapsed time, not by attempts

    def stop() -> None:
        raise WorkerStopError("config", status=403)

    sleeps.clear()
    with pytest.raises(WorkerStopError):
        policy.call(stop)
    assert sleeps == []
    assert issubclass(WorkerStopError, HordeError)


# ---- a hostile network (issue 17) ---------------------------------------------------------------------


@pytest.fixture
def elsewhere() -> Iterator[RecordingHost]:
    with RecordingHost() as host:  # 127.0.0.2: another origin
        yield host


@pytest.mark.parametrize(("route", "status"), [(POP, 302), (POP, 307), (SUBMIT, 307), (SUBMIT, 308)])
def test_redirects_are_never_followed_and_the_key_never_leaves(
    horde: LocalHorde, client: HordeClient, elsewhere: RecordingHost, caplog: pytest.LogCaptureFixture,
    route: str, status: int,
) -> None:
    job_id = pop_one(horde, client) if route == SUBMIT else None
    horde.faults.redirect(route, elsewhere.url(route), status=status, count=None)
    with pytest.raises(RetryableError) as err, caplog.at_level(logging.WARNING):
        if job_id:
            client.submit_generation(ok_submit(job_id))
        else:
            client.pop_generation(pop_request())
    assert err.value.status == status and "not followed" in err.value.message
    assert elsewhere.seen == []  # nothing reached the other origin: no key, no job
    assert f"redirecting to {elsewhere.origin}" in caplog.text
    if job_id:
        assert horde.submits(job_id) == []


def test_upload_redirect_is_not_followed(
    horde: LocalHorde, client: HordeClient, elsewhere: RecordingHost, sleeps: Sleeps
) -> None:
    horde.request_generation(SMALL, models=["tiny-sd1"])
    popped = client.pop_generation(pop_request())
    horde.faults.redirect("/r2/*", elsewhere.url("/bucket/x.webp"), method="PUT")
    with pytest.raises(JobFaultError):  # the job then submits base64 (tests/bridge/jobs)
        client.upload(popped.upload_url_for(popped.job_ids[0]), webp())
    assert elsewhere.seen == [] and sleeps == []


@pytest.mark.parametrize(
    "inject",
    [
        lambda f: f.http_error(POP, 408, message="Request Timeout"),
        lambda f: f.http_error(POP, 403, html=True),  # a CDN's page: no JSON, no rc
        lambda f: f.http_error(POP, 404, html=True),
        lambda f: f.http_error(POP, 502, html=True),
    ],
)
def test_answers_that_are_not_the_hordes_are_transient(
    horde: LocalHorde, client: HordeClient, sleeps: Sleeps, inject: Any
) -> None:
    inject(horde.faults)
    assert client.pop_generation(pop_request()).is_idle  # retried, then served
    assert len(sleeps) == 1


def test_submit_retries_until_the_deadline_not_a_count(horde: LocalHorde, sleeps: Sleeps) -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    retry = RetryPolicy(max_attempts=3, max_elapsed=5, sleep=sleep, clock=lambda: clock[0],
                        rng=random.Random(1))
    with HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent=AGENT, retry=retry) as c:
        job_id = pop_one(horde, c)
        horde.faults.http_error(SUBMIT, 503, count=12)  # far past the count budget of 3
        assert c.submit_generation(ok_submit(job_id), deadline=10_000.0) > 0
        assert len(sleeps) == 12 and len(horde.faults.fired(FaultKind.STATUS)) == 12
        other = pop_one(horde, c)
        horde.faults.http_error(SUBMIT, 503, count=None)
        deadline = clock[0] + 60.0
        with pytest.raises(RetryableError):
            c.submit_generation(ok_submit(other), deadline=deadline)
        assert clock[0] <= deadline  # no attempt starts after the job's ttl


def test_error_text_echoing_the_key_is_masked(
    horde: LocalHorde, client: HordeClient, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = pop_one(horde, client)
    horde.faults.http_error(SUBMIT, 400, rc="BadRequest", message="refused for key {apikey}\nFORGED")
    with pytest.raises(JobFaultError) as err, caplog.at_level(logging.DEBUG):
        client.submit_generation(ok_submit(job_id))
    assert DEFAULT_API_KEY not in str(err.value) and "***" in err.value.message
    assert "\n" not in err.value.message and DEFAULT_API_KEY not in caplog.text


def test_a_pop_with_unreadable_fields_keeps_its_ids(horde: LocalHorde, client: HordeClient) -> None:
    horde.request_generation(SMALL, models=["tiny-sd1"])
    horde.faults.wrong_type("payload.post_processing", "GFPGAN")
    popped = client.pop_generation(pop_request())
    assert popped.job_ids == horde.accounting().handed_out
    assert list(popped.unreadable) == ["payload.post_processing"]
