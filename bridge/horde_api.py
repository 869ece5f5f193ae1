"""HordeClient: the worker's side of the AI Horde API v2 (see /work/shared/horde-api.md).

One `requests.Session` carries the `apikey` and `Client-Agent` headers for every horde call. R2 uploads go
through a second, header-less session: a presigned URL belongs to a third party, and the key must never
travel there. Every failure becomes a `bridge.errors.HordeError` subclass; RETRY-policy errors are retried
here by the one RetryPolicy, the rest are raised for the caller to act on.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

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
from bridge.errors import MaintenanceError, classify, mask_key, redact
from bridge.retry import RetryPolicy

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
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


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
        return self._pop("generate/pop", request, GenerationPopResponse)

    def submit_generation(self, submit: GenerationSubmit) -> float:
        reply = self._call("POST", "generate/submit", json=submit.body(), parse=_model(SubmitResponse))
        return reply.reward

    def pop_interrogation(self, request: InterrogationPopRequest) -> InterrogationPopResponse:
        return self._pop("interrogate/pop", request, InterrogationPopResponse)

    def submit_interrogation(self, submit: InterrogationSubmit) -> float:
        reply = self._call("POST", "interrogate/submit", json=submit.body(), parse=_model(SubmitResponse))
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

    def upload(self, url: str, data: bytes) -> None:
        """PUT raw bytes to a presigned R2 URL. No Content-Type: it is not part of the signature, and a
        header the signer did not expect can make the store refuse the request."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise classify(
                400, f"refusing to upload to a non-http(s) URL {safe_url(url)!r}", endpoint="upload"
            )

        def attempt() -> None:
            try:
                response = self._upload_session.put(url, data=data, timeout=self.upload_timeout)
            except requests.RequestException as exc:
                raise classify(None, self._describe(exc, url), endpoint="upload") from exc
            if not 200 <= response.status_code < 300:
                raise classify(
                    response.status_code,
                    self._clean(response.text[:300], url),
                    endpoint="upload",
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                )

        started = time.monotonic()
        self.retry.call(attempt, what=f"upload to {urlsplit(url).netloc}")
        logger.debug(
            "uploaded %d bytes to %s in %.2f s", len(data), safe_url(url), time.monotonic() - started
        )

    # ---- plumbing ------------------------------------------------------------------------------------
    def _pop(self, endpoint: str, request: BaseModel, reply: type[M]) -> M:
        try:
            popped = self._call("POST", endpoint, json=request.model_dump(mode="json"), parse=_model(reply))
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
        root: str = "api/v2",
    ) -> T:
        endpoint = endpoint or path
        url = f"{self.base_url}/{root}/{path}"

        def attempt() -> T:
            started = time.monotonic()
            try:
                response = self.session.request(method, url, json=json, timeout=self.timeout)
            except requests.RequestException as exc:
                raise classify(None, self._describe(exc, url), endpoint=endpoint) from exc
            logger.debug(
                "%s %s -> %d in %.2f s", method, endpoint, response.status_code, time.monotonic() - started
            )
            body = self._body(response)
            if not 200 <= response.status_code < 300 or isinstance(body, str):
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raise classify(response.status_code, body, endpoint=endpoint, retry_after=retry_after)
            try:
                return parse(body)
            except (ValidationError, TypeError, ValueError) as exc:
                # A 2xx we cannot read: the reply was garbled on the way, so asking again is the fix.
                text = self._clean(f"unexpected reply shape: {str(exc)[:300]}", url)
                raise classify(response.status_code, text, endpoint=endpoint) from None

        return self.retry.call(attempt, what=f"{method} {endpoint}")

    def _body(self, response: requests.Response) -> Any:
        """The JSON body, or the (cleaned) text when the body is not JSON."""
        try:
            return response.json()
        except ValueError:
            return self._clean(response.text[:1000], response.url or "")

    def _clean(self, text: str, url: str) -> str:
        text = redact(text, self._api_key)
        query = urlsplit(url).query
        return text.replace(query, "…") if query else text

    def _describe(self, exc: BaseException, url: str) -> str:
        return self._clean(f"{type(exc).__name__}: {exc}", url)


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
