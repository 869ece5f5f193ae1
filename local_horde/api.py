"""JSON routes of /api/v2: dispatch to the generation and alchemy queues, plus users, workers and status."""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from local_horde import rules
from local_horde.alchemy import AlchemyQueue
from local_horde.generation import GenerationQueue
from local_horde.schema import GENERATE_ASYNC, WORKER_MODIFY, interrogate_async_schema, validate
from local_horde.state import ApiError, Registry, User, missing_apikey, validation_error
from local_horde.swagger import SWAGGER_PATH, swagger_document

HORDE_VERSION = "5.1.5"
SOURCE_FETCH_TIMEOUT_S = 2.0
SOURCE_MAX_BYTES = 5 * 1024 * 1024


@dataclass
class ApiRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON (None when empty)
    params: dict[str, str]  # path parameters

    @property
    def api_key(self) -> str | None:
        return self.headers.get("apikey")

    def arg(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, [default])[0]


Handler = Callable[[ApiRequest], tuple[int, Any]]


class HordeApi:
    def __init__(self, registry: Registry, generations: GenerationQueue, alchemy: AlchemyQueue) -> None:
        self.reg = registry
        self.gens = generations
        self.alchemy = alchemy
        self.seeded_model_stats: dict[str, dict[str, int]] = {"day": {}, "month": {}, "total": {}}
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        for method, pattern, handler in self._route_table():
            self.routes.append((method, re.compile("^/api/v2" + pattern + "$"), handler))

    def _route_table(self) -> list[tuple[str, str, Handler]]:
        g, a = self.gens, self.alchemy
        return [
            ("POST", "/generate/pop", lambda r: (200, g.pop(r.body, r.api_key))),
            ("POST", "/generate/submit", lambda r: (200, g.submit(r.body, r.api_key))),
            ("POST", "/interrogate/pop", lambda r: (200, a.pop(r.body, r.api_key))),
            ("POST", "/interrogate/submit", lambda r: (200, a.submit(r.body, r.api_key))),
            ("POST", "/generate/async", self.generate_async),
            ("GET", "/generate/status/(?P<id>[^/]+)", lambda r: (200, g.status(r.params["id"]))),
            ("DELETE", "/generate/status/(?P<id>[^/]+)", lambda r: (200, g.cancel(r.params["id"]))),
            (
                "GET",
                "/generate/check/(?P<id>[^/]+)",
                lambda r: (200, g.status(r.params["id"], with_generations=False)),
            ),
            ("POST", "/interrogate/async", self.interrogate_async),
            ("GET", "/interrogate/status/(?P<id>[^/]+)", lambda r: (200, a.status(r.params["id"]))),
            ("GET", "/find_user", self.find_user),
            ("GET", "/workers", lambda r: (200, [w.details() for w in self.reg.workers.values()])),
            ("GET", "/workers/name/(?P<name>[^/]+)", self.worker_by_name),
            ("GET", "/workers/(?P<id>[^/]+)", self.worker_details),
            ("PUT", "/workers/(?P<id>[^/]+)", self.modify_worker),
            ("GET", "/status/heartbeat", self.heartbeat),
            (
                "GET",
                "/status/modes",
                lambda r: (200, {"maintenance_mode": False, "invite_only_mode": False, "raid_mode": False}),
            ),
            ("GET", "/status/models", self.model_status),
            ("GET", "/stats/img/models", self.model_stats),
        ]

    def dispatch(self, req: ApiRequest) -> tuple[int, Any]:
        if req.path == SWAGGER_PATH:  # outside /api/v2, as flask-restx serves it
            if req.method != "GET":
                raise ApiError(405, "The method is not allowed for the requested URL.")
            with self.reg.lock:
                return 200, swagger_document(self.alchemy.forms)
        allowed = False
        for method, pattern, handler in self.routes:
            match = pattern.match(req.path)
            if not match:
                continue
            allowed = True
            if method == req.method:
                req.params = {k: v for k, v in match.groupdict().items() if v is not None}
                if handler in (self.generate_async, self.interrogate_async):
                    return handler(req)  # may download a source: takes the state lock only to queue
                with self.reg.lock:
                    return handler(req)
        if allowed:
            raise ApiError(405, "The method is not allowed for the requested URL.")
        raise ApiError(404, "The requested URL was not found on the server.")

    # ---- requester ---------------------------------------------------------------------------------------
    def requester_user(self, api_key: str | None) -> User:
        if api_key is None:
            raise missing_apikey()
        user = self.reg.users.get(api_key)
        if user is None:
            raise ApiError(401, "No user matching sent API Key.", "InvalidAPIKey")
        return user

    def generate_async(self, req: ApiRequest) -> tuple[int, Any]:
        errors = validate(req.body, GENERATE_ASYNC)
        if errors:
            raise validation_error(errors)
        user = self.requester_user(req.api_key)
        body = req.body
        rules.check_control_request(body, self.gens.baselines)
        sources: dict[str, str | None] = {}
        stamp = f"{time.time_ns()}"
        if body.get("source_image"):
            sources["source"] = self._ingest(body["source_image"], f"sources/{stamp}-source.webp")
        if body.get("source_mask"):
            sources["mask"] = self._ingest(body["source_mask"], f"sources/{stamp}-mask.webp")
        for i, extra in enumerate(body.get("extra_source_images") or []):
            sources[f"extra{i}"] = self._ingest(extra["image"], f"sources/{stamp}-extra{i}.webp")
        with self.reg.lock:
            gen = self.gens.add_request(user, body, sources)
        return 202, {"id": gen.id, "kudos": round(gen.n * self._kudos(gen.params), 2)}

    @staticmethod
    def _kudos(params: dict[str, Any]) -> float:
        from local_horde.rules import image_kudos

        return image_kudos(params)

    def interrogate_async(self, req: ApiRequest) -> tuple[int, Any]:
        errors = validate(req.body, interrogate_async_schema(self.alchemy.forms))
        if errors:
            raise validation_error(errors)
        user = self.requester_user(req.api_key)
        source = req.body["source_image"]
        if source.startswith(("http://", "https://")):
            # Workers always get a URL: the requester's own one when it gave a URL.
            data = self._own_object(source)
            url = source
        else:
            key = self._ingest(source, f"sources/{time.time_ns()}-alchemy.webp")
            data, url = self.reg.store.get(key), self.reg.store.presign("GET", key)
        with self.reg.lock:
            form_req = self.alchemy.add_request(user, req.body["forms"], url, data)
        return 202, {"id": form_req.id}

    def _own_object(self, url: str) -> bytes | None:
        parts = urlsplit(url)
        base = urlsplit(self.reg.store.base_url)
        if parts.netloc == base.netloc and parts.path.startswith("/r2/"):
            return self.reg.store.get(parts.path[len("/r2/") :])
        return None

    def _ingest(self, value: str, key: str) -> str:
        """Store a requester's source (base64 or URL) unchanged and return its key. Not re-encoded on
        purpose: tests host corrupt or huge images to check the worker's guards."""
        if value.startswith(("http://", "https://")):
            data = self._own_object(value)
            if data is None:
                data = self._download(value)
        else:
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(
                    400, "Image validation failed: not valid base64.", "ImageValidationFailed"
                ) from None
        self.reg.store.put(key, data)
        return key

    @staticmethod
    def _download(url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=SOURCE_FETCH_TIMEOUT_S) as resp:  # noqa: S310 - test server
                data = resp.read(SOURCE_MAX_BYTES + 1)
        except OSError:
            raise ApiError(
                400, f"Could not download source image from {url}.", "SourceImageDownloadFailed"
            ) from None
        if len(data) > SOURCE_MAX_BYTES:
            raise ApiError(400, "Source image is larger than 5 MB.", "ImageValidationFailed")
        return data

    # ---- users and workers ---------------------------------------------------------------------------------
    def find_user(self, req: ApiRequest) -> tuple[int, Any]:
        if req.api_key is None:
            raise ApiError(401, "No user matching sent API Key.", "InvalidAPIKey")
        user = self.reg.users.get(req.api_key)
        if user is None:
            raise ApiError(404, "User not found.", "UserNotFound")
        workers = [w.id for w in self.reg.workers.values() if w.owner is user]
        return 200, {
            "username": user.username,
            "id": user.id,
            "kudos": round(user.kudos, 2),
            "worker_ids": workers,
            "worker_count": len(workers),
            "trusted": False,
            "flagged": False,
            "moderator": user.moderator,
            "concurrency": 30,
            "pseudonymous": False,
            "kudos_details": {"accumulated": round(user.kudos, 2)},
            "records": {"request": {"image": 0}, "fulfillment": {"image": 0, "interrogation": 0}},
        }

    def _worker(self, worker_id: str) -> Any:
        worker = self.reg.workers.get(worker_id)
        if worker is None:
            raise ApiError(404, f"Worker with ID '{worker_id}' not found.", "WorkerNotFound")
        return worker

    def worker_details(self, req: ApiRequest) -> tuple[int, Any]:
        return 200, self._worker(req.params["id"]).details()

    def worker_by_name(self, req: ApiRequest) -> tuple[int, Any]:
        worker = self.reg.worker_by_name(req.params["name"])
        if worker is None:
            raise ApiError(404, f"Worker with ID '{req.params['name']}' not found.", "WorkerNotFound")
        return 200, worker.details()

    def modify_worker(self, req: ApiRequest) -> tuple[int, Any]:
        if req.api_key is None:
            raise missing_apikey()
        errors = validate(req.body, WORKER_MODIFY)
        if errors:
            raise validation_error(errors)
        user = self.reg.users.get(req.api_key)
        if user is None:
            raise ApiError(401, "No user matching sent API Key.", "InvalidAPIKey")
        worker = self._worker(req.params["id"])
        if worker.owner is not user and not user.moderator:
            raise ApiError(403, f"You are not the owner of worker '{worker.name}'.", "NotOwner")
        changes = {k: v for k, v in req.body.items() if k in WORKER_MODIFY["properties"]}
        if not changes:
            raise ApiError(400, "No worker modification selected!", "NoWorkerModSelected")
        if "paused" in changes and not user.moderator:
            raise ApiError(403, "You need to be a moderator to pause a worker.", "NotModerator")
        if "maintenance" in changes:
            worker.maintenance = changes["maintenance"]
            worker.maintenance_msg = changes.get("maintenance_msg", "") if worker.maintenance else ""
        if "info" in changes:
            worker.info = changes["info"]
        if "name" in changes:
            worker.name = changes["name"]
        return 200, changes

    # ---- status ------------------------------------------------------------------------------------------
    def heartbeat(self, req: ApiRequest) -> tuple[int, Any]:
        queued = sum(len(r.pending) for r in self.gens.requests.values())
        online = [w for w in self.reg.workers.values() if w.online]
        return 200, {
            "message": "OK",
            "version": HORDE_VERSION,
            "queue": queued,
            "threads": sum(w.settings.get("threads", 1) for w in online),
            "active_count": len(online),
            "db_connection": True,
        }

    def model_status(self, req: ApiRequest) -> tuple[int, Any]:
        state = req.arg("model_state", "known")
        if state not in ("known", "custom", "all"):
            raise validation_error(
                {"model_state": f"The state of the models to see. {state!r} is not a valid choice"}
            )
        if req.arg("type", "image") != "image" or state == "custom":
            return 200, []
        counts: Counter[str] = Counter(
            m for w in self.reg.workers.values() if w.online and w.type == "image" for m in w.models
        )
        queued: Counter[str] = Counter()
        for r in self.gens.requests.values():
            for m in r.models or self.gens.known_models[:1]:
                queued[m] += len(r.pending)
        lo, hi = int(req.arg("min_count") or 0), req.arg("max_count")
        rows = []
        for name in self.gens.known_models:
            count = counts[name]
            if count < lo or (hi is not None and count > int(hi)):
                continue
            rows.append(
                {
                    "name": name,
                    "count": count,
                    "performance": 1000000.0,
                    "queued": float(queued[name]),
                    "jobs": float(queued[name]),
                    "eta": 0,
                    "type": "image",
                }
            )
        return 200, rows

    def model_stats(self, req: ApiRequest) -> tuple[int, Any]:
        stats: dict[str, dict[str, int]] = {}
        for period in ("day", "month", "total"):
            merged = Counter(self.seeded_model_stats.get(period, {}))
            merged.update(self.gens.model_counts)
            stats[period] = dict(merged)
        return 200, stats


def parse_query(query: str) -> dict[str, list[str]]:
    return parse_qs(query, keep_blank_values=True)
