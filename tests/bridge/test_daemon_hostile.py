"""The daemon against a hostile horde and hostile source hosts, one test per item of issue 17.

Everything goes through the local horde over real HTTP, with its fault injection playing the attacker, and the
real jobs on the tiny models. Exactly-once is read from the horde's own accounting.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bridge.api_models import AlchemyForm, GenerationPayload, GenerationPopResponse
from bridge.config import BRIDGE_NAME, build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher, is_public_address
from bridge.stats import Stats
from bridge.status_ui import render
from local_horde import DEFAULT_API_KEY, LocalHorde, RecordingHost
from models.device import DevicePolicy
from tests.bridge.generation import conftest as generation_fixtures
from tests.bridge.generation.conftest import RecordingManager
from tests.interrogators.helpers import cpu_cache, tiny_models_dir, tiny_set

tiny_reference = generation_fixtures.tiny_reference
pipelines = generation_fixtures.pipelines
one_torch_thread = generation_fixtures.one_torch_thread

MODEL = "tiny-sd1-diffusers"
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler"}
FAST = LoopTimings(idle_poll_s=0.02, error_poll_s=0.02, maintenance_poll_s=0.05, fault_pause_s=60.0)


# ---- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrogators(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_set(tiny_models_dir(tmp_path_factory), cpu_cache(), forms=("nsfw", "caption"))


@pytest.fixture
def horde(pipelines: RecordingManager) -> Iterator[LocalHorde]:
    with LocalHorde(known_models=pipelines.ready_models(),
                    extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}) as local:
        yield local


@pytest.fixture
def elsewhere() -> Iterator[RecordingHost]:
    with RecordingHost(body=webp(), content_type="image/webp") as host:  # 127.0.0.2
        yield host


def webp(color: str = "orange", size: tuple[int, int] = (48, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="WEBP")
    return buffer.getvalue()


def loopback_is_the_internet(address: Any) -> bool:
    """127.0.0.1 (the local horde) stands for a public host; every other address keeps the real rule."""
    return str(address) == "127.0.0.1" or is_public_address(address)


def make_runtime(*, models: Any = None, interrogators: Any = None, fetcher: SourceFetcher | None = None,
                 safety: Any = None, **settings: Any) -> Runtime:
    config = {"dreamer_name": "hostile-dreamer", "alchemist_name": "hostile-alchemist",
              "forms": ["nsfw", "caption"], "max_threads": 1, "queue_size": 1, "max_power": 8, **settings}
    return Runtime(config=build_config(config, environ={}).config, device=DevicePolicy.cpu(),
                   fetcher=fetcher or SourceFetcher(timeout=2.0, allow_private=True),
                   models=models, interrogators=interrogators, safety=safety)


def make_client(horde: LocalHorde, **kw: Any) -> HordeClient:
    retry = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, max_retry_after=0.1)
    return HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="hostile:1:tests", retry=retry,
                       timeout=kw.pop("timeout", 2.0), upload_timeout=kw.pop("upload_timeout", 1.0))


@contextlib.contextmanager
def serving(horde: LocalHorde, runtime: Runtime, sources: list, tmp_path: Path,
            timings: LoopTimings = FAST, client: HordeClient | None = None) -> Iterator[Daemon]:
    daemon = Daemon(client=client or make_client(horde), runtime=runtime, sources=sources,
                    journal=Journal(tmp_path / "inflight.json"), stats=Stats(), timings=timings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.request_stop("test")
        thread.join(timeout=60)
        assert not thread.is_alive()


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout} s")
        time.sleep(0.02)


def all_submitted(horde: LocalHorde, count: int) -> Callable[[], bool]:
    def check() -> bool:
        books = horde.accounting()
        return len(books.handed_out) >= count and all(books.submits.get(i) for i in books.handed_out)

    return check


def one_submit_each(horde: LocalHorde) -> dict[str, dict]:
    """Every id the horde handed out, with its one submit."""
    books = horde.accounting()
    for job_id in books.handed_out:
        assert len(books.submits.get(job_id, [])) == 1, f"{job_id}: {books.submits.get(job_id)}"
    return {job_id: books.submits[job_id][0] for job_id in books.handed_out}


def parse_failures(submit: dict) -> list[str]:
    return [m.get("ref", "") for m in submit.get("gen_metadata", []) if m["value"] == "parse_failed"]


# ---- 1. one submit per popped id, whatever the payload -------------------------------------------------

VALUES = {
    "string": "many", "integer": 7, "fraction": 2.5, "boolean": True, "array": ["x"], "object": {"x": 1},
}  # fmt: skip
INFORMATIONAL = ("messages", "skipped")  # about the worker, not the job: unreadable ones are ignored


def json_kinds(annotation: Any) -> set[str]:
    """The JSON types a field of this annotation is sent as (null always means "the default")."""
    kinds: set[str] = set()
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for kind in typing.get_args(annotation) if union else (annotation,):
        origin = typing.get_origin(kind) or kind
        if kind is type(None):
            continue
        if kind is str:
            kinds |= {"string", "integer", "fraction"}  # numbers are read as text: names arrive as ids
        elif kind is bool:
            kinds.add("boolean")
        elif kind is int:
            kinds.add("integer")
        elif kind is float:
            kinds |= {"integer", "fraction"}
        elif origin is list:
            kinds.add("array")
        else:  # dict, nested models
            kinds.add("object")
    return kinds


def wrong_values(model: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, Any, bool]]:
    """(field, value, must_fault) for every field and every JSON type it is not."""
    cases = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        accepted = json_kinds(info.annotation)
        if name == "seed":  # a string of an int on the wire
            accepted |= {"string", "integer", "fraction"}
        for kind, value in VALUES.items():
            if kind not in accepted or name in INFORMATIONAL:
                cases.append((prefix + name, value, kind not in accepted and name not in INFORMATIONAL))
    return cases


def tamper_each(cases: list[tuple[str, Any, bool]], seen: dict[str, tuple[str, Any, bool]],
                forms: bool = False) -> Callable[[Any], Any]:
    """An edit for the local horde: each job (or form) in a reply gets the next case."""
    pending = list(cases)

    def edit(body: Any) -> Any:
        targets = (body.get("forms") or []) if forms else ([body] if body.get("ids") else [])
        if not pending or not targets:
            return None
        for target in targets:
            if not pending:
                break
            field, value, must_fault = case = pending.pop(0)
            head, _, key = field.partition(".")
            job_id = target["id"] if forms else target["ids"][0]
            if forms:
                target[key] = value
            elif head == "payload" and key:
                target["payload"][key] = value
            else:
                target[field] = value
            seen[job_id] = case
        return body

    return edit


def test_every_field_of_every_wrong_json_type_ends_in_one_submit(
    horde: LocalHorde, pipelines: RecordingManager, interrogators: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, passing_safety: Any,
) -> None:
    generation_cases = wrong_values(GenerationPayload, "payload.") + wrong_values(
        GenerationPopResponse, skip=("id", "ids", "payload"))
    form_cases = [(f"form.{f}", v, m) for f, v, m in wrong_values(AlchemyForm, skip=("id",))]
    assert len(generation_cases) >= 150 and {f for f, _, _ in generation_cases} >= {
        "payload.ddim_steps", "payload.post_processing", "payload.loras", "payload.seed", "ttl", "r2_uploads"}
    for _ in generation_cases:
        horde.request_generation(SMALL, models=[MODEL])
    url = horde.host_image(webp(), "forms.webp")
    for _ in form_cases:
        horde.request_interrogation(url, ["nsfw"])
    gens: dict[str, tuple] = {}
    forms: dict[str, tuple] = {}
    horde.faults.rewrite("*/generate/pop", tamper_each(generation_cases, gens), count=None)
    horde.faults.rewrite("*/interrogate/pop", tamper_each(form_cases, forms, forms=True), count=None)
    runtime = make_runtime(models=pipelines, safety=passing_safety, interrogators=interrogators,
                           max_threads=2, queue_size=2)

    def every_case_submitted() -> bool:
        books = horde.accounting()
        done = len(gens) == len(generation_cases) and len(forms) == len(form_cases)
        return done and all(books.submits.get(i) for i in [*gens, *forms])

    with caplog.at_level(logging.WARNING), serving(
        horde, runtime, [GenerationSource(), AlchemySource()], tmp_path,
        LoopTimings(idle_poll_s=0.02, error_poll_s=0.02, fault_streak=10_000),
    ):
        wait_for(every_case_submitted, timeout=120, what="a submit for every tampered id")
    submits = one_submit_each(horde)  # the faulted ones came back requeued, under new ids: served too
    for job_id, (field, value, must_fault) in gens.items():
        named = [ref for ref in parse_failures(submits[job_id]) if ref.startswith(f"{field}:")]
        if must_fault:
            assert submits[job_id]["state"] == "faulted" and named, (field, value, submits[job_id])
        else:
            assert not named, (field, value)
    for job_id, (field, value, must_fault) in forms.items():
        if must_fault:
            assert submits[job_id]["state"] == "faulted", (field, value)
            assert f"{field.split('.', 1)[1]} (" in caplog.text  # the log names the field


# ---- 2. results survive upload and submit failures within the ttl --------------------------------------


def test_results_survive_r2_and_submit_failures_within_the_ttl(
    horde: LocalHorde, pipelines: RecordingManager, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    passing_safety: Any,
) -> None:
    def one_job(**params: Any) -> dict:
        request = horde.request_generation({**SMALL, **params}, models=[MODEL])
        return horde.wait_done([request], timeout=30)[request]

    done = []
    client = make_client(horde, upload_timeout=0.3)
    runtime = make_runtime(models=pipelines, safety=passing_safety)
    with serving(horde, runtime, [GenerationSource()], tmp_path, client=client):
        r2_down = horde.faults.http_error("/r2/generations/*", 503, method="PUT", count=None)
        done.append(one_job())  # 5xx on every attempt
        r2_down.remaining = 0
        r2_stalls = horde.faults.hang("/r2/generations/*", 30, method="PUT", count=None)
        done.append(one_job())  # never an answer
        r2_stalls.remaining = 0
        horde.faults.http_error("*/generate/submit", 503, count=10)  # longer than any fixed retry count
        done.append(one_job())
        horde.generations.job_ttl = 2.0  # the last job: its submit fails until its ttl is gone
        horde_down = horde.faults.http_error("*/generate/submit", 503, count=None)
        last = horde.request_generation(SMALL, models=[MODEL], prompt="never delivered")
        wait_for(lambda: "retried until the job's ttl ran out" in caplog.text, timeout=30, what="the drop")
        horde_down.remaining = 0
    for status in done:
        (gen,) = status["generations"]
        image = Image.open(io.BytesIO(horde.download(gen["img"])))
        assert image.size == (64, 64)  # the image reached the requester
    books = horde.accounting()
    last_ids = [i for i in books.handed_out if horde.generations.jobs[i].request.id == last]
    last_id = last_ids[0]  # (expired, the horde hands the request out again: that id is another story)
    sent = {i: books.submits[i] for i in books.handed_out if i not in last_ids}
    assert all(len(s) == 1 and s[0]["state"] == "ok" for s in sent.values())
    assert sum(s[0]["generation"] != "R2" for s in sent.values()) == 2  # R2 failed: base64 instead
    assert books.submits.get(last_id) is None  # never accepted: its ttl ran out first...
    assert f"dropped generation {last_id[:8]}" in caplog.text  # ...and the drop is logged


# ---- 3. redirects are never followed; the key goes to the horde only --------------------------------------


def test_redirects_never_take_the_key_or_a_result_elsewhere(
    horde: LocalHorde, pipelines: RecordingManager, elsewhere: RecordingHost, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, passing_safety: Any,
) -> None:
    horde.faults.redirect("*/generate/pop", elsewhere.url("/api/v2/generate/pop"), status=302, count=2)
    horde.faults.redirect("*/generate/submit", elsewhere.url("/api/v2/generate/submit"), count=1)
    horde.faults.redirect("/r2/*", elsewhere.url("/bucket/put"), method="PUT", count=1)
    request = horde.request_generation(SMALL, models=[MODEL])
    with caplog.at_level(logging.WARNING), serving(
        horde, make_runtime(models=pipelines, safety=passing_safety), [GenerationSource()], tmp_path
    ) as daemon:
        status = horde.wait_done([request], timeout=30)[request]
    assert daemon.stop_reason is None and elsewhere.seen == []
    assert "not followed" in caplog.text and elsewhere.origin in caplog.text
    (submit,) = one_submit_each(horde).values()
    assert submit["state"] == "ok" and submit["generation"] != "R2"  # the redirected PUT: base64
    assert status["generations"][0]["state"] == "ok"


# ---- 4. secrets never leave ---------------------------------------------------------------------------


def test_secrets_never_reach_gen_metadata_the_log_or_the_status_panel(
    horde: LocalHorde, pipelines: RecordingManager, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    passing_safety: Any,
) -> None:
    horde.faults.http_error("*/generate/submit", 400, rc="BadRequest",
                            message="refused: key {apikey} is banned\nINFO forged", count=1)
    horde.faults.http_error("/r2/*", 403, method="PUT", message="bad signature in {query}", count=1)
    horde.request_generation(SMALL, models=[MODEL])
    with caplog.at_level(logging.DEBUG), serving(
        horde, make_runtime(models=pipelines, safety=passing_safety), [GenerationSource()], tmp_path
    ) as daemon:
        wait_for(all_submitted(horde, 1), what="the refused submit handed back")
        horde.faults.wrong_type("model", f"{MODEL}\x1b[2J[link=http://evil.example]x[/link]")
        horde.request_generation(SMALL, models=[MODEL])
        wait_for(lambda: "evil.example" in daemon.stats.snapshot().last_job, what="the hostile model name")
        panel = render(daemon.stats, "worker")
    submits = one_submit_each(horde).values()
    texts = [" ".join(m.get("ref", "") for m in s.get("gen_metadata", [])) for s in submits]
    (text,) = [t for t in texts if "submit refused" in t]  # handed back faulted, saying why
    assert "***" in text and DEFAULT_API_KEY not in text and "\n" not in text
    # The worker's own log (urllib3's debug lines, which print request lines, stay off in a real run).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
    assert "bad signature in ***" in ours and "X-Amz-Signature=" not in ours and DEFAULT_API_KEY not in ours
    from rich.console import Console

    console = Console(record=True, width=200, color_system=None)
    console.print(panel)
    shown = console.export_text()
    assert "\x1b" not in shown and "[link=http://evil.example]" in shown  # text, not markup or escapes


# ---- 5. no SSRF ---------------------------------------------------------------------------------------


def test_sources_on_private_addresses_are_never_fetched(
    horde: LocalHorde, pipelines: RecordingManager, interrogators: Any, elsewhere: RecordingHost,
    tmp_path: Path, caplog: pytest.LogCaptureFixture, passing_safety: Any,
) -> None:
    fetcher = SourceFetcher(timeout=2.0, address_allowed=loopback_is_the_internet)
    lan_camera = horde.request_interrogation(elsewhere.url("/camera.webp"), ["caption"])
    public = horde.host_image(webp(), "public.webp")
    horde.faults.redirect("/r2/hosted/public.webp", elsewhere.url("/router.webp"), status=302, method="GET",
                          count=None)
    bounced = horde.request_interrogation(public, ["caption"])
    horde.request_generation({**SMALL, "denoising_strength": 0.5}, models=[MODEL],
                                       source_image=webp("blue", (64, 64)), source_processing="img2img")
    metadata_service = "http://169.254.169.254/latest/meta-data/"  # the cloud's credentials live there
    horde.faults.redirect("/r2/sources/*", metadata_service, method="GET", count=None)
    runtime = make_runtime(models=pipelines, safety=passing_safety, interrogators=interrogators,
                           fetcher=fetcher)
    with caplog.at_level(logging.WARNING), serving(
        horde, runtime, [GenerationSource(), AlchemySource()], tmp_path
    ):
        wait_for(all_submitted(horde, 3), what="three submits")
    assert elsewhere.seen == []  # the private host never saw a request
    submits = one_submit_each(horde)
    forms = {rid: horde.interrogation_status(rid)["forms"][0]["state"] for rid in (lan_camera, bounced)}
    assert set(forms.values()) <= {"waiting", "faulted"}  # handed back, never captioned
    (generation,) = [s for s in submits.values() if "generation" in s]
    assert generation["state"] == "ok"  # ran as txt2img, and says why
    entries = [(m["type"], m["value"]) for m in generation["gen_metadata"]]
    assert ("source_image", "download_failed") in entries
    assert "allow_private_sources" in caplog.text


# ---- 6. over-delivery -----------------------------------------------------------------------------------


def test_jobs_beyond_what_was_asked_are_faulted_at_once(
    horde: LocalHorde, pipelines: RecordingManager, interrogators: Any, tmp_path: Path, passing_safety: Any
) -> None:
    url = horde.host_image(webp(), "many.webp")
    for _ in range(4):
        horde.request_interrogation(url, ["nsfw"])
    batch = horde.request_generation(SMALL, models=[MODEL], n=3)
    horde.faults.over_deliver("*/interrogate/pop", extra=3)
    horde.faults.over_deliver("*/generate/pop", extra=2)
    gate = threading.Event()

    class Gated(AlchemySource):
        def pop(self, client, runtime, capacity):
            jobs = super().pop(client, runtime, capacity)
            for job in jobs:
                real = job.execute
                job.execute = lambda rt, real=real: gate.wait(30) and real(rt)
            return jobs

    runtime = make_runtime(models=pipelines, safety=passing_safety, interrogators=interrogators, queue_size=0)
    with serving(horde, runtime, [Gated(), GenerationSource()], tmp_path):
        # While the one form asked for holds the only run slot, the three extra ones are already back.
        wait_for(lambda: sum(s[0]["state"] == "faulted" for s in horde.accounting().submits.values()) >= 3,
                 timeout=10, what="the extra forms faulted")
        gate.set()
        wait_for(all_submitted(horde, 7), what="every id submitted")
    submits = one_submit_each(horde)
    extra = [s for s in submits.values() if any("over-delivered" in m.get("ref", "")
                                                 for m in s.get("gen_metadata", []))]
    assert len(extra) == 2 and all(s["state"] == "faulted" for s in extra)  # the 2 extra generation ids
    assert horde.generation_status(batch)["finished"] >= 1
    assert sum(s["state"] == "faulted" for s in submits.values() if "result" in s) == 3  # the 3 extra forms


# ---- 7. odd image modes --------------------------------------------------------------------------------


def test_sources_in_odd_modes_are_converted_not_faulted(
    horde: LocalHorde, pipelines: RecordingManager, interrogators: Any, tmp_path: Path, passing_safety: Any
) -> None:
    from tests.bridge.test_sources import MODE_SOURCES

    form = horde.request_interrogation(horde.host_image(MODE_SOURCES["La tiff"], "la.tiff"), ["nsfw"])
    sixteen_bit = horde.request_generation(
        {**SMALL, "denoising_strength": 0.6}, models=[MODEL], source_image=MODE_SOURCES["I;16 png"],
        source_processing="img2img")
    runtime = make_runtime(models=pipelines, safety=passing_safety, interrogators=interrogators)
    with serving(horde, runtime, [GenerationSource(), AlchemySource()], tmp_path):
        statuses = horde.wait_done([form, sixteen_bit], timeout=30)
    assert isinstance(statuses[form]["forms"][0]["result"]["nsfw"], bool)
    (gen,) = statuses[sixteen_bit]["generations"]
    assert not [m for m in gen["gen_metadata"] if m["type"] == "source_image"]  # used, not dropped


# ---- 8. deadlines on whole requests; no slot held past the ttl ---------------------------------------------


def test_slow_sources_hold_no_slot_and_do_not_stop_popping(
    horde: LocalHorde, interrogators: Any, tmp_path: Path
) -> None:
    for name in ("drip1.webp", "drip2.webp"):
        url = horde.host_image(webp(), name)
        horde.faults.trickle(f"/r2/hosted/{name}", seconds=60, interval_s=0.1)  # the first download only
        horde.request_interrogation(url, ["caption"])
    normal = horde.request_interrogation(horde.host_image(webp(), "fine.webp"), ["caption"])
    fetcher = SourceFetcher(timeout=4.0, allow_private=True)
    runtime = make_runtime(interrogators=interrogators, fetcher=fetcher)
    started = time.monotonic()
    with serving(horde, runtime, [AlchemySource()], tmp_path):
        horde.wait_done([normal], timeout=20)
        served_after = time.monotonic() - started
        slow = horde.accounting().handed_out[:2]
        wait_for(lambda: all(horde.submits(i) for i in slow), timeout=20, what="the trickled forms back")
        handed_back_after = time.monotonic() - started
    # Popped and served while both slow downloads still waited (they count as slow after 2 s).
    assert served_after < 4.0
    assert handed_back_after < 7.0  # the trickled headers did not outlive the download deadline
    submits = one_submit_each(horde)
    assert [submits[i]["state"] for i in slow] == ["faulted", "faulted"]


def test_a_job_whose_ttl_ran_out_in_the_queue_never_takes_a_slot(
    horde: LocalHorde, pipelines: RecordingManager, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    passing_safety: Any,
) -> None:
    horde.generations.job_ttl = 1.0
    for prompt in ("first", "second"):
        horde.request_generation(SMALL, models=[MODEL], prompt=prompt)
    gate, ran = threading.Event(), []

    class Gated(GenerationSource):
        def pop(self, client, runtime, capacity):
            jobs = super().pop(client, runtime, capacity)
            for job in jobs:
                real = job._generate  # the step that holds the run slot (the safety pass runs after it)

                def generate(rt, real=real, job_id=job.ids[0]):
                    ran.append(job_id)
                    gate.wait(30)
                    return real(rt)

                job._generate = generate
            return jobs

    with caplog.at_level(logging.WARNING), serving(
        horde, make_runtime(models=pipelines, safety=passing_safety), [Gated()], tmp_path
    ):
        wait_for(lambda: len(horde.accounting().handed_out) == 2, what="both popped")
        time.sleep(1.2)  # both ttls run out while the first holds the only slot
        gate.set()
        wait_for(lambda: "ttl ran out while it waited" in caplog.text, what="the second refusing its slot")
    first, second = horde.accounting().handed_out[:2]
    assert ran[0] == first and second not in ran  # the expired one never ran


# ---- 9. transient is transient ---------------------------------------------------------------------------


def test_odd_answers_never_stop_the_worker_and_unservable_forms_never_pause_it(
    horde: LocalHorde, interrogators: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for status, html in ((408, False), (403, True), (404, True), (503, False)):
        horde.faults.http_error("*/interrogate/pop", status, html=html, count=7)  # past the client's retries
    url = horde.host_image(webp(), "good.webp")
    for _ in range(6):
        horde.request_interrogation(url, ["nsfw"])

    def unservable(body: Any) -> Any:
        forms = body.get("forms") if isinstance(body, dict) else None
        if not forms:
            return None
        for form in forms:
            form["form"] = "GFPGAN"  # handed out, but not served here
        return body

    horde.faults.rewrite("*/interrogate/pop", unservable, count=1)  # one pop of forms not served here
    timings = LoopTimings(idle_poll_s=0.02, error_poll_s=0.02, fault_streak=3, fault_pause_s=60)
    runtime = make_runtime(interrogators=interrogators, max_threads=2, queue_size=4)
    ok = lambda: sum(s[0]["state"] == "ok" for s in horde.accounting().submits.values())  # noqa: E731
    with caplog.at_level(logging.INFO), serving(
        horde, runtime, [AlchemySource()], tmp_path, timings
    ) as daemon:
        wait_for(lambda: ok() == 6, timeout=30, what="every form served after all")
        assert daemon.stop_reason is None and not daemon.stopping
    assert "pausing pops" not in caplog.text
    states = [s["state"] for s in one_submit_each(horde).values()]
    assert states.count("faulted") >= 3 and states.count("ok") == 6
    assert "pop failed" in caplog.text  # each odd answer was logged, then retried


# ---- 10. the rest: sanitised server text, broken models ----------------------------------------------------


def test_moderator_messages_cannot_forge_log_lines(
    horde: LocalHorde, pipelines: RecordingManager, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    passing_safety: Any,
) -> None:
    horde.faults.messages("be nice\n2026-01-01 00:00:00 ERROR bridge.daemon: forged\x1b[2J\x07", count=None)
    request = horde.request_generation(SMALL, models=[MODEL])
    runtime = make_runtime(models=pipelines, safety=passing_safety)
    with caplog.at_level(logging.INFO), serving(horde, runtime, [GenerationSource()], tmp_path):
        horde.wait_done([request], timeout=30)
    lines = [r.getMessage() for r in caplog.records if "message from the horde" in r.getMessage()]
    assert lines and all("\n" not in line and "\x1b" not in line and "\x07" not in line for line in lines)
    assert "be nice" in lines[0] and "forged" in lines[0]


def test_a_model_whose_files_fail_to_load_stops_being_advertised(
    horde: LocalHorde, tiny_reference: Path, tmp_path: Path, passing_safety: Any
) -> None:
    import json
    import shutil

    from models.downloads import hash_file
    from tests.bridge.generation.conftest import make_manager

    root = tmp_path / "models"
    shutil.copytree(tiny_reference.parent, root, ignore=shutil.ignore_patterns("*.sha256", ".*", "ref-cache"))
    records = json.loads((root / tiny_reference.name).read_text())
    (root / "broken.safetensors").write_bytes(b"\x00" * 8 + b"garbage, not a safetensors header" * 20)
    records["tiny-broken"] = {**records["tiny-sd1"], "name": "tiny-broken", "diffusers_config": None,
                              "config": {"files": [{"path": "broken.safetensors",
                                                    "sha256sum": hash_file(root / "broken.safetensors")}]}}
    (root / tiny_reference.name).write_text(json.dumps(records))
    manager = make_manager(root / tiny_reference.name, models=[MODEL, "tiny-broken"])
    with LocalHorde(known_models=[MODEL, "tiny-broken"],
                    extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}) as local:
        broken = local.request_generation(SMALL, models=["tiny-broken"])
        runtime = make_runtime(models=manager, safety=passing_safety)
        with serving(local, runtime, [GenerationSource()], tmp_path):
            wait_for(lambda: bool(local.accounting().requeues), what="the broken model's job faulted")
            good = local.request_generation(SMALL, models=[MODEL])
            local.wait_done([good], timeout=30)
        assert local.worker_details("hostile-dreamer")["models"] == [MODEL]  # no longer advertised
        assert "tiny-broken" in manager.broken_models()
        assert local.generation_status(broken)["finished"] == 0
