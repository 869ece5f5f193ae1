"""GenerationJob and GenerationSource against the local horde over real HTTP, on the tiny models."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridge.api_models import GenerationPopResponse
from bridge.config import BRIDGE_NAME, BridgeConfig
from bridge.horde_api import HordeClient
from bridge.images import encode_webp
from bridge.jobs.generation import GenerationJob, GenerationSource, pop_request
from bridge.runtime import Runtime
from local_horde import CORRUPT_IMAGE_BYTES, DEFAULT_API_KEY, LocalHorde
from tests.bridge.generation import conftest as generation_fixtures
from tests.bridge.generation.conftest import RecordingManager, make_manager, make_runtime
from tests.interrogators.safety_helpers import ADULT_NUDE, PHOTO_CSAM, place_concepts

# The tiny models and pipelines, shared (session-scoped) with the generation tests.
tiny_reference = generation_fixtures.tiny_reference
pipelines = generation_fixtures.pipelines
source_image = generation_fixtures.source_image
one_torch_thread = generation_fixtures.one_torch_thread
safety = generation_fixtures.safety

SD1 = "tiny-sd1-diffusers"
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler"}


@pytest.fixture(scope="module")
def horde(pipelines: RecordingManager) -> Iterator[LocalHorde]:
    # Our bridge name gets reGen's capabilities here (img2img, painting, r2 sources); on the real horde an
    # operator sets bridge_agent to a recognised name for that.
    with LocalHorde(
        known_models=pipelines.ready_models(), extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}
    ) as h:
        yield h


@pytest.fixture(scope="module")
def client(horde: LocalHorde) -> Iterator[HordeClient]:
    with HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="tests:0:none") as c:
        yield c


@pytest.fixture()
def runtime(pipelines: RecordingManager, safety) -> Runtime:
    return make_runtime(
        pipelines, safety, api_key=DEFAULT_API_KEY, dreamer_name="gen-test-worker", max_batch=4
    )


def webp(image: Image.Image) -> bytes:
    return encode_webp(image, quality=90)


def pop_one(client: HordeClient, runtime: Runtime) -> GenerationJob:
    jobs = GenerationSource().pop(client, runtime, capacity=1)
    assert len(jobs) == 1 and isinstance(jobs[0], GenerationJob)
    return jobs[0]


def finish(horde: LocalHorde, client: HordeClient, runtime: Runtime, job: GenerationJob) -> list[Any]:
    job.prepare(runtime)
    submissions = job.execute(runtime)
    assert [s.job_id for s in submissions] == job.ids
    for submission in submissions:
        job.send(client, submission)
    return submissions


def test_batched_txt2img_round_trip(horde: LocalHorde, client: HordeClient, runtime: Runtime) -> None:
    rid = horde.request_generation({**SMALL, "n": 2, "seed": "5"}, models=[SD1])
    job = pop_one(client, runtime)
    assert len(job.ids) == 2 and job.model == SD1
    submissions = finish(horde, client, runtime, job)
    status = horde.wait_done([rid])[rid]
    by_id = {g["id"]: g for g in status["generations"]}
    for index, submission in enumerate(submissions):
        [submit] = horde.submits(submission.job_id)
        assert submit["generation"] == "R2" and submit["state"] == "ok"
        assert submit["seed"] == 5 + index  # an int, the seed rule seed + batch index
        assert {"type": "batch_index", "value": "see_ref", "ref": str(index)} in submit["gen_metadata"]
        # The requester downloads exactly the bytes the worker uploaded: a 64x64 webp.
        stored = horde.download(by_id[submission.job_id]["img"])
        assert stored == submission.image
        assert Image.open(io.BytesIO(stored)).size == (64, 64)
    assert submissions[0].image != submissions[1].image


def test_img2img_source_fetched_from_the_horde(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, source_image: Image.Image
) -> None:
    rid = horde.request_generation(
        {**SMALL, "denoising_strength": 0.6},
        models=[SD1],
        source_image=webp(source_image),
        source_processing="img2img",
    )
    job = pop_one(client, runtime)
    assert job.pop.source_image
    [submission] = finish(horde, client, runtime, job)
    assert submission.state == "ok" and job.fetched.image is not None
    assert not any(m["type"] == "source_image" for m in submission.gen_metadata)
    assert horde.wait_done([rid])[rid]["done"]


def test_corrupt_source_falls_back_to_txt2img_and_says_so(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    url = horde.host_image(CORRUPT_IMAGE_BYTES)
    rid = horde.request_generation(SMALL, models=[SD1], source_image=url, source_processing="img2img")
    job = pop_one(client, runtime)
    [submission] = finish(horde, client, runtime, job)
    assert submission.state == "ok"
    [meta] = [m for m in submission.gen_metadata if m["type"] == "source_image"]
    assert meta["value"] == "parse_failed"
    [submit] = horde.submits(submission.job_id)
    assert submit["gen_metadata"] == submission.gen_metadata
    assert horde.wait_done([rid])[rid]["done"]


def test_inpainting_with_a_mask_of_the_wrong_shape(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, source_image: Image.Image
) -> None:
    mask = Image.new("L", (32, 48), 255)
    rid = horde.request_generation(
        SMALL,
        models=["tiny-inpainting"],
        source_image=webp(source_image),
        source_mask=webp(mask.convert("RGB")),
        source_processing="inpainting",
    )
    job = pop_one(client, runtime)
    [submission] = finish(horde, client, runtime, job)
    types = {(m["type"], m["value"]) for m in submission.gen_metadata}
    assert ("source_mask", "parse_failed") in types
    # Without a usable mask the inpainting model repaints everything, and says that too.
    assert any("full mask" in m.get("ref", "") for m in submission.gen_metadata)
    assert horde.wait_done([rid])[rid]["done"]


def test_depth_model_reports_the_ignored_mask(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, source_image: Image.Image
) -> None:
    rgba = source_image.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rid = horde.request_generation(
        SMALL,
        models=["tiny-sd2-depth"],
        source_image=encode_webp(rgba, lossless=True),
        source_processing="img2img",
    )
    job = pop_one(client, runtime)
    [submission] = finish(horde, client, runtime, job)
    assert any(m["ref"].startswith("source_mask") and "ignores" in m["ref"] for m in submission.gen_metadata)
    assert horde.wait_done([rid])[rid]["done"]


def test_faulted_job_is_submitted_as_faulted(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    rid = horde.request_generation(SMALL, models=[SD1])
    job = pop_one(client, runtime)
    [submission] = job.fault("the GPU caught fire")
    assert submission.state == "faulted" and submission.image is None
    assert job.send(client, submission) == 0
    [submit] = horde.submits(submission.job_id)
    assert submit["state"] == "faulted" and isinstance(submit["seed"], int)
    assert submit["gen_metadata"] == [
        {"type": "information", "value": "see_ref", "ref": "the GPU caught fire"}
    ]
    # The horde hands the request out again under a new id; this time it is done.
    again = pop_one(client, runtime)
    assert again.ids != job.ids
    finish(horde, client, runtime, again)
    assert horde.wait_done([rid])[rid]["done"]


def offline_job(payload: dict[str, Any], model: str = SD1, **pop: Any) -> GenerationJob:
    body = {"id": "00000000-0000-4000-8000-000000000001", "model": model, "payload": payload, **pop}
    body["ids"] = [body["id"]]
    return GenerationJob(GenerationPopResponse.model_validate(body))


@pytest.mark.parametrize(
    ("payload", "model", "reason"),
    [
        ({"ddim_steps": 0, "width": 64, "height": 64}, SD1, "at least 1"),
        ({"ddim_steps": 2, "width": 1024, "height": 1024}, SD1, "max_pixels"),
        ({"ddim_steps": 2, "width": 64, "height": 64}, "not-a-model", "not served"),
        ({"ddim_steps": 2, "width": 64, "height": 64}, "tiny-sd2-depth", "needs a source image"),
    ],
)
def test_bad_jobs_fault_with_a_reason(runtime: Runtime, payload: dict, model: str, reason: str) -> None:
    job = offline_job({"prompt": "x", "seed": "1", **payload}, model)
    job.prepare(runtime)
    [submission] = job.execute(runtime)
    assert submission.state == "faulted" and submission.image is None and submission.seed == 1
    assert reason in submission.gen_metadata[-1]["ref"]


def test_non_image_base64_source_is_reported(runtime: Runtime) -> None:
    job = offline_job({"prompt": "x", "seed": "1", "ddim_steps": 1, "width": 64, "height": 64},
                      source_image="bm90IGFuIGltYWdl", source_processing="img2img")  # fmt: skip
    job.prepare(runtime)
    [submission] = job.execute(runtime)
    assert submission.state == "ok"
    assert submission.gen_metadata[0]["type"] == "source_image"
    assert submission.gen_metadata[0]["value"] == "parse_failed"
    assert np.asarray(Image.open(io.BytesIO(submission.image))).shape == (64, 64, 3)


def test_extra_source_images_are_reported(runtime: Runtime, source_image: Image.Image) -> None:
    payload = {"prompt": "x", "seed": "1", "ddim_steps": 1, "width": 64, "height": 64}
    extra = [{"image": "https://example.invalid/a.webp", "strength": 0.5}]
    job = offline_job(payload, extra_source_images=extra)
    job.prepare(runtime)
    [submission] = job.execute(runtime)
    assert submission.state == "ok"
    assert [m["type"] for m in submission.gen_metadata] == ["extra_source_images", "aesthetic_score"]


def test_pop_request_from_legacy_config() -> None:
    config = BridgeConfig(
        worker_name="w", dreamer_name="dreamer", max_power=16, max_batch=3, nsfw=False, blacklist=["x"],
        allow_unsafe_ip=False, allow_painting=False, max_threads=2, limit_max_steps=True,
        priority_usernames=["db0#1"], allow_lora=True,
    )  # fmt: skip
    body = pop_request(config, ["a-model"]).model_dump()
    assert body["name"] == "dreamer" and body["models"] == ["a-model"]
    assert (body["amount"], body["max_pixels"], body["threads"]) == (3, 8 * 64 * 64 * 16, 2)
    assert (body["nsfw"], body["blacklist"], body["priority_usernames"]) == (False, ["x"], ["db0#1"])
    assert (body["allow_unsafe_ipaddr"], body["allow_painting"], body["limit_max_steps"]) == (
        False,
        False,
        True,
    )
    assert body["allow_lora"] is False  # not implemented: never advertised


def test_idle_pop_and_no_ready_models(client: HordeClient, runtime: Runtime, tiny_reference: Path) -> None:
    assert GenerationSource().pop(client, runtime, capacity=1) == []
    assert GenerationSource().pop(client, runtime, capacity=0) == []
    empty = make_runtime(make_manager(tiny_reference, models=[]), runtime.safety)
    assert not GenerationSource().ready(empty)
    assert GenerationSource().pop(client, empty, capacity=1) == []
    unchecked = make_runtime(runtime.models)  # models but no safety pass: nothing is popped
    assert not GenerationSource().ready(unchecked)
    assert GenerationSource().pop(client, unchecked, capacity=1) == []


def test_without_r2_the_image_is_submitted_as_base64(runtime: Runtime, pipelines: RecordingManager) -> None:
    # An unrecognised bridge name gets no capabilities from the horde: no r2 upload URLs.
    with (
        LocalHorde(known_models=pipelines.ready_models()) as plain_horde,
        HordeClient(plain_horde.base_url, DEFAULT_API_KEY, client_agent="tests:0:none") as plain_client,
    ):
        rid = plain_horde.request_generation(SMALL, models=[SD1], r2=False)
        job = pop_one(plain_client, runtime)
        assert job.pop.upload_url_for(job.ids[0]) is None
        [submission] = finish(plain_horde, plain_client, runtime, job)
        [submit] = plain_horde.submits(submission.job_id)
        assert submit["generation"] != "R2"
        status = plain_horde.wait_done([rid])[rid]
        stored = base64.b64decode(status["generations"][0]["img"])
        assert Image.open(io.BytesIO(stored)).size == (64, 64)


# ---- the safety pass on real jobs through the local horde -----------------------------------------------


def test_csam_job_submits_the_placeholder_with_its_censorship_entry(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, safety
) -> None:
    place_concepts(safety, PHOTO_CSAM)
    rid = horde.request_generation({**SMALL, "n": 2, "seed": "3"}, models=[SD1])
    job = pop_one(client, runtime)
    submissions = finish(horde, client, runtime, job)
    status = horde.wait_done([rid])[rid]
    stored = {g["id"]: g for g in status["generations"]}
    for submission in submissions:
        [submit] = horde.submits(submission.job_id)
        assert submit["state"] == "csam" and submit["generation"] == "R2"
        assert submit["gen_metadata"][0] == {"type": "censorship", "value": "csam"}
        assert not any(m["type"] == "aesthetic_score" for m in submit["gen_metadata"])
        uploaded = Image.open(io.BytesIO(horde.download(stored[submission.job_id]["img"])))
        assert uploaded.size == (64, 64)
        assert np.asarray(uploaded.convert("RGB"))[0, 0].tolist() == pytest.approx([24, 24, 24], abs=3)
        assert stored[submission.job_id]["censored"] is True
    # The horde records the requester as a problem user for each, as the real server does.
    assert set(job.ids) <= set(horde.accounting().problem_jobs)


def test_generated_image_is_never_the_placeholder(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, safety
) -> None:
    horde.request_generation({**SMALL, "seed": "8"}, models=[SD1])
    [kept] = finish(horde, client, runtime, pop_one(client, runtime))
    place_concepts(safety, PHOTO_CSAM)
    horde.request_generation({**SMALL, "seed": "8"}, models=[SD1])
    [replaced] = finish(horde, client, runtime, pop_one(client, runtime))
    assert kept.state == "ok" and replaced.state == "csam" and kept.image != replaced.image


@pytest.mark.parametrize(("nsfw_worker", "state", "entry"), [
    (False, "censored", {"type": "censorship", "value": "nsfw"}),
    (True, "ok", {"type": "information", "value": "nsfw"}),
])  # fmt: skip
def test_nsfw_job_censored_on_an_sfw_worker_labelled_on_an_nsfw_one(
    horde: LocalHorde, client: HordeClient, pipelines: RecordingManager, safety, nsfw_worker: bool,
    state: str, entry: dict,
) -> None:  # fmt: skip
    place_concepts(safety, ADULT_NUDE)
    runtime = make_runtime(pipelines, safety, api_key=DEFAULT_API_KEY, dreamer_name="gen-nsfw-worker",
                           nsfw=nsfw_worker)  # fmt: skip
    rid = horde.request_generation(SMALL, models=[SD1], nsfw=nsfw_worker)
    [submission] = finish(horde, client, runtime, pop_one(client, runtime))
    [submit] = horde.submits(submission.job_id)
    assert submit["state"] == state and entry in submit["gen_metadata"]
    assert submission.job_id not in horde.accounting().problem_jobs
    [gen] = horde.wait_done([rid])[rid]["generations"]
    assert gen["censored"] is (state == "censored")


def test_every_delivered_image_carries_its_aesthetic_score(
    horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    horde.request_generation(SMALL, models=[SD1])
    [submission] = finish(horde, client, runtime, pop_one(client, runtime))
    [submit] = horde.submits(submission.job_id)
    [score] = [m for m in submit["gen_metadata"] if m["type"] == "aesthetic_score"]
    assert score["value"] == "see_ref" and score["ref"] == f"{float(score['ref']):.4f}"


def test_a_failing_safety_pass_faults_the_job_and_uploads_nothing(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, safety, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CLIP fell over")

    monkeypatch.setattr(safety, "check", broken)
    horde.request_generation(SMALL, models=[SD1])
    job = pop_one(client, runtime)
    [submission] = finish(horde, client, runtime, job)
    assert submission.state == "faulted" and submission.image is None
    [submit] = horde.submits(submission.job_id)
    assert submit["state"] == "faulted" and "safety pass failed" in submit["gen_metadata"][-1]["ref"]
    assert not [key for key in horde.registry.store.keys() if job.ids[0] in key]  # noqa: SIM118 - nothing uploaded


def test_the_safety_pass_runs_after_the_run_slot_is_released(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, safety, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    class Slot:
        def __enter__(self):
            events.append("slot taken")

        def __exit__(self, *exc):
            events.append("slot released")

    real_check = safety.check

    def check(*args, **kwargs):
        events.append("safety pass")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(safety, "check", check)
    horde.request_generation(SMALL, models=[SD1])
    job = pop_one(client, runtime)
    job.prepare(runtime)
    [submission] = job.execute_in_slot(runtime, Slot())
    assert events == ["slot taken", "slot released", "safety pass"]
    assert submission.state == "ok" and job.timings.safety > 0
    job.send(client, submission)
