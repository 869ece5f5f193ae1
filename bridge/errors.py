"""Typed horde errors: every failure the worker can see maps to exactly one policy.

The daemon never looks at HTTP codes or `rc` strings; it looks at the policy of the exception class:

* RETRY: transient. The client's RetryPolicy retries it; once the policy gives up, the caller sees the
  RetryableError and tries again later (next poll, next send).
* FAULT: this job cannot be completed as sent. Submit it again as `state: "faulted"` (if the faulted submit
  fails too, drop it). For an R2 upload, the job may instead fall back to submitting base64.
* DROP: give up on this one request and carry on. For a submit the id is finished (already counted,
  aborted, stale or not ours); for an informational call the result is simply missing.
* STOP: a configuration problem that no retry can fix. The message tells the operator what to change.
* MAINTENANCE: the worker is in maintenance mode: stop popping, keep polling slowly, finish what is running.

Endpoint kinds: ``pop`` (generate/pop, interrogate/pop), ``submit`` (generate/submit, interrogate/submit),
``upload`` (the R2 PUT), anything else is ``other`` (find_user, workers, stats, heartbeat).

A retried call's final error carries the errors of its earlier attempts (`earlier`). A submit that meets
DuplicateGen after an attempt whose answer never came (no reply, a 5xx, a garbled 2xx) was delivered by
that attempt: `already_delivered` says so, and the worker counts it delivered with its reward unknown.

| status | rc / body | endpoint | policy |
|---|---|---|---|
| none (timeout, connection error, dropped) | - | any | RETRY |
| 5xx | any (incl. the unknown-apikey KeyError 500 on submit) | any | RETRY |
| 429, 408 | flask-limiter text, `Retry-After` honoured; a proxy's request timeout | any | RETRY |
| 2xx | body not JSON / not the documented shape | any | RETRY |
| 3xx | a redirect: never followed (the key must not travel), logged | pop, submit | RETRY |
| 3xx | a redirect | upload | FAULT (the result goes base64) |
| 401 | InvalidAPIKey | pop | RETRY (reGen does; the retry budget bounds it) |
| 401 | InvalidAPIKey | other / submit | STOP (the key is wrong) |
| 403 | TooManyNewIPs | any | RETRY |
| 403 | WorkerMaintenance, WorkerFlaggedMaintenance, "maintenance mode" in message | any | MAINTENANCE |
| 403 | AnonForbiddenWorker | any | STOP |
| 403 | WrongCredentials | pop | STOP (worker name owned by another user) |
| 403 | WrongCredentials | submit | DROP |
| 403 | UnsafeIP TimeoutIP TooManySameIPs TooManyWorkers[Trusted] WorkerInviteOnly DeletedUser | any | STOP |
| 400 | BadRequest, InvalidPriorityUsername, PolymorphicNameConflict, Profane* | pop | STOP |
| 400 | validation (no rc, `errors` logged) | pop | STOP (our request is malformed: config) |
| 400 | validation (no rc, `errors` logged) | submit | FAULT |
| 400 | DuplicateGen, AbortedGen | submit | DROP |
| 400 | any other rc (e.g. BadRequest for >50 gen_metadata) | submit | FAULT |
| 404 | InvalidJobID or any other rc | submit | DROP |
| 404 | UserNotFound | other | STOP (the key belongs to no user) |
| 4xx | any other rc: the horde's own refusal | pop | STOP (unknown refusal: say what the server said) |
| 4xx | any other rc | submit | DROP |
| 4xx | no rc (a CDN's or proxy's HTML page, a route the horde does not have) | pop, submit | RETRY |
| 4xx | anything else (e.g. 403 signature expired from R2) | upload | FAULT |
| 4xx | anything else (NotOwner, WorkerNotFound, NoWorkerModSelected, ...) | other | DROP |
| other | anything | any | DROP |

Only the horde's own refusals (an `rc`, or its validation 400) stop the worker: one odd answer from something
in between (a CDN's 403 page, a proxy's 408) must not end a volunteer's worker for good. Server text is
sanitised here (one line, no control characters, the api key and presigned credentials masked) before it
becomes a message.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

from bridge.safe_text import server_text

logger = logging.getLogger(__name__)


class Policy(enum.Enum):
    RETRY = "retry"
    FAULT = "fault"
    DROP = "drop"
    STOP = "stop"
    MAINTENANCE = "maintenance"


class HordeError(Exception):
    """A failed horde (or R2) request. `policy` is a property of the class, never of the instance."""

    policy: ClassVar[Policy] = Policy.DROP
    # The errors of the attempts before this one, when the one retry policy retried the call.
    earlier: tuple[HordeError, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        rc: str | None = None,
        endpoint: str = "",
        errors: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.rc = rc
        self.endpoint = endpoint
        self.errors = errors or {}
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"{self.endpoint}: " if self.endpoint else ""
        code = " ".join(str(p) for p in (self.status, self.rc) if p is not None)
        return f"{where}{self.message}" + (f" ({code})" if code else "")


class RetryableError(HordeError):
    policy = Policy.RETRY


class JobFaultError(HordeError):
    policy = Policy.FAULT


class JobDroppedError(HordeError):
    policy = Policy.DROP


class WorkerStopError(HordeError):
    policy = Policy.STOP


class MaintenanceError(HordeError):
    policy = Policy.MAINTENANCE


_CLASS_OF: dict[Policy, type[HordeError]] = {
    Policy.RETRY: RetryableError,
    Policy.FAULT: JobFaultError,
    Policy.DROP: JobDroppedError,
    Policy.STOP: WorkerStopError,
    Policy.MAINTENANCE: MaintenanceError,
}

# What the operator must change, per rc: the server's own text says what is wrong, not what to do.
_STOP_ADVICE: dict[str, str] = {
    "InvalidAPIKey": "the api_key is not known to the horde: check api_key in the config",
    "UserNotFound": "the api_key belongs to no horde user: check api_key in the config",
    "AnonForbiddenWorker": "the anonymous key 0000000000 cannot run a worker: "
    "register at https://aihorde.net/register and set api_key to your own key",
    "WrongCredentials": "this worker name belongs to another account: "
    "worker names are unique horde-wide, set a different worker_name / dreamer_name / alchemist_name",
    "BadRequest": "the horde refused this worker's model list (all unknown or empty): "
    "set models_to_load to models listed in the horde model reference",
    "InvalidPriorityUsername": "priority_usernames must be 'alias#id' (e.g. 'db0#1'): fix priority_usernames",
    "PolymorphicNameConflict": "this worker name is used by a worker of another type (image/alchemy): "
    "give dreamer_name and alchemist_name different values",
    "ProfaneWorkerName": "the horde refuses the worker name as profane: choose another worker_name",
    "ProfaneBridgeAgent": "the horde refuses the bridge_agent as profane: change bridge_agent",
    "UnsafeIP": "the horde considers this IP unsafe (VPN/proxy?): use another network or ask a moderator",
    "TimeoutIP": "this IP is in a timeout imposed by the horde: wait it out or ask a moderator",
    "TooManySameIPs": "too many workers run from this IP: stop some, or ask to be trusted",
    "TooManyWorkers": "an untrusted user may run only 3 workers: stop some, or ask to be trusted",
    "TooManyWorkersTrusted": "this user runs the maximum number of workers: stop some",
    "WorkerInviteOnly": "the horde is in invite-only mode for workers: ask a moderator for an invite",
    "DeletedUser": "the user of this api_key was deleted: use another api_key",
}
_VALIDATION_ADVICE = "the horde rejected the request body as invalid: check the worker settings it names"

_POP_STOP_RCS = set(_STOP_ADVICE) - {"UserNotFound"}
_ANY_STOP_RCS = {
    "AnonForbiddenWorker",
    "UnsafeIP",
    "TimeoutIP",
    "TooManySameIPs",
    "TooManyWorkers",
    "TooManyWorkersTrusted",
    "WorkerInviteOnly",
    "DeletedUser",
}
_MAINTENANCE_RCS = {"WorkerMaintenance", "WorkerFlaggedMaintenance"}
_SUBMIT_DROP_RCS = {"DuplicateGen", "AbortedGen", "InvalidJobID", "WrongCredentials"}


def endpoint_kind(endpoint: str) -> str:
    """The kind ("pop", "submit", "upload" or "other") of an endpoint label such as "generate/pop"."""
    tail = endpoint.rstrip("/").rsplit("/", 1)[-1]
    return tail if tail in ("pop", "submit", "upload") else "other"


def _body_fields(body: dict | str | None, secrets: Iterable[str]) -> tuple[str | None, str, dict[str, Any]]:
    """(rc, message, errors) from a horde error body; tolerant of text (flask-limiter, R2 XML, proxies).
    Every string in it is server text: sanitised and masked before anyone logs it."""
    secrets = list(secrets)
    if isinstance(body, dict):
        rc = body.get("rc")
        message = body.get("message")
        errors = body.get("errors")
        clean_errors = {
            server_text(k, secrets, limit=80): server_text(v, secrets, limit=200)
            for k, v in list(errors.items())[:20]
        } if isinstance(errors, dict) else {}
        return (
            server_text(rc, secrets, limit=60) if rc and isinstance(rc, str | int) else None,
            server_text(message, secrets) if message else "",
            clean_errors,
        )
    text = (body or "").strip()
    # A proxy's HTML page can be huge; the first line is what a log reader needs.
    return None, server_text(text.splitlines()[0], secrets) if text else "", {}


def _policy(status: int | None, rc: str | None, message: str, kind: str, errors: dict[str, Any]) -> Policy:
    """The table of the module docstring, in order."""
    if status is None or status >= 500 or status in (408, 429) or 200 <= status < 300:
        return Policy.RETRY
    if 300 <= status < 400:
        return {"pop": Policy.RETRY, "submit": Policy.RETRY, "upload": Policy.FAULT}.get(kind, Policy.DROP)
    if rc in _MAINTENANCE_RCS or (status == 403 and "maintenance mode" in message.lower()):
        return Policy.MAINTENANCE
    if rc == "TooManyNewIPs":
        return Policy.RETRY
    if rc == "InvalidAPIKey":
        return Policy.RETRY if kind == "pop" else Policy.STOP
    if rc in _ANY_STOP_RCS:
        return Policy.STOP
    own_refusal = rc is not None or (status == 400 and bool(errors))
    if kind in ("pop", "submit") and 400 <= status < 500 and not own_refusal:
        return Policy.RETRY  # not the horde's word: a CDN, a proxy, a route that is not (yet) there
    if kind == "pop":
        return Policy.STOP if 400 <= status < 500 else Policy.DROP
    if kind == "submit":
        if rc in _SUBMIT_DROP_RCS or status == 404:
            return Policy.DROP
        return Policy.FAULT if status == 400 else Policy.DROP
    if kind == "upload":
        return Policy.FAULT if 400 <= status < 500 else Policy.DROP
    if rc == "UserNotFound":
        return Policy.STOP
    return Policy.DROP


def classify(
    status: int | None,
    body: dict | str | None,
    *,
    endpoint: str,
    retry_after: float | None = None,
    secrets: Iterable[str] = (),
) -> HordeError:
    """The typed error for a failed response (status None: no response at all). `secrets` (the api key, a
    presigned URL's credentials) are masked wherever the server's text echoes them."""
    rc, message, errors = _body_fields(body, secrets)
    kind = endpoint_kind(endpoint)
    policy = _policy(status, rc, message, kind, errors)
    if status is not None and 200 <= status < 300:
        message = f"malformed response: {message or 'empty body'}"
    elif not message:
        message = "no response" if status is None else f"HTTP {status}"
    if errors:
        # The validation 400 names the offending fields only here; nothing else explains it.
        logger.warning("%s rejected as invalid: %s", endpoint, errors)
    if policy is Policy.STOP:
        advice = _STOP_ADVICE.get(rc or "", _VALIDATION_ADVICE if errors else "")
        if advice:
            message = f"{message} -> {advice}"
    elif status == 404 and rc is None and kind in ("pop", "other"):
        message = f"{message} -> the horde has no such route: check horde_url in the config"
    return _CLASS_OF[policy](
        message, status=status, rc=rc, endpoint=endpoint, errors=errors, retry_after=retry_after
    )


def outcome_unknown(error: HordeError) -> bool:
    """Whether the server may have acted on the request although we saw no success: no answer at all, a 5xx
    (a proxy may answer it after the horde did the work), or a 2xx we could not read."""
    return error.status is None or error.status >= 500 or 200 <= error.status < 300


def already_delivered(error: HordeError) -> bool:
    """A submit refused as already submitted (DuplicateGen) after an earlier attempt of the same call whose
    answer was lost: that attempt was accepted. Its reward is unknown (it was in the lost answer)."""
    return (
        error.rc == "DuplicateGen"
        and endpoint_kind(error.endpoint) == "submit"
        and any(outcome_unknown(e) for e in error.earlier)
    )


def redact(text: str, secret: str) -> str:
    """`text` with every occurrence of `secret` masked (exception texts can echo request details)."""
    return text.replace(secret, "***") if secret else text


def mask_key(api_key: str) -> str:
    """A form of the key that is safe to log: no character of it, only whether one is set."""
    return f"***({len(api_key)} chars)" if api_key else "(none)"
