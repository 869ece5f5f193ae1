"""A CivitAI-like API beside the local horde, under `/civitai` on the same server.

    GET /civitai/api/v1/models?types=LORA&query=NAME&sort=...&limit=N&nsfw=false
    GET /civitai/api/v1/models/{id}
    GET /civitai/api/v1/model-versions/{id}
    GET /civitai/api/download/models/{version_id}[?token=...]   (Range requests answered with 206)

The JSON has the fields CivitAI sends that workers read (model `id`, `name`, `type`, `nsfw`, `modelVersions`;
version `id`, `modelId`, `baseModel`, `trainedWords`, `files[]` with `name`, `primary`, `sizeKB`,
`hashes.SHA256`, `downloadUrl`). On demand (`set_download_fault`): a version's download answers 451
(geo-blocked), 401, a redirect to a login page, a wrong body (sha256 mismatch), or 500 a number of times; a
download can also be cut after some bytes once (to exercise resuming). `requests` records every call.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

PREFIX = "/civitai"


@dataclass
class _Version:
    id: int
    model_id: int
    base_model: str
    trained_words: list[str]
    file_name: str
    data: bytes
    sha256: str


@dataclass
class _Model:
    id: int
    name: str
    kind: str
    nsfw: bool
    versions: list[_Version] = field(default_factory=list)  # newest first
    rating: int = 0


@dataclass
class CivitaiAnswer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class CivitaiStandIn:
    def __init__(self) -> None:
        self.base_url = ""
        self._models: dict[int, _Model] = {}
        self._versions: dict[int, _Version] = {}
        self._faults: dict[int, tuple[str, int]] = {}  # version id -> (kind, remaining times; -1 forever)
        self._cut_after: dict[int, int] = {}
        self._metadata_faults: dict[str, tuple[int, int]] = {}
        self.require_token: str | None = None
        self.requests: list[tuple[str, str]] = []  # (path, query)
        self._lock = threading.Lock()

    # --- publishing -----------------------------------------------------------------------------------------

    def add_model(
        self,
        *,
        model_id: int,
        version_id: int,
        name: str,
        kind: str,
        base_model: str,
        data: bytes,
        file_name: str,
        trained_words: list[str] | None = None,
        nsfw: bool = False,
    ) -> None:
        """Publish a model version (a new version of a known model becomes its latest)."""
        version = _Version(
            version_id,
            model_id,
            base_model,
            list(trained_words or []),
            file_name,
            data,
            hashlib.sha256(data).hexdigest(),
        )
        with self._lock:
            model = self._models.setdefault(
                model_id, _Model(model_id, name, kind, nsfw, rating=-len(self._models))
            )
            model.versions.insert(0, version)
            self._versions[version_id] = version

    def set_download_fault(self, version_id: int, kind: str, times: int = -1) -> None:
        """kind: "451", "401", "403", "404", "login", "corrupt" or "500"; `times` -1 means every time."""
        with self._lock:
            self._faults[version_id] = (kind, times)

    def cut_download_once(self, version_id: int, after_bytes: int) -> None:
        with self._lock:
            self._cut_after[version_id] = after_bytes

    def set_metadata_fault(self, path_part: str, status: int, times: int = -1) -> None:
        """Requests whose path contains `path_part` answer `status` (e.g. 500, 451)."""
        with self._lock:
            self._metadata_faults[path_part] = (status, times)

    def calls(self, part: str) -> int:
        with self._lock:
            return sum(1 for path, _ in self.requests if part in path)

    # --- answering ------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: dict[str, str]) -> CivitaiAnswer | None:
        """The answer, or None: the connection is to be dropped (a cut download)."""
        with self._lock:
            self.requests.append((path, query))
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "method not allowed"})
        route = path[len(PREFIX) :]
        args = {k: v[0] for k, v in parse_qs(query).items()}
        fault = self._take_metadata_fault(route)
        if fault:
            return _json(fault, {"error": f"HTTP {fault}"})
        if route.startswith("/api/download/models/"):
            return self._download(route.rsplit("/", 1)[-1], args, headers)
        if route == "/api/v1/models":
            return self._search(args)
        if route.startswith("/api/v1/models/"):
            model = self._models.get(_int(route.rsplit("/", 1)[-1]))
            return _json(200, self._model_json(model)) if model else _json(404, {"error": "No model with id"})
        if route.startswith("/api/v1/model-versions/"):
            version = self._versions.get(_int(route.rsplit("/", 1)[-1]))
            if version is None:
                return _json(404, {"error": "Version not found"})
            model = self._models[version.model_id]
            body = {
                **self._version_json(version),
                "model": {"name": model.name, "type": model.kind, "nsfw": model.nsfw},
            }
            return _json(200, body)
        if route.startswith("/login"):
            return CivitaiAnswer(200, b"<html>Sign in</html>", "text/html")
        return _json(404, {"error": "not found"})

    def _take_metadata_fault(self, route: str) -> int | None:
        with self._lock:
            for part, (status, times) in list(self._metadata_faults.items()):
                if part in route and not route.startswith("/api/download/"):
                    if times > 0:
                        self._metadata_faults[part] = (status, times - 1)
                    if times == 1:
                        del self._metadata_faults[part]
                    return status
        return None

    def _search(self, args: dict[str, str]) -> CivitaiAnswer:
        types = args.get("types")
        query = (args.get("query") or "").lower()
        limit = _int(args.get("limit")) if _int(args.get("limit")) > 0 else 20
        models = sorted(self._models.values(), key=lambda m: -m.rating)
        items = [
            self._model_json(m)
            for m in models
            if (not types or m.kind == types)
            and (not query or query in m.name.lower())
            and not (args.get("nsfw") == "false" and m.nsfw)
        ]
        return _json(200, {"items": items[:limit], "metadata": {"totalItems": len(items)}})

    def _model_json(self, model: _Model) -> dict[str, Any]:
        return {
            "id": model.id,
            "name": model.name,
            "type": model.kind,
            "nsfw": model.nsfw,
            "modelVersions": [self._version_json(v) for v in model.versions],
        }

    def _version_json(self, version: _Version) -> dict[str, Any]:
        return {
            "id": version.id,
            "modelId": version.model_id,
            "name": f"v{version.id}",
            "baseModel": version.base_model,
            "trainedWords": version.trained_words,
            "files": [
                {
                    "name": version.file_name,
                    "primary": True,
                    "sizeKB": len(version.data) / 1024,
                    "type": "Model",
                    "hashes": {"SHA256": version.sha256.upper()},
                    "downloadUrl": f"{self.base_url}{PREFIX}/api/download/models/{version.id}",
                }
            ],
        }

    def _download(self, raw_id: str, args: dict[str, str], headers: dict[str, str]) -> CivitaiAnswer | None:
        version = self._versions.get(_int(raw_id))
        if version is None:
            return _json(404, {"error": "File not found"})
        fault = self._take_fault(version.id)
        if fault in ("451", "401", "403", "404", "500"):
            return _json(int(fault), {"error": f"HTTP {fault}"})
        if fault == "login" or (self.require_token and args.get("token") != self.require_token):
            where = f"{self.base_url}{PREFIX}/login?returnUrl=/models&reason=download-auth"
            return CivitaiAnswer(307, b"", "text/plain", {"Location": where})
        data = hashlib.sha256(version.data).digest() * 4 if fault == "corrupt" else version.data
        start = _range_start(headers.get("range", ""))
        if start is not None and start >= len(data):
            return CivitaiAnswer(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
        with self._lock:
            cut = self._cut_after.pop(version.id, None)
        if start:
            headers_out = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return CivitaiAnswer(206, data[start:], "application/octet-stream", headers_out)
        if cut is not None:
            return CivitaiAnswer(
                200, data[:cut], "application/octet-stream", {"X-Declared-Length": str(len(data))}
            )
        return CivitaiAnswer(
            200,
            data,
            "application/octet-stream",
            {"Content-Disposition": f'attachment; filename="{version.file_name}"'},
        )

    def _take_fault(self, version_id: int) -> str | None:
        with self._lock:
            entry = self._faults.get(version_id)
            if entry is None:
                return None
            kind, times = entry
            if times > 0:
                if times == 1:
                    del self._faults[version_id]
                else:
                    self._faults[version_id] = (kind, times - 1)
            return kind


def _json(status: int, payload: Any) -> CivitaiAnswer:
    import json

    return CivitaiAnswer(status, json.dumps(payload).encode())


def _int(text: str | None) -> int:
    try:
        return int(text or "")
    except ValueError:
        return -1


def _range_start(header: str) -> int | None:
    if not header.startswith("bytes="):
        return None
    first = header[len("bytes=") :].split("-", 1)[0]
    return int(first) if first.isdigit() else None
