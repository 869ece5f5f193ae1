"""Alchemy (interrogation): requester forms, /interrogate/pop, /interrogate/submit and the status view."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from local_horde import rules
from local_horde.schema import ALCHEMY_FORMS, POST_PROCESSORS, interrogate_pop_schema, validate
from local_horde.state import (
    ApiError,
    Registry,
    User,
    Worker,
    missing_apikey,
    new_id,
    validation_error,
)

MAX_ABORTS = 3  # a form aborted this many times is marked faulted
# Only these skipped keys survive the server's marshalling of an empty interrogation pop.
VISIBLE_SKIPS = ("worker_id", "untrusted", "bridge_version")


@dataclass
class Form:
    name: str
    payload: dict[str, Any] | None
    request: AlchemyRequest
    state: str = "waiting"  # waiting | processing | done | faulted
    aborts: int = 0
    result: dict[str, Any] | None = None
    result_job: str | None = None


@dataclass
class AlchemyRequest:
    id: str
    owner: User
    source_url: str
    source_size: tuple[int, int] | None
    forms: list[Form] = field(default_factory=list)


@dataclass
class FormJob:
    id: str
    form: Form
    worker: Worker
    started: float
    state: str = "processing"  # processing | done | faulted | aborted

    @property
    def upload_key(self) -> str:
        return f"alchemy/{self.id}.webp"


def image_size(data: bytes | None) -> tuple[int, int] | None:
    """Size from the image header only (never decodes: sources may be bombs or garbage)."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable source just has no known size
        return None


class AlchemyQueue:
    def __init__(self, registry: Registry, form_ttl: float) -> None:
        self.reg = registry
        self.form_ttl = form_ttl
        self.requests: dict[str, AlchemyRequest] = {}
        self.jobs: dict[str, FormJob] = {}
        self.set_forms(ALCHEMY_FORMS)

    def set_forms(self, forms: Sequence[str]) -> None:
        """The form names this server accepts (its swagger enums); a pop naming another one gets a 400."""
        self.forms: tuple[str, ...] = tuple(forms)
        self.pop_schema = interrogate_pop_schema(self.forms)

    # ---- requester side --------------------------------------------------------------------------------
    def add_request(
        self, owner: User, forms: list[dict[str, Any]], source_url: str, source: bytes | None
    ) -> AlchemyRequest:
        req = AlchemyRequest(new_id(), owner, source_url, image_size(source))
        req.forms = [Form(f["name"], f.get("payload"), req) for f in forms]
        self.requests[req.id] = req
        return req

    def status(self, request_id: str) -> dict[str, Any]:
        req = self.requests.get(request_id)
        if req is None:
            raise ApiError(404, f"Interrogation with ID '{request_id}' not found.", "RequestNotFound")
        self.reap()
        states = [f.state for f in req.forms]
        if all(s == "done" for s in states):
            overall = "done"
        elif all(s in ("done", "faulted") for s in states):
            overall = "faulted" if "done" not in states else "partial"
        elif "processing" in states or "done" in states:
            overall = "processing"
        else:
            overall = "waiting"
        return {"state": overall, "forms": [self._form_view(f) for f in req.forms]}

    def _form_view(self, form: Form) -> dict[str, Any]:
        view: dict[str, Any] = {"form": form.name, "state": form.state}
        if form.result is not None:
            # "R2" means the worker PUT the image; the requester gets a download URL instead.
            view["result"] = {
                k: (self.reg.store.presign("GET", f"alchemy/{form.result_job}.webp") if v == "R2" else v)
                for k, v in form.result.items()
            }
        return view

    # ---- worker side -----------------------------------------------------------------------------------
    def pop(self, body: Any, api_key: str | None) -> dict[str, Any]:
        errors = validate(body, self.pop_schema)
        if errors:
            raise validation_error(errors)
        user = self.reg.worker_user(api_key)
        rules.check_priority_usernames(body.get("priority_usernames") or [])
        settings = {
            "forms": body.get("forms") or ["caption"],
            "amount": body.get("amount", 1),
            "bridge_agent": body.get("bridge_agent", "unknown:0:unknown"),
            "threads": body.get("threads", 1),
            "max_tiles": body.get("max_tiles", 80),
        }
        worker = self.reg.check_in(user, body["name"], "interrogation", settings)
        worker.forms = list(settings["forms"])
        self.reap()
        skipped: Counter[str] = Counter()
        popped: list[dict[str, Any]] = []
        for form in self._waiting_forms(worker):
            reason = self._skip_reason(worker, form)
            if reason:
                skipped[reason] += 1
                continue
            popped.append(self._start(form, worker))
            if len(popped) >= settings["amount"]:
                break
        if popped:
            return {"forms": popped, "skipped": {}}
        if worker.maintenance:
            raise rules.maintenance_error(worker)
        return {"forms": None, "skipped": {k: v for k, v in skipped.items() if k in VISIBLE_SKIPS}}

    def _waiting_forms(self, worker: Worker) -> list[Form]:
        return [
            f
            for req in self.requests.values()
            for f in req.forms
            if f.state == "waiting" and not (worker.maintenance and req.owner is not worker.owner)
        ]

    @staticmethod
    def _skip_reason(worker: Worker, form: Form) -> str | None:
        # Alchemy forms are not gated by bridge name or version (the server's can_interrogate checks only
        # trust, upfront kudos and the form list); only inline post-processing in a generation is.
        if form.name not in worker.forms:
            return "forms"
        if (
            form.name in rules.UPSCALERS
            and rules.tiles(form.request.source_size) > worker.settings["max_tiles"]
        ):
            return "max_tiles"
        return None

    def _start(self, form: Form, worker: Worker) -> dict[str, Any]:
        job = FormJob(new_id(), form, worker, time.monotonic())
        self.jobs[job.id] = job
        form.state = "processing"
        self.reg.accounting.handed_out.append(job.id)
        reply: dict[str, Any] = {"id": job.id, "form": form.name, "source_image": form.request.source_url}
        if form.payload is not None:
            reply["payload"] = form.payload
        if form.name in POST_PROCESSORS:
            reply["r2_upload"] = self.reg.store.presign("PUT", job.upload_key)
        return reply

    def submit(self, body: Any, api_key: str | None) -> dict[str, Any]:
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            self.reg.accounting.submits.setdefault(body["id"], []).append(body)
        self._check_submit_body(body)
        if api_key is None:
            raise missing_apikey()  # the parser layer runs before any lookup
        job = self._submittable(body["id"], api_key)
        form = job.form
        if body.get("state", "ok") == "faulted":
            self._abort(job, "faulted")
            return {"reward": 0}
        job.state = "done"
        form.state, form.result, form.result_job = "done", body["result"], job.id
        reward = rules.form_kudos(form.name, rules.tiles(form.request.source_size))
        job.worker.requests_fulfilled += 1
        job.worker.kudos_rewards += reward
        self.reg.accounting.rewards[job.id] = reward
        return {"reward": reward}

    @staticmethod
    def _check_submit_body(body: Any) -> None:
        # This endpoint has only the parser layer: required args and `result` parsed as a dict.
        if not isinstance(body, dict):
            raise ApiError(
                400, "The browser (or proxy) sent a request that this server could not understand."
            )
        errors: dict[str, str] = {}
        if not isinstance(body.get("id"), str):
            errors["id"] = "The UUID of this job. Missing required parameter in the JSON body"
        if "result" not in body:
            errors["result"] = "The result of the interrogation. Missing required parameter in the JSON body"
        elif not isinstance(body["result"], dict):
            errors["result"] = (
                "The result of the interrogation. "
                "dictionary update sequence element #0 has length 1; 2 is required"
            )
        if errors:
            raise validation_error(errors)

    def _submittable(self, job_id: str, api_key: str | None) -> FormJob:
        job = self.jobs.get(job_id)
        if job is None:
            self.reg.accounting.drops.append((job_id, "InvalidJobID"))
            raise ApiError(404, f"Processing Job with ID {job_id} does not exist.", "InvalidJobID")
        user = self.reg.submit_user(api_key)
        if job.worker.owner is not user:
            self.reg.accounting.drops.append((job_id, "WrongCredentials"))
            raise ApiError(403, "Wrong credentials to submit as this worker.", "WrongCredentials")
        self.reap()
        if job.state != "processing":
            self.reg.accounting.drops.append((job_id, "DuplicateGen"))
            raise ApiError(400, f"Processing Job with ID {job_id} already submitted.", "DuplicateGen")
        return job

    # ---- expiry ----------------------------------------------------------------------------------------
    def reap(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.state == "processing" and now > job.started + self.form_ttl:
                self._abort(job, "expired")

    def expire(self, job_id: str | None = None) -> list[str]:
        targets = [j for j in self.jobs.values() if j.state == "processing" and job_id in (None, j.id)]
        for job in targets:
            self._abort(job, "expired")
        return [j.id for j in targets]

    def _abort(self, job: FormJob, reason: str) -> None:
        job.state = "aborted" if reason == "expired" else "faulted"
        if reason == "expired":
            job.worker.record_abort(self.reg.auto_maintenance_aborts)
        self.reg.accounting.requeues.append((job.id, reason))
        form = job.form
        form.aborts += 1
        form.state = "faulted" if form.aborts >= MAX_ABORTS else "waiting"
