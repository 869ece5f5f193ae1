"""Whole generation jobs with LoRAs and TIs through the local horde over real HTTP: popped with allow_lora,
resolved and downloaded from the CivitAI stand-in, applied on the tiny SD1 model, submitted with gen_metadata.
A LoRA changes the image and the next job without it is byte-identical to a job that never had one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BRIDGE_NAME
from bridge.horde_api import HordeClient
from bridge.jobs.generation import GenerationJob, GenerationSource
from bridge.runtime import Runtime
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.interrupt import Interrupt, Interrupted
from tests.bridge.generation.conftest import make_manager, make_runtime
from tests.bridge.lora.conftest import TINY_MODELS, make_support
from tests.models.test_interrupt import ticking

SD1 = "tiny-sd1-diffusers"
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler", "seed": "7"}


@pytest.fixture(scope="module")
def manager(tiny_reference: Path) -> Any:
    return make_manager(tiny_reference, models=[SD1])


@pytest.fixture()
def lora_horde(tiny_extras) -> Iterator[LocalHorde]:
    from bridge.lora.tiny import add_to_standin

    grant = {BRIDGE_NAME: "AI Horde Worker reGen"}  # our name gets reGen's capabilities (lora, ti) here
    with LocalHorde(known_models=dict(TINY_MODELS), extra_bridges=grant) as local:
        add_to_standin(local.civitai, list(tiny_extras.values()))
        yield local


@pytest.fixture()
def client(lora_horde: LocalHorde) -> Iterator[HordeClient]:
    with HordeClient(lora_horde.base_url, DEFAULT_API_KEY, client_agent="tests:0:none") as c:
        yield c


@pytest.fixture()
def runtime(manager: Any, lora_horde: LocalHorde, tmp_path: Path, passing_safety: Any) -> Iterator[Runtime]:
    runtime = make_runtime(manager, passing_safety, api_key=DEFAULT_API_KEY, dreamer_name="lora-worker",
                           allow_lora=True)
    runtime.loras = make_support(lora_horde, tmp_path)
    support = runtime.loras
    yield runtime
    with manager.pipeline(SD1) as pipe, support.applied(SD1, pipe, None):
        pass  # leave the shared model as found


def serve(
    horde: LocalHorde, client: HordeClient, runtime: Runtime, **request: Any
) -> tuple[GenerationJob, Any]:
    """Request, pop, prepare, execute, send one job; (the job, its submission as the horde received it)."""
    params = {**SMALL, **request.pop("params", {})}
    rid = horde.request_generation(
        params, models=[SD1], prompt=request.pop("prompt", "a lighthouse"), **request
    )
    jobs = GenerationSource().pop(client, runtime, capacity=1)
    assert len(jobs) == 1, "the job was not handed to this worker"
    job = jobs[0]
    job.prepare(runtime)
    [submission] = job.execute(runtime)
    job.send(client, submission)
    assert horde.wait_done([rid])[rid]["done"]
    [received] = horde.submits(submission.job_id)
    assert received["state"] == "ok" and received["gen_metadata"] == submission.gen_metadata
    return job, submission


def lora_meta(submission: Any) -> list[dict[str, str]]:
    return [m for m in submission.gen_metadata if m["type"] in ("lora", "ti")]


def infos(submission: Any) -> list[str]:
    return [m["ref"] for m in submission.gen_metadata if m["type"] == "information"]


def test_without_lora_support_lora_jobs_are_not_popped(
    lora_horde: LocalHorde, client: HordeClient, runtime
) -> None:
    runtime.loras = None
    lora_horde.request_generation({**SMALL, "loras": [{"name": "Tiny Glow"}]}, models=[SD1])
    assert GenerationSource().pop(client, runtime, capacity=1) == []
    [worker] = [w for w in lora_horde.registry.workers.values() if w.name == "lora-worker"]
    assert worker.settings["allow_lora"] is False


def test_a_lora_changes_the_image_and_leaves_nothing_behind(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    _, plain = serve(lora_horde, client, runtime)
    job, with_lora = serve(
        lora_horde, client, runtime, params={"loras": [{"name": "Tiny Glow", "model": 1.0}]}
    )
    _, after = serve(lora_horde, client, runtime)
    assert with_lora.image != plain.image
    assert after.image == plain.image  # byte-identical to the job that never had a LoRA
    assert lora_meta(with_lora) == []
    assert any(r.startswith("lora Tiny Glow: applied at model 1, clip 1 (") for r in infos(with_lora))
    assert job.extras is not None and job.extras.patch is not None and job.extras.patch.changed > 0
    assert runtime.loras.store.entries()[0].name == "Tiny Glow"


def test_strengths_and_versions(lora_horde: LocalHorde, client: HordeClient, runtime: Runtime) -> None:
    by_version = {"name": "2002", "is_version": True, "model": -1.5, "clip": 0.5}
    _, negative = serve(lora_horde, client, runtime, params={"loras": [by_version]})
    _, positive = serve(lora_horde, client, runtime, params={"loras": [{**by_version, "model": 1.5}]})
    assert negative.image != positive.image
    assert any(r.startswith("lora Tiny Ink: applied at model -1.5, clip 0.5") for r in infos(negative))


def test_a_ti_in_the_prompt_and_in_the_negative_prompt(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    _, plain = serve(lora_horde, client, runtime, prompt="a lighthouse###blurry")
    tis = [{"name": "tinyneg", "inject_ti": "negprompt", "strength": 1.0}]
    job, negative = serve(lora_horde, client, runtime, prompt="a lighthouse###blurry", params={"tis": tis})
    assert job.extras.prompt == "a lighthouse###blurry,(embedding:tinyneg:1)"
    tis = [{"name": "tinyneg", "inject_ti": "prompt", "strength": 0.5}]
    job, positive = serve(lora_horde, client, runtime, prompt="a lighthouse###blurry", params={"tis": tis})
    assert job.extras.prompt == "(embedding:tinyneg:0.5),a lighthouse###blurry"
    assert len({plain.image, negative.image, positive.image}) == 3
    assert "ti tinyneg: 2 vector(s) in the negative prompt at strength 1" in infos(negative)
    _, again = serve(lora_horde, client, runtime, prompt="a lighthouse###blurry")
    assert again.image == plain.image


def test_what_cannot_be_applied_is_dropped_and_reported(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    _, plain = serve(lora_horde, client, runtime)
    lora_horde.civitai.set_download_fault(2002, "451")
    loras = [{"name": "Tiny XL Detail"}, {"name": "no such lora at all"}, {"name": "Tiny Ink"}]
    tis = [{"name": "tinyxlneg", "inject_ti": "prompt"}]
    _, dropped = serve(lora_horde, client, runtime, params={"loras": loras, "tis": tis})
    assert dropped.image == plain.image  # ran, without any of them
    assert lora_meta(dropped) == [
        {"type": "lora", "value": "baseline_mismatch", "ref": "Tiny XL Detail"},
        {"type": "lora", "value": "download_failed", "ref": "no such lora at all"},
        {"type": "lora", "value": "download_failed", "ref": "Tiny Ink"},
        {"type": "ti", "value": "baseline_mismatch", "ref": "tinyxlneg"},
    ]


def test_an_nsfw_lora_on_an_sfw_worker_is_refused(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    runtime.loras.nsfw = False
    _, submission = serve(lora_horde, client, runtime, params={"loras": [{"name": "Tiny Spicy"}]})
    assert lora_meta(submission) == [{"type": "lora", "value": "download_failed", "ref": "Tiny Spicy"}]
    assert lora_horde.civitai.calls("/api/download/") == 0


@pytest.mark.parametrize(
    "inject, prefix",
    [("all", "glowing, neon light, glowstick, "), ("neon", "neon light, "), ("glowstik", "glowstick, ")],
)
def test_trigger_injection(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime, inject, prefix
) -> None:
    lora = {"name": "1001", "inject_trigger": inject}
    job, submission = serve(lora_horde, client, runtime, params={"loras": [lora]})
    assert job.extras.prompt == prefix + "a lighthouse"
    assert any(f"trigger {prefix[:-2]!r} added" in r for r in infos(submission))


def test_a_lora_and_ti_job_stopped_past_its_deadline_leaves_nothing_behind(
    lora_horde: LocalHorde, client: HordeClient, runtime: Runtime
) -> None:
    _, plain = serve(lora_horde, client, runtime)
    extras = {"loras": [{"name": "Tiny Glow", "model": 1.0}],
              "tis": [{"name": "tinyneg", "inject_ti": "negprompt"}]}
    lora_horde.request_generation({**SMALL, **extras}, models=[SD1], prompt="a lighthouse")
    [job] = GenerationSource().pop(client, runtime, capacity=1)
    job.prepare(runtime)
    # Its deadline passes after the first denoising step (check points: the image, then each step).
    job.interrupt = lambda: Interrupt(deadline=1, clock=ticking())
    with pytest.raises(Interrupted, match="after step 1: stopped unfinished"):
        job.execute(runtime)
    assert job.extras is not None and job.extras.patch is not None and job.extras.patch.changed > 0
    assert runtime.loras.patcher.model(SD1).applied  # it was stopped with its LoRA merged into the model
    _, after = serve(lora_horde, client, runtime)
    assert after.image == plain.image  # byte-identical to the job before it
    assert runtime.loras.patcher.model(SD1).applied == ()
    [faulted] = job.fault("stopped")  # handed back last: faulted, the horde would hand it out again at once
    assert job.send(client, faulted) == 0
