"""The safety step of a generation: each outcome of the real safety pass (tiny split CLIP, concepts placed
on purpose) turned into the image, state and gen_metadata the horde expects, and every failure refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridge.api_models import GenerationPayload
from bridge.generation.censor import (
    CENSORED_METADATA,
    CSAM_METADATA,
    NSFW_INFORMATION,
    SafetyFailed,
    censor_reason,
    check_images,
)
from bridge.generation.masks import prepare_sources
from bridge.generation.request import GenerationRequest, WorkerLimits, build_request
from bridge.generation.runner import GeneratedImage
from bridge.runtime import Runtime
from tests.bridge.generation.conftest import RecordingManager, make_runtime
from tests.interrogators.safety_helpers import (
    ADULT_NUDE,
    BORDERLINE_UNDERAGE,
    PHOTO_CSAM,
    add_deepdanbooru,
    place_concepts,
    tiny_safety,
)


def request_for(runtime: Runtime, **payload: Any) -> GenerationRequest:
    fields = {"prompt": "a portrait", "width": 64, "height": 64, "ddim_steps": 2, **payload}
    record = runtime.models.record("tiny-sd1-diffusers")
    _, kind, _ = prepare_sources(None, None, None)
    request, _ = build_request(GenerationPayload.model_validate(fields), record, kind, WorkerLimits(1 << 20))
    return request


def images(n: int = 2) -> list[GeneratedImage]:
    """Generated images as the runner leaves them: post-processed (x2) beside the originals."""
    out = []
    for index in range(n):
        original = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
        original.paste((200, 30 * index, 40), (8, 8, 30, 40))
        out.append(GeneratedImage(original.resize((128, 128)), 100 + index, index, original=original))
    return out


def checked(runtime: Runtime, n: int = 2, **payload: Any) -> list[GeneratedImage]:
    generated = images(n)
    check_images(runtime, request_for(runtime, **payload), generated)
    return generated


def aesthetic_entries(image: GeneratedImage) -> list[dict[str, str]]:
    return [m for m in image.metadata if m["type"] == "aesthetic_score"]


def test_safe_images_are_kept_with_their_aesthetic_score(pipelines: RecordingManager, safety) -> None:
    runtime = make_runtime(pipelines, safety)
    before = [np.asarray(g.image).copy() for g in images()]
    for generated, pixels in zip(checked(runtime), before, strict=True):
        assert generated.state == "ok" and np.array_equal(np.asarray(generated.image), pixels)
        [score] = aesthetic_entries(generated)
        assert score["value"] == "see_ref" and len(score["ref"].split(".")[1]) == 4
        float(score["ref"])
    assert safety.embedder.image_forwards == 2  # one CLIP forward per image: decision and score


def test_aesthetic_score_can_be_turned_off(pipelines: RecordingManager, safety) -> None:
    runtime = make_runtime(pipelines, safety, send_aesthetic_score=False)
    assert all(not aesthetic_entries(g) and g.state == "ok" for g in checked(runtime))


@pytest.mark.parametrize("nsfw_worker", [True, False])
def test_csam_is_replaced_whatever_the_worker_serves(
    pipelines: RecordingManager, safety, nsfw_worker: bool
) -> None:
    place_concepts(safety, PHOTO_CSAM)
    runtime = make_runtime(pipelines, safety, nsfw=nsfw_worker)
    for generated in checked(runtime):
        assert generated.state == "csam" and generated.metadata[0] == CSAM_METADATA
        assert CENSORED_METADATA not in generated.metadata and not aesthetic_entries(generated)
        assert generated.original is None  # nothing of the original is kept
        placeholder = np.asarray(generated.image)
        assert generated.image.size == (64, 64) and placeholder[0, 0].tolist() == [24, 24, 24]
    original = np.asarray(images(1)[0].original)
    assert not np.array_equal(placeholder, original)


@pytest.mark.parametrize(
    ("config", "payload", "reason"),
    [
        ({"nsfw": False}, {}, "SFW worker"),
        ({"nsfw": True}, {"use_nsfw_censor": True}, "requested by the client"),
        ({"nsfw": True, "censor_nsfw": True}, {}, "censor_nsfw"),
        ({"nsfw": True, "censorlist": ["Portrait"]}, {"prompt": "a portrait ### blurry"}, "censorlist"),
    ],
)
def test_nsfw_that_must_be_censored(pipelines, safety, config: dict, payload: dict, reason: str) -> None:
    place_concepts(safety, ADULT_NUDE)
    runtime = make_runtime(pipelines, safety, **config)
    request = request_for(runtime, **payload)
    why = censor_reason(use_nsfw_censor=request.use_nsfw_censor, prompt=request.prompt, config=runtime.config)
    assert why == reason
    for generated in checked(runtime, **payload):
        assert generated.state == "censored" and generated.metadata[0] == CENSORED_METADATA
        assert np.asarray(generated.image)[0, 0].tolist() == [64, 64, 64]  # the flat placeholder
        assert not aesthetic_entries(generated)


def test_nsfw_allowed_is_kept_and_labelled(pipelines: RecordingManager, safety) -> None:
    place_concepts(safety, ADULT_NUDE)
    runtime = make_runtime(pipelines, safety, nsfw=True, censorlist=["dog"])
    for generated in checked(runtime, prompt="a cat ### dog"):  # a censorlist word in the negative: no
        assert generated.state == "ok" and generated.metadata[0] == NSFW_INFORMATION
        assert generated.image.size == (128, 128) and aesthetic_entries(generated)


def test_negative_prompt_adult_words_turn_a_borderline_image_into_csam(pipelines, safety) -> None:
    place_concepts(safety, BORDERLINE_UNDERAGE)
    runtime = make_runtime(pipelines, safety, nsfw=True)
    assert checked(runtime, 1, prompt="a portrait###blurry")[0].state == "ok"
    assert checked(runtime, 1, prompt="a portrait###blurry, old woman, mature")[0].state == "csam"


def test_the_pass_reads_the_originals(pipelines: RecordingManager, safety, monkeypatch) -> None:
    seen: list[tuple[int, int]] = []
    real_check = safety.check

    def spy(pictures, *args, **kwargs):
        seen.extend(p.size for p in pictures)
        return real_check(pictures, *args, **kwargs)

    monkeypatch.setattr(safety, "check", spy)
    checked(make_runtime(pipelines, safety))
    assert seen == [(64, 64), (64, 64)]  # not the post-processed 128x128 images


def test_no_pass_or_a_failing_pass_refuses_to_let_images_through(
    pipelines: RecordingManager, safety_models: Path, safety_cache, tmp_path: Path
) -> None:
    with pytest.raises(SafetyFailed, match="no safety pass"):
        checked(make_runtime(pipelines, None))
    broken = add_deepdanbooru(safety_models, "tiny-deepdanbooru-broken", {"rating:safe": 1.0})
    (safety_models / "deepdanbooru" / broken / "model-resnet_custom_v3.pt").write_bytes(b"not a pickle")
    failing = tiny_safety(safety_models, safety_cache, tmp_path / "e", danbooru=broken)
    place_concepts(failing, {"anime": 0.3})  # the anime path needs the broken DeepDanbooru
    generated = images()
    with pytest.raises(SafetyFailed, match="safety pass failed"):
        check_images(make_runtime(pipelines, failing), request_for(make_runtime(pipelines)), generated)
    assert all(g.state == "ok" and g.original is not None for g in generated)  # untouched, never submitted


def test_sd_safety_checker_is_a_second_opinion_on_images_to_censor(
    pipelines: RecordingManager, safety, safety_checkers
) -> None:
    runtime = make_runtime(pipelines, safety, nsfw=False, sd_safety_checker=True)
    runtime.sd_safety_checker = safety_checkers["flags"]
    assert {g.state for g in checked(runtime)} == {"censored"}  # the pass found nothing; the checker did
    runtime.sd_safety_checker = safety_checkers["clean"]
    assert {g.state for g in checked(runtime)} == {"ok"}
    nsfw_worker = make_runtime(pipelines, safety, nsfw=True, sd_safety_checker=True)
    nsfw_worker.sd_safety_checker = safety_checkers["flags"]
    assert {g.state for g in checked(nsfw_worker)} == {"ok"}  # nothing there would be censored anyway
    runtime.sd_safety_checker = None
    with pytest.raises(SafetyFailed, match="sd_safety_checker"):
        checked(runtime)
