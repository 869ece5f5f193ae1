"""A real HTTP stand-in of the AI Horde (API v5.1.5) on 127.0.0.1, shared by tests, benchmarks and the demo.

with LocalHorde(known_models=["tiny-sd1"]) as horde:
    rid = horde.request_generation({"steps": 2}, models=["tiny-sd1"])
    ...  # a worker pops from horde.base_url with DEFAULT_API_KEY
    horde.wait_done([rid])
"""

from bridge.local_horde.faults import (
    CORRUPT_IMAGE_BYTES,
    Fault,
    FaultInjector,
    FaultKind,
    huge_image_bytes,
)
from bridge.local_horde.horde import DEFAULT_API_KEY, LocalHorde
from bridge.local_horde.state import ANON_API_KEY, Accounting

__all__ = [
    "ANON_API_KEY",
    "CORRUPT_IMAGE_BYTES",
    "DEFAULT_API_KEY",
    "Accounting",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "LocalHorde",
    "huge_image_bytes",
]
