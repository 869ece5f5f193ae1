"""Image generation: requester queue, /generate/pop, /generate/submit and the requester's status view."""

from __future__ import annotations

import base64
import binascii
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from local_horde import rules
from local_horde.schema import GENERATE_POP, GENERATE_SUBMIT, validate
from local_horde.state import (
    ApiError,
    Registry,
    User,
    Worker,
    missing_apikey,
    new_id,
    validation_error,
)

MAX_RESTARTS = 3  # an image slot requeued this many times is given up (faulted)
MAX_GEN_METADATA = 50

POP_DEFAULTS: dict[str, Any] = {
    "priority_usernames": [],
    "nsfw": True,
    "blacklist": [],
    "models": [],
    "bridge_agent": "unknown:0:unknown",
    "threads": 1,
    "require_upfront_kudos": False,
    "amount": 1,
    "extra_slow_worker": False,
    "max_pixels": 262144,
    "allow_img2img": True,
    "allow_painting": True,
    "allow_unsafe_ipaddr": True,
    "allow_post_processing": True,
    "allow_controlnet": False,
    "allow_sdxl_controlnet": False,
    "allow_lora": False,
    "limit_max_steps": False,
}
IDLE_PAYLOAD: dict[str, Any] = {
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
}
# Payload keys that are omitted when the request did not set them.
OPTIONAL_PAYLOAD_KEYS = (
    "denoising_strength",
    "hires_fix_denoising_strength",
    "clip_skip",
    "facefixer_strength",
    "post_processing",
    "loras",
    "tis",
    "special",
    "workflow",
    "control_type",
    "extra_texts",
)


@dataclass
class Slot:
    """One image of a request, waiting to be handed out (again)."""

    index: int
    seed: int
    restarts: int = 0


@dataclass
class GenRequest:
    id: str
    owner: User
    prompt: str
    params: dict[str, Any]
    models: list[str]
    n: int
    nsfw: bool
    censor_nsfw: bool
    r2: bool
    workers: list[str]
    source_key: str | None = None
    source_processing: str = "img2img"
    mask_key: str | None = None
    extra_sources: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Slot] = field(default_factory=list)
    jobs: list[GenJob] = field(default_factory=list)
    restarts: int = 0
    faulted: bool = False
    created: float = field(default_factory=time.time)

    def param(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


@dataclass
class GenJob:
    id: str
    request: GenRequest
    worker: Worker
    model: str
    slot: Slot
    started: float
    ttl: float
    state: str = "processing"  # processing | ok | censored | faulted | aborted
    seed: int | None = None
    censored: bool = False
    gen_metadata: list[dict[str, str]] = field(default_factory=list)
    reward: float = 0.0

    @property
    def image_key(self) -> str:
        return f"generations/{self.id}.webp"


class GenerationQueue:
    def __init__(self, registry: Registry, known_models: Iterable[str], job_ttl: float | None) -> None:
        self.reg = registry
        # A mapping gives each model its baseline (ttl x3 and reward factors, flux capability).
        self.baselines: dict[str, str] = dict(known_models) if isinstance(known_models, Mapping) else {}
        self.known_models = list(known_models)
        self.job_ttl = job_ttl
        self.requests: dict[str, GenRequest] = {}
        self.jobs: dict[str, GenJob] = {}
        self.model_counts: Counter[str] = Counter()
        self._rng = random.Random()

    # ---- requester side --------------------------------------------------------------------------------
    def add_request(self, owner: User, body: dict[str, Any], sources: dict[str, str | None]) -> GenRequest:
        params = dict(body.get("params") or {})
        rules.fill_generation_defaults(params)
        n = params.pop("n", 1)
        req = GenRequest(
            id=new_id(),
            owner=owner,
            prompt=body["prompt"],
            params=params,
            models=list(body.get("models") or []),
            n=n,
            nsfw=body.get("nsfw", False),
            censor_nsfw=body.get("censor_nsfw", False),
            r2=body.get("r2", True),
            workers=list(body.get("workers") or []),
            source_key=sources.get("source"),
            source_processing=body.get("source_processing", "img2img"),
            mask_key=sources.get("mask"),
            extra_sources=[
                {"key": sources[f"extra{i}"], "strength": e.get("strength", 1.0)}
                for i, e in enumerate(body.get("extra_source_images") or [])
            ],
        )
        base_seed = rules.resolve_seed(params.pop("seed", None), self._rng)
        variation = params.pop("seed_variation", 1)
        req.pending = [
            Slot(
                i,
                (base_seed + i * variation) % 2**32 if base_seed is not None else self._rng.randrange(2**32),
            )
            for i in range(n)
        ]
        self.requests[req.id] = req
        return req

    def status(self, request_id: str, *, with_generations: bool = True) -> dict[str, Any]:
        req = self.requests.get(request_id)
        if req is None:
            raise ApiError(404, f"Request with ID '{request_id}' not found.", "RequestNotFound")
        self.reap()
        finished = [j for j in req.jobs if j.state in ("ok", "censored")]
        processing = [j for j in req.jobs if j.state == "processing"]
        status: dict[str, Any] = {
            "finished": len(finished),
            "processing": len(processing),
            "restarted": req.restarts,
            "waiting": len(req.pending),
            "done": len(finished) == req.n,
            "faulted": req.faulted,
            "wait_time": 0 if finished else 10,
            "queue_position": self._queue_position(req),
            "kudos": round(rules.image_kudos(req.params) * req.n, 2),
            "is_possible": True,
        }
        if with_generations:
            status["generations"] = [self._generation_view(req, j) for j in finished]
            status["shared"] = False
        return status

    def _queue_position(self, req: GenRequest) -> int:
        waiting = [r for r in self.requests.values() if r.pending]
        return waiting.index(req) if req in waiting else 0

    def _generation_view(self, req: GenRequest, job: GenJob) -> dict[str, Any]:
        if req.r2:
            img = self.reg.store.presign("GET", job.image_key)
        else:
            img = base64.b64encode(self.reg.store.get(job.image_key) or b"").decode()
        return {
            "worker_id": job.worker.id,
            "worker_name": job.worker.name,
            "model": job.model,
            "state": "censored" if job.censored else job.state,
            "img": img,
            "seed": str(job.seed),
            "id": job.id,
            "censored": job.censored,
            "gen_metadata": job.gen_metadata,
        }

    def cancel(self, request_id: str) -> dict[str, Any]:
        req = self.requests.get(request_id)
        if req is None:
            raise ApiError(404, f"Request with ID '{request_id}' not found.", "RequestNotFound")
        req.pending.clear()
        return self.status(request_id)

    # ---- worker side: pop ------------------------------------------------------------------------------
    def pop(self, body: Any, api_key: str | None) -> dict[str, Any]:
        errors = validate(body, GENERATE_POP)
        if errors:
            raise validation_error(errors)
        user = self.reg.worker_user(api_key)
        settings = {**POP_DEFAULTS, **{k: v for k, v in body.items() if k in POP_DEFAULTS}}
        rules.check_priority_usernames(settings["priority_usernames"])
        models = [m for m in (settings["models"] or ["stable_diffusion"]) if m in self.known_models]
        if not models:
            raise ApiError(
                400,
                "Unfortunately we cannot accept workers serving unrecognised models at this time",
                "BadRequest",
            )
        worker = self.reg.check_in(user, body["name"], "image", settings)
        worker.models = models
        self.reap()
        skipped: Counter[str] = Counter()
        for req in self._ordered_requests(settings["priority_usernames"]):
            if not req.pending or (worker.maintenance and req.owner is not worker.owner):
                continue
            reason = rules.generation_skip_reason(worker, req, self.baselines)
            if reason:
                skipped[reason] += 1
                continue
            return self._start(req, worker, min(settings["amount"], len(req.pending)))
        if worker.maintenance:
            raise rules.maintenance_error(worker)
        return self.idle_reply(dict(skipped))

    def _ordered_requests(self, priority: list[str]) -> list[GenRequest]:
        reqs = list(self.requests.values())
        return sorted(reqs, key=lambda r: r.owner.username not in priority)  # stable: FIFO within each group

    @staticmethod
    def idle_reply(skipped: dict[str, int]) -> dict[str, Any]:
        return {
            "payload": dict(IDLE_PAYLOAD),
            "id": None,
            "ids": [],
            "messages": [],
            "ttl": None,
            "skipped": skipped,
            "model": None,
            "source_image": None,
            "source_processing": "img2img",
            "source_mask": None,
            "extra_source_images": None,
            "r2_upload": None,
            "r2_uploads": None,
        }

    def _start(self, req: GenRequest, worker: Worker, amount: int) -> dict[str, Any]:
        model = rules.usable_models(worker, req, self.baselines)[0]
        baseline = self.baselines.get(model)
        ttl = (
            self.job_ttl if self.job_ttl is not None else rules.job_ttl(req.params, worker.settings, baseline)
        )
        now = time.monotonic()
        slots, req.pending = req.pending[:amount], req.pending[amount:]
        jobs = [GenJob(new_id(), req, worker, model, slot, now, ttl) for slot in slots]
        for job in jobs:
            self.jobs[job.id] = job
            req.jobs.append(job)
            self.reg.accounting.handed_out.append(job.id)
        worker.uncompleted_jobs += len(jobs)
        return self._job_reply(req, worker, jobs, ttl)

    def _job_reply(self, req: GenRequest, worker: Worker, jobs: list[GenJob], ttl: float) -> dict[str, Any]:
        agent, store = worker.agent, self.reg.store
        ids = [j.id for j in jobs]
        uploads = [store.presign("PUT", j.image_key) for j in jobs] if agent.has("r2") else None
        extra = None
        if req.extra_sources and agent.has("extra_source_images"):
            extra = [
                {"image": store.presign("GET", e["key"]), "strength": e["strength"]}
                for e in req.extra_sources
            ]
        return {
            "payload": self._payload(req, jobs),
            "id": ids[0],
            "ids": ids,
            "messages": [],
            "ttl": math.ceil(ttl),
            "skipped": {},
            "model": jobs[0].model,
            "source_image": self._source(worker, req.source_key),
            "source_processing": req.source_processing,
            "source_mask": self._source(worker, req.mask_key),
            "extra_source_images": extra,
            "r2_upload": uploads[0] if uploads else None,
            "r2_uploads": uploads,
        }

    def _source(self, worker: Worker, key: str | None) -> str | None:
        if key is None:
            return None
        if worker.agent.has("r2_source"):
            return self.reg.store.presign("GET", key)
        # Without r2_source the horde sends the image itself, base64 without a data: prefix.
        return base64.b64encode(self.reg.store.get(key) or b"").decode()

    def _payload(self, req: GenRequest, jobs: list[GenJob]) -> dict[str, Any]:
        p = req.params
        payload: dict[str, Any] = {
            "prompt": req.prompt,
            "ddim_steps": p["steps"],
            "n_iter": len(jobs),
            "seed": str(jobs[0].slot.seed),
            "image_is_control": p["image_is_control"],
            "return_control_map": p["return_control_map"],
            "sampler_name": p["sampler_name"],
            "cfg_scale": p["cfg_scale"],
            "height": p["height"],
            "width": p["width"],
            "karras": p["karras"],
            "tiling": p["tiling"],
            "hires_fix": p["hires_fix"],
            "transparent": p["transparent"],
        }
        payload.update({k: p[k] for k in OPTIONAL_PAYLOAD_KEYS if p.get(k) is not None})
        if not req.nsfw and req.censor_nsfw:
            payload["use_nsfw_censor"] = True
        return payload

    # ---- worker side: submit ---------------------------------------------------------------------------
    def submit(self, body: Any, api_key: str | None) -> dict[str, Any]:
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            self.reg.accounting.submits.setdefault(body["id"], []).append(body)
        errors = validate(body, GENERATE_SUBMIT)
        if not errors and "generation" not in body:
            errors["generation"] = "R2 or base64 webp. Missing required parameter in the JSON body"
        if errors:
            raise validation_error(errors)
        if len(body.get("gen_metadata") or []) > MAX_GEN_METADATA:
            raise ApiError(400, f"Too many gen_metadata entries (max {MAX_GEN_METADATA}).", "BadRequest")
        if api_key is None:
            raise missing_apikey()  # the parser layer runs before any lookup
        job = self._submittable(body["id"], api_key)
        state = body.get("state", "ok")
        if state == "faulted":
            self._requeue(job, "faulted")
            return {"reward": 0}
        self._store_image(job, body["generation"])
        job.seed = body["seed"]
        job.gen_metadata = list(body.get("gen_metadata") or [])
        job.censored = any(
            m["type"] == "censorship" and m["value"] in ("nsfw", "csam") for m in job.gen_metadata
        )
        # As the server: the censorship entry decides, a bare state "csam" records nothing.
        if any(m["type"] == "censorship" and m["value"] == "csam" for m in job.gen_metadata):
            self.reg.accounting.problem_jobs.append(job.id)
        job.state = "censored" if state in ("censored", "csam") else "ok"
        job.reward = round(rules.image_kudos(job.request.params, self.baselines.get(job.model)), 2)
        self._credit(job)
        return {"reward": job.reward}

    def _credit(self, job: GenJob) -> None:
        worker, p = job.worker, job.request.params
        worker.uncompleted_jobs = max(0, worker.uncompleted_jobs - 1)
        worker.requests_fulfilled += 1
        worker.kudos_rewards += job.reward
        worker.megapixelsteps += p["width"] * p["height"] * p["steps"] / 1_000_000
        worker.owner.kudos += job.reward
        self.model_counts[job.model] += 1
        self.reg.accounting.rewards[job.id] = job.reward

    def _submittable(self, job_id: str, api_key: str | None) -> GenJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise self._drop(
                job_id, ApiError(404, f"Processing Job with ID {job_id} does not exist.", "InvalidJobID")
            )
        user = self.reg.submit_user(api_key)
        if job.worker.owner is not user:
            raise self._drop(
                job_id, ApiError(403, "Wrong credentials to submit as this worker.", "WrongCredentials")
            )
        self.reap()
        if job.state == "aborted":
            raise self._drop(
                job_id,
                ApiError(
                    400,
                    f"Processing Job with ID {job_id} took too long to process and has been aborted! "
                    "Please check your worker speed and do not onboard worker which generate slower than "
                    "2 it/s at 512x512!",
                    "AbortedGen",
                ),
            )
        if job.state != "processing":
            raise self._drop(
                job_id, ApiError(400, f"Processing Job with ID {job_id} already submitted.", "DuplicateGen")
            )
        return job

    def _drop(self, job_id: str, error: ApiError) -> ApiError:
        self.reg.accounting.drops.append((job_id, error.rc or ""))
        return error

    def _store_image(self, job: GenJob, generation: str) -> None:
        if generation == "R2":
            return  # the worker PUT it to the presigned URL (or didn't: the requester then gets nothing)
        try:
            data = base64.b64decode(generation, validate=True)
        except (binascii.Error, ValueError):
            data = generation.encode()  # the real server stores garbage too and still pays
        self.reg.store.put(job.image_key, data)

    # ---- expiry and requeue ----------------------------------------------------------------------------
    def reap(self) -> None:
        """Abort processing jobs past their ttl (the real server's maintenance thread)."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.state == "processing" and now > job.started + job.ttl:
                self._requeue(job, "expired")

    def expire(self, job_id: str | None = None) -> list[str]:
        """Force the ttl abort now: one job, or every processing job. Returns the aborted ids."""
        targets = [j for j in self.jobs.values() if j.state == "processing" and job_id in (None, j.id)]
        for job in targets:
            self._requeue(job, "expired")
        return [j.id for j in targets]

    def _requeue(self, job: GenJob, reason: str) -> None:
        job.state = "aborted" if reason == "expired" else "faulted"
        job.worker.uncompleted_jobs = max(0, job.worker.uncompleted_jobs - 1)
        if reason == "expired":
            job.worker.record_abort(self.reg.auto_maintenance_aborts)
        req = job.request
        req.restarts += 1
        self.reg.accounting.requeues.append((job.id, reason))
        job.slot.restarts += 1
        if job.slot.restarts >= MAX_RESTARTS:
            req.faulted = True
            req.pending.clear()
            return
        req.pending.insert(0, job.slot)
        req.pending.sort(key=lambda s: s.index)
