"""A fresh local horde per test (it starts in milliseconds) and a thin worker-side HTTP client."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from local_horde import DEFAULT_API_KEY, LocalHorde

REGEN = "AI Horde Worker reGen:10.0.0:https://github.com/Haidra-Org/horde-worker-reGen"
UNKNOWN_BRIDGE = "my-own-bridge:1.0.0:https://example.org"
MODELS = ("stable_diffusion", "tiny-sd1", "tiny-inpainting")


def webp(color: str = "red", size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="WEBP")
    return buf.getvalue()


class WorkerClient:
    """What a worker does on the wire: JSON over requests with the apikey header."""

    def __init__(
        self, horde: LocalHorde, api_key: str = DEFAULT_API_KEY, name: str = "test-worker", agent: str = REGEN
    ) -> None:
        self.url = horde.api_url
        self.name = name
        self.agent = agent
        self.session = requests.Session()
        self.session.headers["apikey"] = api_key

    def post(self, route: str, body: Any, **kw: Any) -> requests.Response:
        return self.session.post(self.url + route, json=body, timeout=kw.pop("timeout", 5), **kw)

    def pop_raw(self, timeout: float = 5, **body: Any) -> requests.Response:
        body = {"name": self.name, "bridge_agent": self.agent, "models": ["tiny-sd1"], **body}
        return self.post("/generate/pop", body, timeout=timeout)

    def pop(self, **body: Any) -> dict[str, Any]:
        resp = self.pop_raw(**body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def submit(self, job_id: str, seed: int = 1, timeout: float = 5, **body: Any) -> requests.Response:
        body = {"id": job_id, "generation": "R2", "state": "ok", "seed": seed, **body}
        return self.post("/generate/submit", body, timeout=timeout)

    def ipop(self, forms: list[str], **body: Any) -> dict[str, Any]:
        resp = self.post(
            "/interrogate/pop",
            {"name": self.name + "-alchemist", "bridge_agent": self.agent, "forms": forms, **body},
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    def isubmit(self, job_id: str, result: Any, **body: Any) -> requests.Response:
        return self.post("/interrogate/submit", {"id": job_id, "result": result, **body})


@pytest.fixture
def horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=MODELS) as h:
        yield h


@pytest.fixture
def worker(horde: LocalHorde) -> WorkerClient:
    return WorkerClient(horde)


def small_params(**kw: Any) -> dict[str, Any]:
    return {"steps": 2, "width": 64, "height": 64, **kw}
