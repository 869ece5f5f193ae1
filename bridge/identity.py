"""The worker's bridge identity: what `bridge_agent` means, and what the horde withholds from it.

The horde grants capabilities (img2img, inpainting, post-processing, hires fix, R2 sources...) only to the
bridge names of its bridge table (docs/bridge-capabilities.md); any other name is offered plain txt2img
and paid 0.75x. This worker sends its own name by default, because that is what it is. What the horde then
withholds is read from its own answer: an idle pop's `skipped` counts say how many waiting jobs were not
offered, and why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bridge.config import BRIDGE_NAME, RECOGNISED_BRIDGE_NAMES, bridge_agent_name

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

logger = logging.getLogger(__name__)

DOC = "docs/bridge-capabilities.md"
# skipped key -> (the job kind withheld, the config flag that would also explain it, or None)
WITHHELD_KINDS: dict[str, tuple[str, str | None]] = {
    "bridge_version": (
        "jobs needing a feature the horde grants by bridge name and version (post-processing, hires fix, "
        "tiling, clip skip, LoRA versions, some samplers...)",
        None,
    ),
    "img2img": ("img2img (jobs with a source image)", "allow_img2img"),
    "painting": ("inpainting and outpainting", "allow_painting"),
}


def is_recognised(config: BridgeConfig) -> bool:
    return bridge_agent_name(config) in RECOGNISED_BRIDGE_NAMES


def withheld(skipped: Mapping[str, object], config: BridgeConfig) -> dict[str, int]:
    """The job kinds of an idle pop's `skipped` that the horde withholds from this bridge (not skipped
    because of this worker's own settings), with their counts."""
    kinds: dict[str, int] = {}
    for key, (kind, own_flag) in WITHHELD_KINDS.items():
        try:
            count = int(skipped.get(key) or 0)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue
        if count <= 0 or (own_flag is not None and not getattr(config, own_flag)):
            continue
        kinds[kind] = count
    return kinds


class WithheldReport:
    """Logs, once per newly seen kind, what the horde's pops say it withholds from this bridge."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def observe(self, skipped: Mapping[str, object], config: BridgeConfig) -> str | None:
        kinds = withheld(skipped, config)
        new = [kind for kind in kinds if kind not in self.seen]
        if not new:
            return None
        self.seen.update(new)
        listed = "; ".join(f"{kind} ({kinds[kind]} waiting)" for kind in new)
        line = f"the horde withholds from bridge {bridge_agent_name(config)!r}: {listed}. "
        if is_recognised(config):
            line += "Your bridge_agent version may be too old for them."
        else:
            names = ", ".join(RECOGNISED_BRIDGE_NAMES)
            line += f"It grants them only to the bridge names of its table ({names}); see {DOC}"
        logger.warning("%s", line)
        return line


def bridge_agent_lines(config: BridgeConfig) -> list[str]:
    """--check-config's explanation of the bridge_agent key."""
    name = bridge_agent_name(config)
    lines = [
        f"value: {config.bridge_agent}",
        "sent in every pop as name:version:url; the horde decides from the name and version which jobs it "
        "offers this worker (its bridge table) and pays 1x / 0.9x (an older version) to the names it knows",
    ]
    if name == BRIDGE_NAME:
        lines.append(f"{name!r} is this worker's own name (the default): the horde knows what runs")
    if is_recognised(config):
        lines.append(
            f"{name!r} is in the horde's bridge table: it is offered what that bridge's version may run; "
            "say it only if this worker serves those jobs as that bridge would"
        )
    else:
        lines.append(
            f"{name!r} is not in the horde's bridge table ({', '.join(RECOGNISED_BRIDGE_NAMES)}): the horde "
            "offers it plain txt2img only (no img2img, inpainting, post-processing, hires fix, tiling, clip "
            "skip, R2 sources) and pays 0.75x kudos. At start the worker logs what the horde withholds."
        )
    lines.append(f"what each capability means and which this worker implements: {DOC}")
    return lines
