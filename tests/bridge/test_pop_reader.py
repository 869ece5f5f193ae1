"""Pop replies read as hostile input: ids from the raw JSON, then every field on its own."""

from __future__ import annotations

import pytest

from bridge.pop_reader import raw_ids, read_form, read_generation_pop, read_interrogation_pop


def test_ids_come_from_the_raw_reply_whatever_else_is_wrong() -> None:
    reply = read_generation_pop({"ids": ["a", 7, None, True, "a"], "payload": [1, 2], "ttl": "soon",
                                 "messages": "x", "skipped": [], "model": "m"})
    assert reply.job_ids == ["a", "7"] and reply.model == "m"
    assert set(reply.unreadable) == {"payload", "ttl"}  # messages/skipped are about the worker: ignored
    assert raw_ids({"id": "only"}) == ["only"] and raw_ids({"ids": "x", "id": None}) == ["x"]


def test_a_bad_payload_field_is_named_and_the_rest_read() -> None:
    reply = read_generation_pop({"ids": ["a"], "payload": {"ddim_steps": "many", "post_processing": "GFPGAN",
                                                           "karras": 1, "cfg_scale": 6.0, "prompt": 5}})
    assert set(reply.unreadable) == {"payload.ddim_steps", "payload.post_processing", "payload.karras"}
    assert reply.payload.cfg_scale == 6.0 and reply.payload.prompt == "5"  # numbers read as text: ids
    assert read_generation_pop({"ids": ["a"], "payload": {"seed": "123"}}).unreadable == {}


def test_forms_each_keep_their_id() -> None:
    reply = read_interrogation_pop({"forms": [
        {"id": "f1", "form": "caption", "payload": ["list"]}, {"id": 2, "form": 9}, {"form": "nsfw"},
        "junk", {"id": "f1", "form": "nsfw"}, {"id": "f3", "form": "nsfw", "source_image": {"u": 1}},
    ]})  # fmt: skip
    assert [(f.id, sorted(f.unreadable)) for f in reply.forms] == [
        ("f1", ["payload"]), ("2", ["form"]), ("f3", ["source_image"])]
    assert read_interrogation_pop({"forms": None, "skipped": "x"}).is_idle
    assert read_form({"id": None}) is None


@pytest.mark.parametrize("body", [[], "text", 5, None])
def test_a_reply_that_is_not_an_object_has_no_ids_to_lose(body) -> None:
    with pytest.raises(TypeError):
        read_generation_pop(body)
