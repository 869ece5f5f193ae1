"""bridge_agent capability negotiation: `name:version:url` -> the set of features the horde will send.

The horde grants features per bridge *name* and version; an unknown name gets none, which is how a real
worker with a custom name ends up skipped (`bridge_version`) for img2img and post-processing jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from local_horde.schema import POST_PROCESSORS_V1, POST_PROCESSORS_V13

REGEN = "AI Horde Worker reGen"
LEGACY = "AI Horde Worker"

_REGEN_V1 = {
    "img2img",
    "inpainting",
    "karras",
    "post-processing",
    *POST_PROCESSORS_V1,
    "r2",
    "r2_source",
    "clip_skip",
    "controlnet",
    "image_is_control",
    "return_control_map",
    "hires_fix",
    "tiling",
}
_V13_POST = set(POST_PROCESSORS_V13)

# version -> features added at that version (the horde takes the union of every entry <= the worker's).
BRIDGE_CAPABILITIES: dict[str, dict[int, set[str]]] = {
    REGEN: {
        1: _REGEN_V1,
        2: {"lora", "textual_inversion"},
        3: {"lora_versions"},
        5: {"extra_source_images"},
        6: {"stable_cascade_2pass"},
        7: {"qr_code", "extra_texts", "workflow"},
        8: {"layer_diffuse"},
        9: {"flux"},
        13: _V13_POST,
    },
    # The contract documents only reGen's table; the legacy and web bridges get reGen's v1 core at any
    # version, which is close enough for a stand-in (r2_source etc. are what matters to tests).
    LEGACY: {1: _REGEN_V1},
    "SD-WebUI Stable Horde Worker Bridge": {1: _REGEN_V1 - {"r2_source"}},
    "HordeAutoWebBridge": {1: _REGEN_V1},
}


@dataclass(frozen=True)
class BridgeAgent:
    name: str
    version: int
    url: str
    capabilities: frozenset[str]

    def has(self, feature: str) -> bool:
        return feature in self.capabilities


def parse_bridge_agent(agent: str | None, extra_bridges: Mapping[str, str] | None = None) -> BridgeAgent:
    """`name:semver:url`; the url may contain colons. A version that does not parse counts as 0.

    `extra_bridges` maps a custom name onto a known one (`"AI Horde Worker reGen"`: its latest version, or
    `"AI Horde Worker reGen:8"`), for demos whose worker keeps its own name but should get capabilities.
    """
    parts = (agent or "unknown:0:unknown").split(":", 2)
    name = parts[0]
    try:
        version = int((parts[1] if len(parts) > 1 else "0").strip().split(".")[0])
    except ValueError:
        version = 0
    table_name, caps_version = name, version
    if extra_bridges and name in extra_bridges:
        table_name, _, pinned = extra_bridges[name].partition(":")
        caps_version = int(pinned) if pinned else max(BRIDGE_CAPABILITIES.get(table_name, {0: set()}))
    caps: set[str] = set()
    for since, features in BRIDGE_CAPABILITIES.get(table_name, {}).items():
        if since <= caps_version:
            caps |= features
    url = parts[2] if len(parts) > 2 else ""
    return BridgeAgent(name=name, version=version, url=url, capabilities=frozenset(caps))
