"""A real HTTP stand-in of the AI Horde (API v5.1.5) on 127.0.0.1, shared by tests, benchmarks and the demo.

    with LocalHorde(known_models=["tiny-sd1"]) as horde:
        rid = horde.request_generation({"steps": 2, "width": 64, "height": 64}, models=["tiny-sd1"])
        ...  # a worker pops from horde.base_url (routes under /api/v2) with DEFAULT_API_KEY ("local#1")
        status = horde.wait_done([rid])[rid]
        image = horde.download(status["generations"][0]["img"])
        assert horde.accounting().unfinished() == []

Worker endpoints follow /work/shared/horde-api.md: both validation layers, the rc errors, ttl expiry and
requeues, bridge_agent capabilities (an unknown bridge name gets none: no r2, no r2_source, skipped
img2img/post-processing...). Requester helpers (`request_generation`, `request_interrogation`, `host_image`,
`generation_status`, `interrogation_status`, `wait_done`, `download`) go over real HTTP and are never
faulted. `GET /api/swagger.json` publishes the accepted form and post-processor names (swagger.py);
`horde.set_alchemy_forms(...)` withdraws or adds form names while running. `horde.faults` (see faults.py)
injects 5xx, 429, hangs, drops, malformed bodies, latency, an upload bandwidth cap and forced expiry, and the
hostile kinds: redirects, trickled headers, HTML error pages, errors echoing the api key, wrong-type fields,
moderator messages and over-delivered pops; `horde.expire(id)` aborts a job now. `RecordingHost`
(elsewhere.py) is another origin that records what reaches it. `python -m local_horde` runs one.
"""

from local_horde.elsewhere import RecordingHost, SeenRequest
from local_horde.faults import (
    CORRUPT_IMAGE_BYTES,
    Fault,
    FaultInjector,
    FaultKind,
    huge_image_bytes,
)
from local_horde.horde import DEFAULT_API_KEY, LocalHorde
from local_horde.state import ANON_API_KEY, Accounting

__all__ = [
    "ANON_API_KEY",
    "CORRUPT_IMAGE_BYTES",
    "RecordingHost",
    "SeenRequest",
    "DEFAULT_API_KEY",
    "Accounting",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "LocalHorde",
    "huge_image_bytes",
]
