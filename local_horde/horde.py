"""LocalHorde: the server's lifecycle, test accounting, and requester helpers that go over real HTTP."""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import requests

from local_horde.alchemy import AlchemyQueue
from local_horde.api import HordeApi
from local_horde.civitai import CivitaiStandIn
from local_horde.faults import FaultInjector
from local_horde.generation import GenerationQueue
from local_horde.server import BYPASS_HEADER, HordeTransport, make_server
from local_horde.state import Accounting, Registry

logger = logging.getLogger(__name__)

# 22 url-safe characters, like a real horde key (horde-sdk insists on that length).
DEFAULT_API_KEY = "LocalHordeTestKey01_ab"
REQUESTER_TIMEOUT_S = 10.0


class LocalHorde:
    """A real HTTP stand-in of the AI Horde (v5.1.5) on 127.0.0.1. Use as a context manager."""

    def __init__(
        self,
        *,
        known_models: Iterable[str] = ("stable_diffusion",),
        api_key: str = DEFAULT_API_KEY,
        job_ttl: float | None = None,
        form_ttl: float = 180.0,
        port: int = 0,
        extra_latency_s: float = 0.0,
        fault_seed: int = 0,
        extra_bridges: Mapping[str, str] | None = None,
        alchemy_forms: Sequence[str] | None = None,
    ) -> None:
        """`known_models`: names, or a mapping name -> baseline ("stable_diffusion_xl", "flux_1", ...).
        `extra_bridges`: custom bridge names granted a known bridge's capabilities, e.g.
        `{"my-bridge": "AI Horde Worker reGen"}` (else an unknown name gets none, as on the real horde).
        `alchemy_forms`: the form names this server accepts and lists in /api/swagger.json (default: the
        real server's); `set_alchemy_forms` changes them while running (a server upgrade or withdrawal).
        """
        self.api_key = api_key
        self.registry = Registry(api_key, extra_bridges)
        self.generations = GenerationQueue(self.registry, known_models, job_ttl)
        self.alchemy = AlchemyQueue(self.registry, form_ttl)
        if alchemy_forms is not None:
            self.alchemy.set_forms(alchemy_forms)
        self.api = HordeApi(self.registry, self.generations, self.alchemy)
        self.faults = FaultInjector(seed=fault_seed, latency_s=extra_latency_s)
        # A CivitAI-like API under /civitai on the same server (LoRA and TI downloads).
        self.civitai = CivitaiStandIn()
        self._transport = HordeTransport(self.api, self.registry.store, self.faults, self.civitai)
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self._session = requests.Session()
        self._session.headers[BYPASS_HEADER] = "1"

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> LocalHorde:
        if self._server is not None:
            return self
        self._transport.stopping.clear()
        self._server = make_server(self._port, self._transport)
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.registry.store.base_url = self.base_url
        self.civitai.base_url = self.base_url
        self._transport.node = f"localhost:{port}:5.1.5"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"local-horde-{port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("local horde listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._transport.stopping.set()  # wakes injected hangs and latency sleeps
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._session.close()

    def __enter__(self) -> LocalHorde:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/v2"

    @property
    def civitai_url(self) -> str:
        """The CivitAI stand-in's base (what `civitai_url` in a worker's config points at)."""
        return self.base_url + "/civitai"

    # ---- test accounting and control ---------------------------------------------------------------------
    def submits(self, job_id: str) -> list[dict]:
        """Every submit body received for that id, in order (also rejected ones)."""
        with self.registry.lock:
            return [dict(b) for b in self.registry.accounting.submits.get(job_id, [])]

    def accounting(self) -> Accounting:
        """A snapshot: ids handed out, submits per id, drops, requeues, rewards."""
        with self.registry.lock:
            return self.registry.accounting.snapshot()

    def set_alchemy_forms(self, forms: Sequence[str]) -> None:
        """Accept (and publish in /api/swagger.json) exactly these form names from now on."""
        with self.registry.lock:
            self.alchemy.set_forms(forms)

    def swagger(self) -> dict[str, Any]:
        """The published API description, fetched over HTTP like a worker would."""
        response = self._session.get(self.base_url + "/api/swagger.json", timeout=REQUESTER_TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def add_user(self, alias: str, api_key: str | None = None, *, moderator: bool = False) -> str:
        """Register another user (e.g. to test WrongCredentials); returns its api key."""
        key = api_key or secrets.token_urlsafe(16)[:22]
        with self.registry.lock:
            self.registry.add_user(alias, key).moderator = moderator
        return key

    def expire(self, job_id: str | None = None) -> list[str]:
        """Abort processing jobs now as the ttl reaper would (AbortedGen on submit); requeues them."""
        with self.registry.lock:
            return self.generations.expire(job_id) + self.alchemy.expire(job_id)

    def set_model_stats(self, stats: dict[str, dict[str, int]]) -> None:
        """Seed /stats/img/models (`{"day": {...}, "month": {...}, "total": {...}}`), e.g. for TOP n."""
        with self.registry.lock:
            self.api.seeded_model_stats = {k: dict(v) for k, v in stats.items()}

    def worker_details(self, name: str) -> dict[str, Any] | None:
        with self.registry.lock:
            worker = self.registry.worker_by_name(name)
            return worker.details() if worker else None

    # ---- requester helpers (real HTTP) -------------------------------------------------------------------
    def _call(self, method: str, route: str, *, api_key: str | None = None, **kw: Any) -> Any:
        resp = self._session.request(
            method,
            self.api_url + route,
            headers={"apikey": api_key or self.api_key},
            timeout=REQUESTER_TIMEOUT_S,
            **kw,
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"local horde {method} {route}: {resp.status_code} {resp.text}")
        return resp.json()

    def request_generation(
        self,
        params: dict[str, Any] | None = None,
        *,
        prompt: str = "a photo of a cat",
        models: Sequence[str] | None = None,
        n: int | None = None,
        source_image: bytes | str | None = None,
        source_mask: bytes | str | None = None,
        source_processing: str | None = None,
        api_key: str | None = None,
        **body: Any,
    ) -> str:
        """POST /generate/async; `source_image`/`source_mask` as raw bytes (sent base64) or a URL."""
        params = dict(params or {})
        if n is not None:
            params["n"] = n
        payload: dict[str, Any] = {"prompt": prompt, "params": params, **body}
        if models is not None:
            payload["models"] = list(models)
        for name, value in (("source_image", source_image), ("source_mask", source_mask)):
            if value is not None:
                payload[name] = value if isinstance(value, str) else base64.b64encode(value).decode()
        if source_processing is not None:
            payload["source_processing"] = source_processing
        return self._call("POST", "/generate/async", json=payload, api_key=api_key)["id"]

    def generation_status(self, request_id: str) -> dict[str, Any]:
        return self._call("GET", f"/generate/status/{request_id}")

    def request_interrogation(
        self, source_image: str | bytes, forms: Sequence[str | dict[str, Any]], *, api_key: str | None = None
    ) -> str:
        """POST /interrogate/async; forms as names or `{"name", "payload"}` dicts."""
        form_list = [{"name": f} if isinstance(f, str) else dict(f) for f in forms]
        source = source_image if isinstance(source_image, str) else base64.b64encode(source_image).decode()
        body = {"source_image": source, "forms": form_list}
        return self._call("POST", "/interrogate/async", json=body, api_key=api_key)["id"]

    def interrogation_status(self, request_id: str) -> dict[str, Any]:
        return self._call("GET", f"/interrogate/status/{request_id}")

    def host_image(self, data: bytes, name: str | None = None) -> str:
        """Serve bytes (a real image, corrupt bytes, a huge PNG...) from the store; returns a GET URL."""
        key = f"hosted/{name or secrets.token_hex(8)}"
        self.registry.store.put(key, data)
        return self.registry.store.presign("GET", key)

    def download(self, url: str) -> bytes:
        resp = self._session.get(url, timeout=REQUESTER_TIMEOUT_S)
        resp.raise_for_status()
        return resp.content

    def is_done(self, request_id: str) -> tuple[bool, dict[str, Any]]:
        if request_id in self.alchemy.requests:
            status = self.interrogation_status(request_id)
            return status["state"] in ("done", "faulted", "partial"), status
        status = self.generation_status(request_id)
        return bool(status["done"] or status["faulted"]), status

    def wait_done(
        self, ids: Iterable[str], timeout: float = 30.0, poll: float = 0.05
    ) -> dict[str, dict[str, Any]]:
        """Poll until every request (generation or interrogation) is finished; their final status by id."""
        pending, done = list(ids), {}
        deadline = time.monotonic() + timeout
        while pending:
            for rid in list(pending):
                finished, status = self.is_done(rid)
                if finished:
                    done[rid] = status
                    pending.remove(rid)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"local horde requests not done after {timeout}s: {pending}")
                time.sleep(poll)
        return done
