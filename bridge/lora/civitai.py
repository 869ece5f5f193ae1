"""The CivitAI API as the worker uses it: a LoRA or TI named in a job -> one model version and its file.

Resolution (what the peers do): a numeric name is a model id (`/api/v1/models/{id}`, its latest version); with
`is_version` it is a version id (`/api/v1/model-versions/{id}`, then its model for the name and nsfw flag);
anything else is searched among LORA (or TextualInversion) models, highest rated first, an exact name match
preferred. Read: the model's name, id, nsfw; the version's id, `trainedWords`, `baseModel`; its primary
`.safetensors` file's `downloadUrl`, `sizeKB`, `hashes.SHA256`.

Better than the peers at what volunteers complain about:
* metadata is cached on disk, so a name resolves the same way offline and without a request the next time;
* 401/403/404/451 and redirects to a login page are final at once, and remembered for an hour, so no job
  waits on them again; only 5xx, 429 and network errors are retried, and only while the job's ttl allows;
* repeated transient failures put CivitAI "down" for a while (`reachable()`), which the pop flag follows.
The API token goes on download URLs only, never on metadata requests, and is never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import requests

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://civitai.com"
MODEL_TYPES = {"lora": ("LORA", "LoCon", "DoRA"), "ti": ("TextualInversion",)}
SEARCH_TYPE = {"lora": "LORA", "ti": "TextualInversion"}
FINAL_STATUSES = frozenset({401, 403, 404, 451})
FINAL_MEMORY_S = 3600.0  # how long a final answer is remembered
METADATA_MAX_AGE_S = 24 * 3600.0  # cached metadata younger than this is used without asking again
FAILURES_BEFORE_BACKOFF = 3
BACKOFF_S = 600.0
_MAX_DELAY_S = 8.0
_TOKEN = re.compile(r"(token=)[^&\s'\"]+")


def redact(text: str) -> str:
    """`text` with any `token=...` query value masked."""
    return _TOKEN.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """Masks `token=` values in log records (download URLs carry the CivitAI token)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = redact(message), None
        return True


class CivitaiError(Exception):
    """Resolution or download failed. `final`: asking again will not help (for a while at least)."""

    def __init__(self, message: str, *, final: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.final = final
        self.status = status


class LoginRequired(Exception):
    """CivitAI answered a download with a redirect to its login page: the file needs an account or token.
    Not a requests exception on purpose: nothing between here and the caller retries it."""


@dataclass(frozen=True)
class Resolved:
    """One version of a CivitAI model, as much as the worker needs of it."""

    kind: str  # "lora" | "ti"
    model_id: int
    version_id: int
    name: str
    nsfw: bool
    base_model: str
    trained_words: tuple[str, ...]
    url: str
    size_bytes: int
    sha256: str
    file_name: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "trained_words": list(self.trained_words)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resolved:
        return cls(**{**data, "trained_words": tuple(data.get("trained_words") or ())})


def _triggers(words: Any) -> tuple[str, ...]:
    """trainedWords without empties; A1111-style `<lora:name:1>` entries become `name` (as the peers do)."""
    out = []
    for word in words or []:
        text = re.sub(r"<lora:([^:>]*)(:[^>]*)?>", r"\1", str(word)).strip()
        if text:
            out.append(text)
    return tuple(out)


def parse_version(kind: str, model: dict[str, Any], version: dict[str, Any]) -> Resolved:
    """A model (name, id, nsfw) and one of its versions -> Resolved; CivitaiError(final) if it has no usable
    primary .safetensors file with a sha256."""
    name = str(model.get("name") or version.get("name") or "")
    files = [f for f in version.get("files") or [] if str(f.get("name", "")).lower().endswith(".safetensors")]
    primary = next((f for f in files if f.get("primary")), files[0] if files else None)
    if primary is None:
        raise CivitaiError(
            f"{kind} {name!r} version {version.get('id')} has no .safetensors file", final=True
        )
    sha256 = str((primary.get("hashes") or {}).get("SHA256") or "").lower()
    url = str(primary.get("downloadUrl") or "")
    if not sha256 or not url:
        raise CivitaiError(f"{kind} {name!r} has no sha256 or download URL: not downloaded", final=True)
    try:
        size = int(float(primary.get("sizeKB") or 0) * 1024)
    except (TypeError, ValueError):
        size = 0
    return Resolved(
        kind=kind,
        model_id=int(model.get("id") or version.get("modelId") or 0),
        version_id=int(version.get("id") or 0),
        name=name,
        nsfw=bool(model.get("nsfw", False)),
        base_model=str(version.get("baseModel") or ""),
        trained_words=_triggers(version.get("trainedWords")),
        url=url,
        size_bytes=size,
        sha256=sha256,
        file_name=str(primary.get("name")),
    )


class CivitaiClient:
    def __init__(
        self,
        base_url: str,
        cache_dir: Path,
        *,
        token: str | None = None,
        nsfw: bool = True,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 20.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.nsfw = nsfw
        self._cache_dir = Path(cache_dir)
        self._session = session
        self._local = threading.local()
        self._clock = clock
        self._sleep = sleep
        self._timeout = timeout
        self._final: dict[str, tuple[float, CivitaiError]] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._down_until = 0.0
        self.requests = 0  # metadata requests sent (tests check there is no retry storm)

    # --- health -------------------------------------------------------------------------------------------

    def reachable(self) -> bool:
        """False for a while after repeated transient failures."""
        return self._clock() >= self._down_until

    def note_success(self) -> None:
        with self._lock:
            self._failures = 0

    def note_failure(self, why: str) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= FAILURES_BEFORE_BACKOFF and self.reachable():
                self._down_until = self._clock() + BACKOFF_S
                logger.warning(
                    "CivitAI failed %d times in a row (last: %s): not asking for LoRA jobs for %.0f minutes",
                    self._failures,
                    redact(why),
                    BACKOFF_S / 60,
                )

    # --- final answers ------------------------------------------------------------------------------------

    def remember_final(self, key: str, error: CivitaiError) -> None:
        with self._lock:
            self._final[key] = (self._clock() + FINAL_MEMORY_S, error)

    def remembered(self, key: str) -> CivitaiError | None:
        with self._lock:
            entry = self._final.get(key)
            if entry is None:
                return None
            if entry[0] < self._clock():
                del self._final[key]
                return None
            return entry[1]

    # --- resolution ---------------------------------------------------------------------------------------

    def resolve(
        self, kind: str, name: str, *, is_version: bool = False, deadline: float | None = None
    ) -> Resolved:
        """The version a job's LoRA/TI name means. Raises CivitaiError."""
        name = str(name).strip()
        how = "version" if is_version else ("id" if name.isdigit() else "name")
        key = f"{kind}:{how}:{name.lower()}"
        remembered = self.remembered(key)
        if remembered is not None:
            raise CivitaiError(f"{remembered} (remembered)", final=True, status=remembered.status)
        cached, fresh = self._cached(key)
        if cached is not None and fresh:
            return cached
        try:
            resolved = self._lookup(kind, how, name, deadline)
        except CivitaiError as exc:
            if exc.final:
                self.remember_final(key, exc)
            elif cached is not None:
                logger.info("CivitAI unreachable (%s): using the cached metadata of %s %r", exc, kind, name)
                return cached
            raise
        self._store(key, resolved)
        return resolved

    def _lookup(self, kind: str, how: str, name: str, deadline: float | None) -> Resolved:
        if how == "version":
            if not name.isdigit():
                raise CivitaiError(f"{kind} version {name!r} is not a number", final=True)
            version = self.get_json(f"/api/v1/model-versions/{name}", deadline)
            model = version.get("model") or {}
            if "nsfw" not in model or "name" not in model:
                model = self.get_json(f"/api/v1/models/{version.get('modelId')}", deadline)
            model = {**model, "id": version.get("modelId", model.get("id"))}
            self._check_type(kind, model, name)
            return parse_version(kind, model, version)
        if how == "id":
            model = self.get_json(f"/api/v1/models/{name}", deadline)
        else:
            model = self._search(kind, name, deadline)
        self._check_type(kind, model, name)
        versions = model.get("modelVersions") or []
        if not versions:
            raise CivitaiError(f"{kind} {name!r} has no versions", final=True)
        return parse_version(kind, model, versions[0])

    def _search(self, kind: str, name: str, deadline: float | None) -> dict[str, Any]:
        params = {
            "types": SEARCH_TYPE[kind],
            "query": name,
            "sort": "Highest Rated",
            "limit": 20,
            "primaryFileOnly": "true",
        }
        if not self.nsfw:
            params["nsfw"] = "false"
        items = self.get_json(f"/api/v1/models?{urlencode(params, quote_via=quote)}", deadline).get("items")
        items = [i for i in items or [] if isinstance(i, dict)]
        if not items:
            raise CivitaiError(f"no {SEARCH_TYPE[kind]} named {name!r} on CivitAI", final=True, status=404)
        exact = [i for i in items if str(i.get("name", "")).strip().lower() == name.lower()]
        return (exact or items)[0]

    @staticmethod
    def _check_type(kind: str, model: dict[str, Any], name: str) -> None:
        kind_of = model.get("type")
        if kind_of and kind_of not in MODEL_TYPES[kind]:
            raise CivitaiError(
                f"CivitAI model {name!r} is a {kind_of}, not a {SEARCH_TYPE[kind]}", final=True
            )

    def top(self, kind: str, limit: int, deadline: float | None = None) -> list[Resolved]:
        """The highest rated models of a kind (what a fresh worker pre-fetches), SFW ones on an SFW worker."""
        params = {
            "types": SEARCH_TYPE[kind],
            "sort": "Highest Rated",
            "limit": limit,
            "primaryFileOnly": "true",
        }
        if not self.nsfw:
            params["nsfw"] = "false"
        items = self.get_json(f"/api/v1/models?{urlencode(params, quote_via=quote)}", deadline).get("items")
        out = []
        for item in items or []:
            try:
                out.append(parse_version(kind, item, (item.get("modelVersions") or [{}])[0]))
            except CivitaiError as exc:
                logger.debug("skipping %s: %s", item.get("name"), exc)
        return out

    def download_url(self, resolved: Resolved) -> str:
        """The file's URL, with the API token when one is configured (downloads only)."""
        if not self.token:
            return resolved.url
        return f"{resolved.url}{'&' if '?' in resolved.url else '?'}token={quote(self.token, safe='')}"

    # --- HTTP ---------------------------------------------------------------------------------------------

    def get_json(self, path: str, deadline: float | None) -> dict[str, Any]:
        """GET with retries of transient errors while the deadline allows; final statuses raise at once."""
        url = self.base_url + path
        attempt = 0
        while True:
            try:
                return self._get_once(url, deadline)
            except CivitaiError as exc:
                if exc.final:
                    raise
                delay = min(_MAX_DELAY_S, 0.5 * 2**attempt)
                if deadline is None or self._clock() + delay >= deadline:
                    self.note_failure(str(exc))
                    raise
                logger.info("CivitAI %s failed (%s); retrying in %.1f s", path, exc, delay)
                self._sleep(delay)
                attempt += 1

    def _http(self) -> requests.Session:
        if self._session is not None:
            return self._session
        # requests.Session is not documented as thread-safe, and jobs resolve in their own threads.
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _get_once(self, url: str, deadline: float | None) -> dict[str, Any]:
        self.requests += 1
        timeout = (
            self._timeout if deadline is None else min(self._timeout, max(1.0, deadline - self._clock()))
        )
        try:
            response = self._http().get(url, timeout=timeout, allow_redirects=False)
        except requests.RequestException as exc:
            raise CivitaiError(f"{type(exc).__name__}: {exc}", final=False) from exc
        status = response.status_code
        if status in FINAL_STATUSES:
            raise CivitaiError(f"HTTP {status} from CivitAI for {url}", final=True, status=status)
        if 300 <= status < 400:
            target = response.headers.get("Location", "")
            final = "login" in target or "download-auth" in target
            raise CivitaiError(f"CivitAI redirected {url} to {target or '?'}", final=final, status=status)
        if status >= 400:
            raise CivitaiError(
                f"HTTP {status} from CivitAI", final=status < 500 and status != 429, status=status
            )
        try:
            data = response.json()
        except ValueError as exc:
            raise CivitaiError("CivitAI answered something that is not JSON", final=False) from exc
        if not isinstance(data, dict):
            raise CivitaiError("CivitAI answered JSON that is not an object", final=False)
        self.note_success()
        return data

    # --- disk cache ---------------------------------------------------------------------------------------

    def _cache_file(self, key: str) -> Path:
        return self._cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.json"

    def _cached(self, key: str) -> tuple[Resolved | None, bool]:
        try:
            data = json.loads(self._cache_file(key).read_text(encoding="utf-8"))
            resolved = Resolved.from_json(data["resolved"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, False
        return resolved, time.time() - float(data.get("fetched_at", 0)) < METADATA_MAX_AGE_S

    def _store(self, key: str, resolved: Resolved) -> None:
        try:
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            target = self._cache_file(key)
            tmp = target.with_name(target.name + ".tmp")
            body = {"key": key, "fetched_at": time.time(), "resolved": resolved.to_json()}
            tmp.write_text(json.dumps(body), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            logger.warning("could not cache CivitAI metadata in %s: %s", self._cache_dir, exc)
