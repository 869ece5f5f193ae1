"""HordeClient: the worker's side of the AI Horde API v2 (see /work/shared/horde-api.md).

One `requests.Session` carries the `apikey` and `Client-Agent` headers for every horde call. R2 uploads go
through a second, header-less session: a presigned URL belongs to a third party, and the key must never
travel there. Redirects are never followed (a 302 to another host would carry the key there, and a submit
landing elsewhere loses the job): a redirect answer is an error with a log line naming where it pointed.
Every failure becomes a `bridge.errors.HordeError` subclass; RETRY-policy errors are retried here by the one
RetryPolicy (until a job's ttl deadline for submits and uploads), the rest are raised for the caller to act
on. Pop replies are read by `bridge.pop_reader`: ids first, then field by field.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import requests
from pydantic import BaseModel, ValidationError

from bridge.api_models import (
    GenerationPopRequest,
    GenerationPopResponse,
    GenerationSubmit,
    InterrogationPopRequest,
    InterrogationPopResponse,
    InterrogationSubmit,
    SubmitResponse,
)
from bridge.errors import HordeError, MaintenanceError, classify, mask_key
from bridge.pop_reader import read_generation_pop, read_interrogation_pop
from bridge.retry import RetryPolicy
from bridge.safe_text import server_text, url_secrets

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

UPLOAD_TIMEOUT = 10.0  # reGen's value for the R2 PUT


def api_root(base_url: str) -> str:
    """The server root: 'https://aihorde.net', 'https://aihorde.net/' and '.../api/' all name one server."""
    url = base_url.strip().rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def safe_url(url: str) -> str:
    """A URL without its query: presigned URLs carry their signature there."""
    parts = urlsplit(url)
    return server_text(f"{parts.scheme}://{parts.netloc}{parts.path}", limit=200)


def origin(url: str) -> str:
    """scheme://host:port, the unit the api key is bound to."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from either form the header allows (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HordeClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client_agent: str,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        upload_timeout: float = UPLOAD_TIMEOUT,
    ) -> None:
        self.base_url = api_root(base_url)
        self.client_agent = client_agent
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.upload_timeout = upload_timeout
        self._api_key = api_key
        self.session = requests.Session()
        self.session.headers.update(
            {"apikey": api_key, "Client-Agent": client_agent, "Accept": "application/json"}
        )
        self._upload_session = requests.Session()
        self._state_lock = threading.Lock()
        self._maintenance_message: str | None = None

    def __repr__(self) -> str:
        return f"HordeClient(base_url={self.base_url!r}, api_key={mask_key(self._api_key)!r})"

    def close(self) -> None:
        self.session.close()
        self._upload_session.close()

    def __enter__(self) -> HordeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- maintenance ---------------------------------------------------------------------------------
    @property
    def maintenance(self) -> bool:
        """True since a pop was refused with WorkerMaintenance, until a pop succeeds again."""
        with self._state_lock:
            return self._maintenance_message is not None

    @property
    def maintenance_message(self) -> str | None:
        with self._state_lock:
            return self._maintenance_message

    def _note_maintenance(self, error: MaintenanceError | None) -> None:
        with self._state_lock:
            was = self._maintenance_message
            self._maintenance_message = error.message if error else None
        if error and was is None:
            # Once: the daemon keeps polling slowly and would otherwise repeat this every few seconds.
            logger.warning("the horde put this worker in maintenance mode: %s", error.message)
        elif not error and was is not None:
            logger.info("maintenance mode lifted: popping again")

    # ---- the horde endpoints -------------------------------------------------------------------------
    def pop_generation(self, request: GenerationPopRequest) -> GenerationPopResponse:
        return self._pop("generate/pop", request, read_generation_pop)

    def submit_generation(self, submit: GenerationSubmit, *, deadline: float | None = None) -> float:
        """`deadline` (a monotonic time, the job's ttl): retry transient failures until then, however many."""
        reply = self._call(
            "POST", "generate/submit", json=submit.body(), parse=_model(SubmitResponse), deadline=deadline,
            persist=True,
        )
        return reply.reward

    def pop_interrogation(self, request: InterrogationPopRequest) -> InterrogationPopResponse:
        return self._pop("interrogate/pop", request, read_interrogation_pop)

    def submit_interrogation(self, submit: InterrogationSubmit, *, deadline: float | None = None) -> float:
        reply = self._call(
            "POST", "interrogate/submit", json=submit.body(), parse=_model(SubmitResponse), deadline=deadline,
            persist=True,
        )
        return reply.reward

    def find_user(self) -> dict:
        return self._call("GET", "find_user", parse=_dict)

    def model_stats(self) -> dict:
        return self._call("GET", "stats/img/models", parse=_dict)

    def model_status(self) -> list[dict]:
        """GET /status/models?type=image: per model, workers serving it and jobs queued (dynamic_models)."""
        reply = self._call("GET", "status/models?type=image", endpoint="status/models", parse=_dict)
        return [row for row in reply.get("items", []) if isinstance(row, dict)]

    def get_worker(self, worker_id: str) -> dict:
        return self._call("GET", f"workers/{quote(worker_id, safe='')}", endpoint="workers", parse=_dict)

    def set_maintenance(self, worker_id: str, maintenance: bool) -> None:
        path = f"workers/{quote(worker_id, safe='')}"
        self._call("PUT", path, endpoint="workers", json={"maintenance": maintenance}, parse=_dict)

    def swagger(self) -> dict:
        """The server's published API description (flask-restx serves it at /api/swagger.json)."""
        return self._call("GET", "swagger.json", endpoint="swagger", parse=_dict, root="api")

    def heartbeat(self) -> dict:
        return self._call("GET", "status/heartbeat", parse=_dict)

    def upload(self, url: str, data: bytes, *, deadline: float | None = None) -> None:
        """PUT raw bytes to a presigned R2 URL. No Content-Type: it is not part of the signature, and a
        header the signer did not expect can make the store refuse the request. No redirects either: the
        store answers where it was asked. Transient failures get the policy's few retries, none past
        `deadline`: the caller has a base64 submit to fall back on."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise classify(
                400, f"refusing to upload to a non-http(s) URL {safe_url(url)!r}", endpoint="upload"
            )
        secrets = self._secrets(url)

        def attempt() -> None:
            try:
                timeout = self._timeout(self.upload_timeout, deadline)
                response = self._upload_session.put(url, data=data, timeout=timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise classify(None, self._describe(exc, url), endpoint="upload") from exc
            if 300 <= response.status_code < 400:
                raise self._redirected(response, "upload")
            if not 200 <= response.status_code < 300:
                raise classify(
                    response.status_code,
                    response.text[:300],
                    endpoint="upload",
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    secrets=secrets,
                )

        started = time.monotonic()
        self.retry.call(attempt, what=f"upload to {safe_url(url)}", deadline=deadline)
        logger.debug(
            "uploaded %d bytes to %s in %.2f s", len(data), safe_url(url), time.monotonic() - started
        )

    # ---- plumbing ------------------------------------------------------------------------------------
    def _pop(self, endpoint: str, request: BaseModel, read: Callable[[Any], M]) -> M:
        try:
            popped = self._call("POST", endpoint, json=request.model_dump(mode="json"), parse=read)
        except MaintenanceError as exc:
            self._note_maintenance(exc)
            raise
        self._note_maintenance(None)
        return popped

    def _call(
        self,
        method: str,
        path: str,
        *,
        parse: Callable[[Any], T],
        endpoint: str | None = None,
        json: Any = None,
        deadline: float | None = None,
        persist: bool = False,
        root: str = "api/v2",
    ) -> T:
        endpoint = endpoint or path
        url = f"{self.base_url}/{root}/{path}"
        if origin(url) != origin(self.base_url):  # a path that is really a URL must not take the key along
            raise ValueError(f"refusing to send the api key outside {self.base_url}")
        secrets = self._secrets(url)

        def attempt() -> T:
            started = time.monotonic()
            try:
                response = self.session.request(
                    method, url, json=json, timeout=self._timeout(self.timeout, deadline),
                    allow_redirects=False
                )
            except requests.RequestException as exc:
                raise classify(None, self._describe(exc, url), endpoint=endpoint) from exc
            logger.debug(
                "%s %s -> %d in %.2f s", method, endpoint, response.status_code, time.monotonic() - started
            )
            if 300 <= response.status_code < 400:
                raise self._redirected(response, endpoint)
            body = self._body(response)
            if not 200 <= response.status_code < 300 or isinstance(body, str):
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raise classify(
                    response.status_code, body, endpoint=endpoint, retry_after=retry_after, secrets=secrets
                )
            try:
                return parse(body)
            except (ValidationError, TypeError, ValueError) as exc:
                # A 2xx we cannot read: the reply was garbled on the way, so asking again is the fix.
                text = f"unexpected reply shape: {str(exc)[:300]}"
                raise classify(response.status_code, text, endpoint=endpoint, secrets=secrets) from None

        what = f"{method} {endpoint}"
        return self.retry.call(attempt, what=what, deadline=deadline, until_deadline=persist)

    def _redirected(self, response: requests.Response, endpoint: str) -> HordeError:
        """A 3xx is an error, never a hop: the key (or an upload) would follow it to wherever it points."""
        target = urljoin(response.url or "", response.headers.get("Location") or "")
        where = safe_url(target) if target else "nowhere"
        text = (f"answered {response.status_code} redirecting to {where}: not followed (the api key and "
                f"results go to {self.base_url} only; check horde_url if the horde has moved)")
        logger.warning("%s %s", endpoint, server_text(text, self._secrets(target)))
        return classify(response.status_code, text, endpoint=endpoint, secrets=self._secrets(target))

    @staticmethod
    def _timeout(limit: float, deadline: float | None) -> float:
        """One attempt's timeout: no later than the deadline, but long enough to get an answer at all."""
        if deadline is None:
            return limit
        return max(min(limit, 1.0), min(limit, deadline - time.monotonic()))

    def _secrets(self, url: str | None = None) -> list[str]:
        return [self._api_key, *url_secrets(url)]

    def _body(self, response: requests.Response) -> Any:
        """The JSON body, or its text when the body is not JSON (classify sanitises it)."""
        try:
            return response.json()
        except ValueError:
            return response.text[:1000]

    def _describe(self, exc: BaseException, url: str) -> str:
        return server_text(f"{type(exc).__name__}: {exc}", self._secrets(url))


def _model(model: type[M]) -> Callable[[Any], M]:
    def parse(body: Any) -> M:
        if not isinstance(body, dict):
            raise TypeError(f"expected a JSON object, got {type(body).__name__}")
        return model.model_validate(body)

    return parse


def _dict(body: Any) -> dict:
    if isinstance(body, dict):
        return body
    if isinstance(body, list):
        # stats endpoints have answered with lists in some versions; keep the data rather than fail.
        return {"items": body}
    raise TypeError(f"expected a JSON object, got {type(body).__name__}")
