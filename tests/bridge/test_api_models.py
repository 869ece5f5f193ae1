"""The api models parse the contract's wire bodies tolerantly and build requests the server accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge.api_models import (
    GenerationPayload,
    GenerationPopRequest,
    GenerationPopResponse,
    GenerationSubmit,
    GenMetadata,
    InterrogationPopRequest,
    InterrogationPopResponse,
    InterrogationSubmit,
    MetadataType,
    MetadataValue,
)

ID1 = "7f0e8d43-1c2b-4a8e-9d6f-0a1b2c3d4e5f"
ID2 = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"

# Section 2 of the contract, "Response 200 with a job (wire)".
JOB_REPLY = {
    "payload": {
        "prompt": "a cat###ugly, blurry",
        "ddim_steps": 30,
        "n_iter": 2,
        "use_nsfw_censor": True,
        "seed": "3847569123",
        "image_is_control": False,
        "return_control_map": False,
        "sampler_name": "k_euler_a",
        "cfg_scale": 5.0,
        "height": 768,
        "width": 512,
        "post_processing": ["GFPGAN"],
        "karras": True,
        "tiling": False,
        "hires_fix": False,
        "clip_skip": 1,
        "loras": [{"name": "247778", "model": 1.0, "clip": 1.0, "is_version": True}],
        "tis": [{"name": "7808", "inject_ti": "negprompt", "strength": 1.0}],
        "transparent": False,
    },
    "id": ID1,
    "ids": [ID1, ID2],
    "messages": [
        {"id": "m1", "message": "hi", "origin": "moderator", "expiry": "Fri, 02 Jan 2026 03:04:05 -0000"}
    ],
    "ttl": 150,
    "skipped": {},
    "model": "Deliberate",
    "source_image": "https://r2.example/get",
    "source_processing": "img2img",
    "source_mask": None,
    "extra_source_images": None,
    "r2_upload": "https://r2.example/put1",
    "r2_uploads": ["https://r2.example/put1", "https://r2.example/put2"],
    "a_key_from_a_newer_server": {"whatever": 1},
}

# "Response 200 with no job (wire)": a default payload, but no ids.
IDLE_REPLY = {
    "payload": {
        "ddim_steps": 30,
        "n_iter": 1,
        "image_is_control": False,
        "return_control_map": False,
        "sampler_name": "k_euler_a",
        "cfg_scale": 7.5,
        "height": 512,
        "width": 512,
        "karras": False,
        "tiling": False,
        "hires_fix": False,
        "transparent": False,
    },
    "id": None,
    "ids": [],
    "messages": [],
    "ttl": None,
    "skipped": {"max_pixels": 1, "post-processing": 2, "models": 3},
    "model": None,
    "source_image": None,
    "source_processing": "img2img",
    "source_mask": None,
    "extra_source_images": None,
    "r2_upload": None,
    "r2_uploads": None,
}


def test_job_reply_parses_with_string_seed_and_pairs_uploads() -> None:
    reply = GenerationPopResponse.model_validate(JOB_REPLY)
    assert not reply.is_idle
    assert reply.job_ids == [ID1, ID2]
    assert reply.payload.seed == 3847569123 and isinstance(reply.payload.seed, int)
    assert reply.payload.n_iter == 2 and reply.payload.height == 768
    assert reply.payload.loras[0].name == "247778" and reply.payload.loras[0].is_version
    assert reply.payload.tis[0].inject_ti == "negprompt"
    assert reply.payload.positive_prompt == "a cat"
    assert reply.payload.negative_prompt == "ugly, blurry"
    assert reply.upload_url_for(ID1) == "https://r2.example/put1"
    assert reply.upload_url_for(ID2) == "https://r2.example/put2"
    assert reply.upload_url_for("someone-else") is None
    assert reply.extra_source_images == []
    assert reply.messages[0].origin == "moderator"
    assert reply.ttl == 150


def test_idle_reply_is_idle_despite_its_default_payload() -> None:
    reply = GenerationPopResponse.model_validate(IDLE_REPLY)
    assert reply.is_idle
    assert reply.job_ids == []
    assert reply.payload.ddim_steps == 30  # the payload is there; only the ids say "no job"
    assert reply.skipped["post-processing"] == 2
    assert reply.r2_uploads == []


def test_single_id_servers_and_missing_r2_uploads() -> None:
    reply = GenerationPopResponse.model_validate({"id": ID1, "r2_upload": "https://r2/put", "payload": None})
    assert not reply.is_idle and reply.job_ids == [ID1]
    assert reply.upload_url_for(ID1) == "https://r2/put"
    assert reply.payload.sampler_name == "k_euler_a"  # null payload -> defaults


@pytest.mark.parametrize(
    ("wire", "seed"),
    [("817215149", 817215149), (" 42 ", 42), (7, 7), (None, None), ("", None), (2**32 + 5, 5)],
)
def test_seed_str_to_int(wire, seed) -> None:
    assert GenerationPayload.model_validate({"seed": wire}).seed == seed


def test_non_numeric_seed_still_gives_a_stable_int() -> None:
    first = GenerationPayload.model_validate({"seed": "cat"}).seed
    assert isinstance(first, int) and 0 <= first < 2**32
    assert GenerationPayload.model_validate({"seed": "cat"}).seed == first


def test_null_for_any_optional_key_means_default() -> None:
    payload = GenerationPayload.model_validate(
        {
            "karras": None,
            "loras": None,
            "post_processing": None,
            "special": None,
            "clip_skip": None,
            "extra": 1,
        }
    )
    assert (payload.karras, payload.loras, payload.post_processing, payload.special, payload.clip_skip) == (
        False,
        [],
        [],
        {},
        1,
    )


def test_pop_request_defaults_are_the_servers_effective_ones() -> None:
    body = GenerationPopRequest(name="w").model_dump(mode="json")
    assert body["nsfw"] is True and body["extra_slow_worker"] is False
    assert body["max_pixels"] == 262144 and body["threads"] == 1 and body["amount"] == 1
    assert body["allow_img2img"] and body["allow_painting"] and body["allow_post_processing"]
    assert not body["allow_controlnet"] and not body["allow_lora"] and not body["limit_max_steps"]
    assert body["bridge_agent"] == "unknown:0:unknown"
    assert "allow_unsafe_ipaddr" in body  # the legacy misspelling allow_unsafe_ip is ignored by the server


@pytest.mark.parametrize(
    "bad",
    [{"threads": 51}, {"amount": 21}, {"models": ["ab"]}, {"priority_usernames": ["db0"]}, {"unknown": 1}],
)
def test_pop_request_rejects_what_the_server_would(bad) -> None:
    with pytest.raises(ValidationError):
        GenerationPopRequest(name="w", **bad)


def test_submit_body_has_int_seed_and_valid_metadata() -> None:
    submit = GenerationSubmit(
        id=ID1,
        generation="R2",
        seed=123,
        gen_metadata=[{"type": "batch_index", "value": "see_ref", "ref": "1"}],
    )
    body = submit.body()
    assert body == {
        "id": ID1,
        "generation": "R2",
        "state": "ok",
        "seed": 123,
        "gen_metadata": [{"type": "batch_index", "value": "see_ref", "ref": "1"}],
    }
    with pytest.raises(ValidationError):
        GenerationSubmit(id=ID1, generation="R2", seed=1, state="weird")
    with pytest.raises(ValidationError):
        GenMetadata(type="information", value="not-a-value")


def test_metadata_ref_and_count_are_capped_not_fatal() -> None:
    entry = GenMetadata(type=MetadataType.INFORMATION, value=MetadataValue.SEE_REF, ref="e" * 1000)
    assert len(entry.ref) == 255
    many = [{"type": "lora", "value": "download_failed", "ref": str(i)} for i in range(60)]
    submit = GenerationSubmit(id=ID1, generation="faulted", state="faulted", seed=-1, gen_metadata=many)
    assert len(submit.gen_metadata) == 50
    assert submit.body()["gen_metadata"][-1]["ref"] == "49"


def test_interrogation_pop_and_idle() -> None:
    reply = InterrogationPopResponse.model_validate(
        {
            "forms": [
                {"id": ID1, "form": "caption", "source_image": "https://r2/get"},
                {
                    "id": ID2,
                    "form": "RealESRGAN_x4plus",
                    "payload": {"facefixer_strength": 0.5},
                    "source_image": "https://r2/get2",
                    "r2_upload": "https://r2/put",
                },
            ],
            "skipped": {},
        }
    )
    assert not reply.is_idle
    assert [f.form for f in reply.forms] == ["caption", "RealESRGAN_x4plus"]
    assert reply.forms[0].payload == {} and reply.forms[0].r2_upload is None
    assert reply.forms[1].payload["facefixer_strength"] == 0.5
    idle = InterrogationPopResponse.model_validate({"forms": None, "skipped": {"untrusted": 1}})
    assert idle.is_idle and idle.forms == []


def test_interrogation_request_and_submit_bodies() -> None:
    request = InterrogationPopRequest(name="alch", forms=["caption", "nsfw", "caption"])
    body = request.model_dump(mode="json")
    assert body["forms"] == ["caption", "nsfw"]  # uniqueItems on the server
    assert body["max_tiles"] == 80 and body["amount"] == 1 and body["threads"] == 1
    with pytest.raises(ValidationError):
        InterrogationPopRequest(name="alch", max_tiles=257)
    submit = InterrogationSubmit(id=ID1, result={"caption": "a cat"})
    assert submit.body() == {"id": ID1, "result": {"caption": "a cat"}, "state": "ok"}
    with pytest.raises(ValidationError):
        InterrogationSubmit(id=ID1, result="a cat")  # the server demands an object
