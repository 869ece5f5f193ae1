"""Users, workers, accounting and the error type shared by the generation and alchemy endpoints."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from local_horde.capabilities import BridgeAgent, parse_bridge_agent
from local_horde.schema import VALIDATION_MESSAGE
from local_horde.store import ObjectStore

ANON_API_KEY = "0000000000"
WORKER_OFFLINE_AFTER_S = 300.0
AUTO_MAINTENANCE_ABORTS = 20  # more ttl aborts than this in an hour puts a worker into maintenance
DROPPING_JOBS_MSG = (
    "Maintenance mode activated because worker is dropping too many jobs. "
    "Please investigate the cause and remove maintenance once fixed."
)


class ApiError(Exception):
    """An error answer. `rc` None gives the validation/limiter shape (no rc key)."""

    def __init__(
        self,
        status: int,
        message: str,
        rc: str | None = None,
        *,
        errors: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.rc = rc
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.errors is not None:
            body["errors"] = self.errors
        body["message"] = self.message
        if self.rc is not None:
            body["rc"] = self.rc
        return body


def validation_error(errors: dict[str, str]) -> ApiError:
    return ApiError(400, VALIDATION_MESSAGE, errors=errors)


def missing_apikey() -> ApiError:
    return validation_error(
        {
            "apikey": "The API Key corresponding to a registered user. "
            "Missing required parameter in the HTTP headers"
        }
    )


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class User:
    id: int
    alias: str
    api_key: str
    kudos: float = 0.0
    moderator: bool = False

    @property
    def username(self) -> str:
        return f"{self.alias}#{self.id}"


@dataclass
class Worker:
    id: str
    name: str
    type: str  # "image" | "interrogation"
    owner: User
    agent: BridgeAgent
    settings: dict[str, Any] = field(default_factory=dict)  # the pop's effective (parser-defaulted) values
    models: list[str] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)
    maintenance: bool = False
    maintenance_msg: str = ""
    info: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.monotonic)
    requests_fulfilled: int = 0
    kudos_rewards: float = 0.0
    megapixelsteps: float = 0.0
    uncompleted_jobs: int = 0
    abort_times: list[float] = field(default_factory=list)

    def record_abort(self, limit: int) -> None:
        """A ttl abort; too many within an hour and the horde puts the worker into maintenance."""
        now = time.monotonic()
        self.abort_times = [t for t in self.abort_times if now - t < 3600] + [now]
        if len(self.abort_times) > limit and not self.maintenance:
            self.maintenance, self.maintenance_msg = True, DROPPING_JOBS_MSG

    @property
    def online(self) -> bool:
        return time.monotonic() - self.last_seen < WORKER_OFFLINE_AFTER_S

    def details(self) -> dict[str, Any]:
        s = self.settings
        details: dict[str, Any] = {
            "type": self.type,
            "name": self.name,
            "id": self.id,
            "online": self.online,
            "requests_fulfilled": self.requests_fulfilled,
            "kudos_rewards": round(self.kudos_rewards, 2),
            "kudos_details": {"generated": round(self.kudos_rewards, 2), "uptime": 0},
            "performance": "0.0 megapixelsteps per second" if self.type == "image" else "0 seconds per form",
            "threads": s.get("threads", 1),
            "uptime": int(time.monotonic() - self.created),
            "maintenance_mode": self.maintenance,
            "paused": False,
            "info": self.info or None,
            "nsfw": s.get("nsfw", True),
            "owner": self.owner.username,
            "trusted": False,
            "flagged": False,
            "uncompleted_jobs": self.uncompleted_jobs,
            "team": {"name": None, "id": None},
            "bridge_agent": s.get("bridge_agent", "unknown:0:unknown"),
            "messages": [],
        }
        if self.type == "image":
            details.update(
                models=list(self.models),
                max_pixels=s.get("max_pixels", 262144),
                megapixelsteps_generated=round(self.megapixelsteps, 2),
                img2img=s.get("allow_img2img", True),
                painting=s.get("allow_painting", True),
                lora=s.get("allow_lora", False),
                controlnet=s.get("allow_controlnet", False),
                sdxl_controlnet=s.get("allow_sdxl_controlnet", False),
            )
            details["post-processing"] = s.get("allow_post_processing", True)
        else:
            details["forms"] = list(self.forms)
        return details


@dataclass
class Accounting:
    """What the horde handed out and what came back: tests assert exactly-once from this."""

    handed_out: list[str] = field(default_factory=list)  # every job id given to a worker, in order
    submits: dict[str, list[dict]] = field(default_factory=dict)  # every submit body received per id
    drops: list[tuple[str, str]] = field(
        default_factory=list
    )  # (id, rc) for AbortedGen/DuplicateGen/InvalidJobID
    requeues: list[tuple[str, str]] = field(default_factory=list)  # (old id, "faulted" | "expired")
    rewards: dict[str, float] = field(default_factory=dict)  # id -> reward of its accepted submit
    # Ids submitted with a {"type": "censorship", "value": "csam"} entry: the server records each as a
    # problem job of its requester (and of their IP).
    problem_jobs: list[str] = field(default_factory=list)

    def snapshot(self) -> Accounting:
        return copy.deepcopy(self)

    def unfinished(self) -> list[str]:
        """Ids handed out that were neither accepted, dropped nor requeued."""
        closed = set(self.rewards) | {i for i, _ in self.drops} | {i for i, _ in self.requeues}
        return [i for i in self.handed_out if i not in closed]


class Registry:
    """Users and workers. Callers hold `lock` (the horde-wide state lock) around every call."""

    def __init__(self, api_key: str, extra_bridges: Mapping[str, str] | None = None) -> None:
        self.extra_bridges = dict(extra_bridges or {})
        self.auto_maintenance_aborts = AUTO_MAINTENANCE_ABORTS
        self.lock = threading.RLock()
        self.store = ObjectStore()
        self.accounting = Accounting()
        self.users: dict[str, User] = {}
        self.workers: dict[str, Worker] = {}
        self._next_user_id = 1
        self.anon = User(0, "Anonymous", ANON_API_KEY)
        self.users[ANON_API_KEY] = self.anon
        self.add_user("local", api_key)

    def add_user(self, alias: str, api_key: str) -> User:
        user = User(self._next_user_id, alias, api_key)
        self._next_user_id += 1
        self.users[api_key] = user
        return user

    def worker_user(self, api_key: str | None) -> User:
        """The user a pop authenticates as (the pop endpoints' auth rules)."""
        if api_key is None:
            raise missing_apikey()
        if api_key == ANON_API_KEY:
            raise ApiError(403, "Anonymous user is forbidden from running a worker.", "AnonForbiddenWorker")
        user = self.users.get(api_key)
        if user is None:
            raise ApiError(
                401,
                "No user matching sent API Key. "
                "Have you remembered to register at https://aihorde.net/register ?",
                "InvalidAPIKey",
            )
        return user

    def submit_user(self, api_key: str | None) -> User:
        if api_key is None:
            raise missing_apikey()
        user = self.users.get(api_key)
        if user is None:
            # The real server raises a KeyError here: a bare 500 without rc.
            raise ApiError(500, "Internal Server Error")
        return user

    def check_in(self, user: User, name: str, type_: str, settings: dict[str, Any]) -> Worker:
        """Find or create the worker for a pop, enforcing name ownership and uniqueness across types."""
        worker = next((w for w in self.workers.values() if w.name == name), None)
        if worker is not None and worker.type != type_:
            raise ApiError(
                400,
                f"Worker name '{name}' is already used by a worker of a different type. "
                "Please pick a different name.",
                "PolymorphicNameConflict",
            )
        if worker is not None and worker.owner is not user:
            raise ApiError(403, "Wrong credentials to submit as this worker.", "WrongCredentials")
        if worker is None:
            worker = Worker(
                new_id(),
                name,
                type_,
                user,
                parse_bridge_agent(settings.get("bridge_agent"), self.extra_bridges),
            )
            self.workers[worker.id] = worker
        worker.settings = settings
        worker.agent = parse_bridge_agent(settings.get("bridge_agent"), self.extra_bridges)
        worker.last_seen = time.monotonic()
        return worker

    def worker_by_name(self, name: str) -> Worker | None:
        return next((w for w in self.workers.values() if w.name == name), None)
