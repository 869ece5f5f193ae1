"""Pop replies read as hostile input: the ids first, then every other field on its own.

Once the horde has answered a pop, the ids in the reply are ours: one we drop makes its requester wait out the
whole ttl. So the ids are taken from the raw JSON before any validation, and a field that does not validate
(`ddim_steps: "many"`, `post_processing: "GFPGAN"`, an alchemy `payload` that is a list) is taken out and
named instead of failing the whole reply. The job then ends in a faulted submit that names the field
(`gen_metadata` parse_failed for generations; the log for alchemy, whose submit has no metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bridge.api_models import AlchemyForm, GenerationPopResponse, InterrogationPopResponse
from bridge.safe_text import server_text

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# About the worker, not the job: an unreadable one is dropped (and logged) without faulting the job.
INFORMATIONAL_FIELDS = ("messages", "skipped")
# Fields read raw, before validation: never reported as unreadable.
ID_FIELDS = ("id", "ids")
MAX_PASSES = 8  # each pass takes out at least one field; nested models settle in two or three
UNREADABLE_FORM = "(unreadable)"


def as_id(value: Any) -> str | None:
    """A job id as the horde sent it (a number is kept as its text: submitting that back is still the one
    submit the id is owed)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def raw_ids(body: Mapping[str, Any]) -> list[str]:
    """Every id of a generation pop reply, straight from the JSON (`ids`, else the older `id`), once each."""
    ids = body.get("ids")
    found = [i for i in map(as_id, ids if isinstance(ids, list) else [ids]) if i]
    if not found:
        found = [i for i in [as_id(body.get("id"))] if i]
    return list(dict.fromkeys(found))


def _field_name(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The field to take out for a validation error: the top-level key, or payload.<key> in the payload."""
    head = [str(loc[0])] if loc else []
    if head == ["payload"] and len(loc) > 1 and isinstance(loc[1], str):
        head.append(loc[1])
    return tuple(head)


def _take_out(data: dict[str, Any], path: tuple[str, ...]) -> None:
    holder: Any = data
    for key in path[:-1]:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if isinstance(holder, dict):
        holder.pop(path[-1], None)


def validate_fieldwise(model: type[M], data: dict[str, Any]) -> tuple[M, dict[str, str]]:
    """`model` from `data`, leaving out each field that fails; (the model, {field: why})."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    unreadable: dict[str, str] = {}
    for _ in range(MAX_PASSES):
        try:
            return model.model_validate(data), unreadable
        except ValidationError as exc:
            paths = {_field_name(tuple(e["loc"])): e["msg"] for e in exc.errors()}
            for path, why in paths.items():
                if not path:
                    return model(), {"reply": server_text(why, limit=120)}
                _take_out(data, path)
                unreadable.setdefault(".".join(path), server_text(why, limit=120))
    return model(), {**unreadable, "reply": "too many unreadable fields"}


def read_generation_pop(body: Any) -> GenerationPopResponse:
    """A generate/pop reply; its `unreadable` names each field that could not be read."""
    if not isinstance(body, dict):
        raise TypeError(f"expected a JSON object, got {type(body).__name__}")
    ids = raw_ids(body)
    reply, unreadable = validate_fieldwise(GenerationPopResponse, body)
    reply.ids, reply.id = ids, ids[0] if ids else None
    for field, why in unreadable.items():
        top = field.split(".", 1)[0]
        if top in ID_FIELDS:
            continue
        if top in INFORMATIONAL_FIELDS:
            logger.debug("pop reply: unreadable %s ignored (%s)", field, why)
            continue
        reply.note_unreadable(field, why)
    return reply


def read_form(raw: Any) -> AlchemyForm | None:
    """One popped alchemy form, or None when it has no id at all (nothing to submit, nothing lost)."""
    if not isinstance(raw, dict):
        return None
    form_id = as_id(raw.get("id"))
    if form_id is None:
        return None
    data = {**raw, "id": form_id}
    problems: dict[str, str] = {}
    if not isinstance(data.get("form"), str) or not data["form"]:
        problems["form"] = "the form name is not a string"
        data["form"] = UNREADABLE_FORM
    form, unreadable = validate_fieldwise(AlchemyForm, data)
    if unreadable.get("reply"):
        form = AlchemyForm(id=form_id, form=str(data["form"]))
    for field, why in {**problems, **unreadable}.items():
        form.note_unreadable(field, why)
    return form


def read_interrogation_pop(body: Any) -> InterrogationPopResponse:
    """An interrogate/pop reply: every form with an id, each with its own unreadable fields."""
    if not isinstance(body, dict):
        raise TypeError(f"expected a JSON object, got {type(body).__name__}")
    raw_forms = body.get("forms")
    if isinstance(raw_forms, dict):
        raw_forms = [raw_forms]
    elif not isinstance(raw_forms, list):
        raw_forms = []
    forms: dict[str, AlchemyForm] = {}
    for raw in raw_forms:
        form = read_form(raw)
        if form is None:
            logger.warning("interrogate/pop: a form without an id was ignored (nothing to submit it as)")
        elif form.id in forms:
            logger.warning("interrogate/pop: form id %s handed out twice in one reply; served once",
                           server_text(form.id, limit=40))
        else:
            forms[form.id] = form
    skipped = body.get("skipped")
    reply = InterrogationPopResponse(skipped=skipped if isinstance(skipped, dict) else {})
    reply.forms = list(forms.values())
    return reply
