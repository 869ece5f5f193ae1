"""Alchemy end to end through the local horde.

A requester posts /interrogate/async, AlchemySource pops over real HTTP, the test calls prepare/execute/send
as the daemon would, and the requester's status shows the result. Models are tiny random-weight folders
loaded through the real loaders.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import interrogators as interrogator_package
from bridge.api_models import AlchemyForm
from bridge.config import KNOWN_FORMS, BridgeConfig
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import (
    INTERROGATOR_FORMS,
    AestheticJob,
    AlchemyJob,
    AlchemySource,
    CaptionJob,
    InterrogationJob,
    NsfwJob,
    PostProcessJob,
    UnservableJob,
)
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from interrogators import InterrogatorSet
from interrogators.terms import CATEGORIES
from local_horde import CORRUPT_IMAGE_BYTES, LocalHorde
from models.cache import ModelCache
from models.device import DevicePolicy
from postprocessors import PostProcessorRegistry
from tests.interrogators.helpers import (
    cpu_cache,
    encoded,
    one_torch_thread,
    picture,
    tiny_models_dir,
    tiny_set,
)
from tests.interrogators.safety_helpers import ADULT_NUDE, place_concepts, tiny_safety

REGEN_AGENT = "AI Horde Worker reGen:9.0.0:https://github.com/Haidra-Org/horde-worker-reGen"
UPSCALER = "4x_AnimeSharp"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def horde() -> Iterator[LocalHorde]:
    with LocalHorde() as server:
        yield server


@pytest.fixture(scope="module")
def client(horde: LocalHorde) -> Iterator[HordeClient]:
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05)
    with HordeClient(horde.base_url, horde.api_key, client_agent="alchemy-tests:0:none", retry=retry) as c:
        yield c


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return cpu_cache()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def interrogators(
    models_dir: Path, cache: ModelCache, tmp_path_factory: pytest.TempPathFactory
) -> InterrogatorSet:
    return tiny_set(models_dir, cache, embeddings_dir=tmp_path_factory.getbasetemp() / "alchemy-embeddings")


@pytest.fixture(scope="module")
def postprocessors(tmp_path_factory: pytest.TempPathFactory, cache: ModelCache) -> PostProcessorRegistry:
    """Only one upscaler's weights: a tiny ESRGAN in the old key layout, loaded by the real registry."""
    from spandrel.architectures.ESRGAN import ESRGAN

    weights_dir = tmp_path_factory.mktemp("postprocessors")
    (weights_dir / "esrgan").mkdir()
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=4)
    torch.save(net.state_dict(), weights_dir / "esrgan" / f"{UPSCALER}.pth")
    registry = PostProcessorRegistry(weights_dir=weights_dir, cache=cache, device=DevicePolicy.cpu())
    assert registry.available() == [UPSCALER]
    return registry


def make_runtime(horde: LocalHorde, forms: list[str], **parts: Any) -> Runtime:
    config = BridgeConfig(
        api_key=horde.api_key,
        horde_url=horde.base_url,
        alchemist_name=f"Alchemist {'-'.join(forms)[:60]}",
        forms=forms,
        bridge_agent=REGEN_AGENT,
        max_threads=2,
    )
    fetcher = SourceFetcher(timeout=5.0, allow_private=True)  # the local horde is on loopback
    return Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher, **parts)


@pytest.fixture()
def runtime(
    horde: LocalHorde, interrogators: InterrogatorSet, postprocessors: PostProcessorRegistry
) -> Runtime:
    forms = ["caption", "interrogation", "nsfw", "aesthetic", UPSCALER, "GFPGAN"]
    return make_runtime(horde, forms, interrogators=interrogators, postprocessors=postprocessors)


@pytest.fixture(autouse=True)
def empty_queue(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> Iterator[None]:
    """Each test pops only its own forms: whatever one leaves queued is faulted away (3 aborts end a form)."""
    yield
    _drain(horde, client, runtime)


def run_jobs(jobs: list[AlchemyJob], client: HordeClient, runtime: Runtime) -> list[float]:
    """What the daemon does with each popped job, in line."""
    rewards = []
    for job in jobs:
        job.prepare(runtime)
        submissions = job.execute(runtime)
        assert [s.job_id for s in submissions] == job.ids
        rewards += [job.send(client, submission) for submission in submissions]
    return rewards


def pop_all(
    source: AlchemySource, client: HordeClient, runtime: Runtime, capacity: int = 8
) -> list[AlchemyJob]:
    return source.pop(client, runtime, capacity)


def only_form(status: dict[str, Any]) -> dict[str, Any]:
    assert len(status["forms"]) == 1
    return status["forms"][0]


def test_caption_form_end_to_end_with_payload_options(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    source_image = picture(1)
    payload = {"max_length": 2, "min_length": 0, "num_beams": 1}
    rid = horde.request_interrogation(encoded(source_image), [{"name": "caption", "payload": payload}])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert [type(j) for j in jobs] == [CaptionJob]
    assert jobs[0].ttl == 180.0 and jobs[0].payload == payload

    assert run_jobs(jobs, client, runtime) == [1.0]
    status = horde.interrogation_status(rid)
    assert status["state"] == "done"
    form = only_form(status)
    assert set(form) == {"form", "state", "result"} and form["form"] == "caption" and form["state"] == "done"
    caption = form["result"]["caption"]
    assert list(form["result"]) == ["caption"] and isinstance(caption, str)
    # max_length 2 took effect: at most two word pieces, and the same as the captioner gives directly.
    assert 1 <= len(caption.split()) <= 2
    assert form["result"] == runtime.interrogators.caption.caption(source_image, payload)
    assert len(horde.submits(jobs[0].ids[0])) == 1


def test_interrogation_form_end_to_end(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> None:
    rid = horde.request_interrogation(
        encoded(picture(2)), [{"name": "interrogation", "payload": {"top_count": 2}}]
    )
    jobs = pop_all(AlchemySource(), client, runtime)
    assert [type(j) for j in jobs] == [InterrogationJob]
    assert run_jobs(jobs, client, runtime) == [3.0]
    form = only_form(horde.interrogation_status(rid))
    assert form["state"] == "done"
    ranked = form["result"]["interrogation"]
    assert list(ranked) == list(CATEGORIES)
    for entries in ranked.values():
        assert len(entries) == 2
        assert all(set(e) == {"text", "confidence"} and isinstance(e["confidence"], float) for e in entries)


def test_nsfw_form_reports_both_verdicts(
    horde: LocalHorde, client: HordeClient, models_dir: Path, cache: ModelCache, tmp_path: Path
) -> None:
    # The horde's decision on the split tiny CLIP, whose similarities the test places.
    safety = tiny_safety(models_dir, cache, tmp_path / "embeddings")
    nsfw_only = make_runtime(horde, ["nsfw"], interrogators=InterrogatorSet(safety=safety))
    clean = horde.request_interrogation(encoded(picture(3)), ["nsfw"])
    jobs = pop_all(AlchemySource(), client, nsfw_only)
    assert [type(j) for j in jobs] == [NsfwJob]
    assert run_jobs(jobs, client, nsfw_only) == [1.0]
    assert only_form(horde.interrogation_status(clean))["result"] == {"nsfw": False}

    place_concepts(safety, ADULT_NUDE)
    flagged = horde.request_interrogation(encoded(picture(4)), ["nsfw"])
    run_jobs(pop_all(AlchemySource(), client, nsfw_only), client, nsfw_only)
    assert only_form(horde.interrogation_status(flagged))["result"] == {"nsfw": True}


def test_aesthetic_form_end_to_end(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> None:
    source = picture(9)
    rid = horde.request_interrogation(encoded(source), ["aesthetic"])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert [type(j) for j in jobs] == [AestheticJob]
    assert run_jobs(jobs, client, runtime) == [1.0]  # the server pays every non-interrogation form 1 kudos
    form = only_form(horde.interrogation_status(rid))
    assert form["state"] == "done" and list(form["result"]) == ["aesthetic"]
    score = form["result"]["aesthetic"]
    assert isinstance(score, float) and score == round(score, 4)
    assert score == round(runtime.interrogators.safety.aesthetic_score(source), 4)
    assert horde.submits(jobs[0].ids[0])[0]["result"] == {"aesthetic": score}


def test_nsfw_interrogation_and_aesthetic_on_one_source_embed_it_once(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    runtime.interrogators.warm()
    clip = runtime.interrogators.interrogation.embedder
    assert runtime.interrogators.safety.embedder is clip
    before = clip.image_forwards
    rid = horde.request_interrogation(encoded(picture(10, (80, 72))), ["nsfw", "interrogation", "aesthetic"])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert sorted(j.model for j in jobs) == ["aesthetic", "interrogation", "nsfw"]
    assert run_jobs(jobs, client, runtime) == [1.0, 3.0, 1.0]
    assert horde.interrogation_status(rid)["state"] == "done"
    assert clip.image_forwards - before == 1  # three jobs, three downloads, one CLIP forward


def test_the_form_names_are_one_list() -> None:
    assert INTERROGATOR_FORMS == interrogator_package.INTERROGATOR_FORMS
    assert set(INTERROGATOR_FORMS) <= set(KNOWN_FORMS)


def test_post_processor_form_puts_webp_to_r2(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    source = picture(5, size=(40, 24))
    rid = horde.request_interrogation(encoded(source), [UPSCALER])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert [type(j) for j in jobs] == [PostProcessJob]
    assert run_jobs(jobs, client, runtime) == [pytest.approx(3.0)]
    form = only_form(horde.interrogation_status(rid))
    assert form["state"] == "done"
    url = form["result"][UPSCALER]  # the horde replaced our "R2" with a download URL
    assert url.startswith(horde.base_url)
    assert horde.submits(jobs[0].ids[0])[0]["result"] == {UPSCALER: "R2"}
    with Image.open(io.BytesIO(horde.download(url))) as upscaled:
        assert upscaled.format == "WEBP"
        assert upscaled.size == (160, 96)
    assert jobs[0].timings.post_processing > 0 and jobs[0].timings.upload > 0


def test_several_forms_in_one_pop_each_submitted_once(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    rid = horde.request_interrogation(encoded(picture(6)), ["caption", "nsfw", "interrogation"])
    jobs = pop_all(AlchemySource(), client, runtime, capacity=2)
    assert len(jobs) == 2  # amount follows the free capacity
    jobs += pop_all(AlchemySource(), client, runtime, capacity=2)
    assert sorted(j.model for j in jobs) == ["caption", "interrogation", "nsfw"]
    run_jobs(jobs, client, runtime)
    status = horde.interrogation_status(rid)
    assert status["state"] == "done"
    assert {f["form"]: list(f["result"]) for f in status["forms"]} == {
        "caption": ["caption"], "nsfw": ["nsfw"], "interrogation": ["interrogation"],
    }  # fmt: skip
    assert all(len(horde.submits(i)) == 1 for j in jobs for i in j.ids)


def test_pop_advertises_only_ready_forms_under_the_alchemist_name(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    source = AlchemySource()
    # GFPGAN is configured but its weights are absent: not offered.
    assert source.ready_forms(runtime) == ["caption", "interrogation", "nsfw", "aesthetic", UPSCALER]
    assert pop_all(source, client, runtime) == []  # idle: the horde answers forms: null
    worker = horde.worker_details(runtime.config.alchemist_name)
    assert worker is not None and worker["type"] == "interrogation"
    assert worker["forms"] == ["caption", "interrogation", "nsfw", "aesthetic", UPSCALER]
    assert worker["bridge_agent"] == REGEN_AGENT and worker["threads"] == 2
    request = source.request(runtime, source.ready_forms(runtime), capacity=3)
    assert (request.amount, request.max_tiles, request.name) == (3, 16, runtime.config.alchemist_name)


def test_nothing_servable_means_no_pop(horde: LocalHorde, client: HordeClient) -> None:
    bare = make_runtime(horde, ["caption", "GFPGAN"])  # no interrogators, no post-processors
    source = AlchemySource()
    assert not source.ready(bare)
    horde.request_interrogation(encoded(picture(7)), ["caption"])
    # An empty forms list would mean ["caption"] to the horde: the source must not pop at all.
    assert source.pop(client, bare, 4) == []
    assert horde.worker_details(bare.config.alchemist_name) is None


def _faulted_once(horde: LocalHorde, job: AlchemyJob) -> None:
    submits = horde.submits(job.ids[0])
    assert submits == [{"id": job.ids[0], "result": {}, "state": "faulted"}]


def test_unreachable_source_url_is_faulted_and_requeued(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    rid = horde.request_interrogation("http://127.0.0.1:9/gone.webp", ["caption"])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert len(jobs) == 1
    jobs[0].prepare(runtime)
    assert jobs[0].image is None and "download_failed" in (jobs[0].problem or "")
    assert run_jobs(jobs, client, runtime) == [0.0]
    _faulted_once(horde, jobs[0])
    # The horde requeues a faulted form for another worker.
    assert only_form(horde.interrogation_status(rid))["state"] == "waiting"


def test_corrupt_source_image_is_faulted(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> None:
    rid = horde.request_interrogation(
        horde.host_image(CORRUPT_IMAGE_BYTES, "corrupt.webp"), ["nsfw", UPSCALER]
    )
    jobs = pop_all(AlchemySource(), client, runtime)
    assert len(jobs) == 2
    run_jobs(jobs, client, runtime)
    for job in jobs:
        assert "parse_failed" in (job.problem or "")
        _faulted_once(horde, job)
    assert {f["state"] for f in horde.interrogation_status(rid)["forms"]} == {"waiting"}


def test_a_form_the_worker_cannot_serve_is_faulted_without_download(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    horde.request_interrogation(encoded(picture(8)), ["caption"])
    popped = pop_all(AlchemySource(), client, runtime)
    # As if the horde had handed out a form outside the worker's ready list.
    job = AlchemySource.job_for(popped[0].form, ready=["nsfw"])
    assert isinstance(job, UnservableJob)
    job.prepare(runtime)
    assert job.image is None and job.timings.source_download == 0
    run_jobs([job], client, runtime)
    _faulted_once(horde, job)


def test_fault_and_job_basics() -> None:
    form = AlchemyForm(id="a" * 36, form="caption", source_image=None)
    job = CaptionJob(form)
    assert job.ids == ["a" * 36] and job.model == "caption" and job.kind == "alchemy"
    runtime = Runtime(config=BridgeConfig(), device=DevicePolicy.cpu(), fetcher=SourceFetcher())
    [submission] = job.execute(runtime)  # no source image: faulted, never raised
    assert (submission.state, submission.result) == ("faulted", {})
    assert job.fault("why")[0].state == "faulted"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"), MemoryError()])
def test_out_of_memory_in_a_form_faults_it_and_the_next_form_is_served(
    horde: LocalHorde,
    client: HordeClient,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    captioner = runtime.interrogators.caption
    real = captioner.caption
    calls: list[int] = []

    def caption_once_out_of_memory(image, options=None):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(image, options)

    monkeypatch.setattr(captioner, "caption", caption_once_out_of_memory)
    first = horde.request_interrogation(encoded(picture(11)), ["caption"])
    [job] = pop_all(AlchemySource(), client, runtime)
    run_jobs([job], client, runtime)
    _faulted_once(horde, job)  # the interrogation submit carries no gen_metadata: the reason is logged
    assert only_form(horde.interrogation_status(first))["state"] == "waiting"
    [retry] = pop_all(AlchemySource(), client, runtime)  # the requeued form, served this time
    run_jobs([retry], client, runtime)
    assert only_form(horde.interrogation_status(first))["state"] == "done"
    assert len(calls) == 2


def _drain(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> int:
    """Serve whatever a test left requeued, so that later tests pop only their own forms."""
    served = 0
    while jobs := pop_all(AlchemySource(), client, runtime):
        for job in jobs:
            submissions = job.fault("test cleanup")
            job.send(client, submissions[0])
            served += 1
    return served


@pytest.mark.parametrize("name", ["4xNomosWebPhoto_RealPLKSR", "2xModernSpanimationV1"])
def test_a_bridge_v13_post_processor_as_an_alchemy_form(
    horde: LocalHorde, client: HordeClient, cache: ModelCache, tmp_path_factory: pytest.TempPathFactory,
    name: str,
) -> None:
    from bridge import horde_names
    from postprocessors.tiny import build_tiny_postprocessors

    weights = tmp_path_factory.getbasetemp() / "alchemy-v13"
    build_tiny_postprocessors(weights, categories=["esrgan"])
    registry = PostProcessorRegistry(weights_dir=weights, cache=cache, device=DevicePolicy.cpu())
    runtime = make_runtime(horde, [name], postprocessors=registry)
    rid = horde.request_interrogation(encoded(picture(9, size=(40, 24))), [name])
    jobs = pop_all(AlchemySource(), client, runtime)
    assert [type(j) for j in jobs] == [PostProcessJob]
    assert run_jobs(jobs, client, runtime) == [pytest.approx(3.0)]  # one 512² tile x 3 kudos
    form = only_form(horde.interrogation_status(rid))
    scale = horde_names.UPSCALER_SCALES[name]
    with Image.open(io.BytesIO(horde.download(form["result"][name]))) as upscaled:
        assert upscaled.format == "WEBP" and upscaled.size == (40 * scale, 24 * scale)
