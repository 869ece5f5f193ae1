"""A ControlNet job's payload -> what the worker will run, or the fault the horde's own rules imply.

* `control_type` is one of the horde's nine (controlnet.types); `image_is_control`: the source already is the
  control map (no annotator); `return_control_map`: the deliverable is the annotator's map itself.
* The server refuses ControlNet with inpainting (not outpainting), on SDXL / Cascade / Flux, and normal /
  mlsd / hough on SD2; such a job faults here with that reason if it ever arrives. So does one whose source
  image could not be used (a control job without its control means nothing), one on a depth2img model (no
  ControlNet pipeline), a type the horde's reference has no ControlNet for on that baseline (seg on SD2),
  and image_is_control with return_control_map (the source itself back; the horde refuses that pair).
* Mode: no denoising_strength (or 1.0) -> txt2img guided by the map (the peers' default: denoise 1.0);
  a strength below 1 -> img2img of the source guided by its map. Masks are not used (reported).
* There is no strength field in the API: the ControlNet is applied at 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.generation.substitutions import Substitution
from controlnet.types import CONTROL_BASELINES, REFUSED_ON_SD2, SD2, control_type, controlnet_name

if TYPE_CHECKING:
    from bridge.api_models import GenerationPayload
    from bridge.generation.request import SourceKind
    from models.records import ModelRecord

CONTROL_STRENGTH = 1.0


@dataclass(frozen=True)
class ControlRequest:
    control_type: str
    image_is_control: bool = False
    return_control_map: bool = False

    @property
    def features(self) -> list[str]:
        """What the job used, for the log and the stats."""
        names = [f"controlnet:{self.control_type}"]
        names += ["image_is_control"] if self.image_is_control else []
        return names + (["return_control_map"] if self.return_control_map else [])


def resolve_control(
    payload: GenerationPayload, record: ModelRecord, source: SourceKind, subs: list[Substitution]
) -> ControlRequest | None:
    """The job's control, None for a plain job; raises RequestFault for what cannot run."""
    from bridge.generation.request import RequestFault

    if not payload.control_type:
        if payload.image_is_control or payload.return_control_map:
            why = "image_is_control / return_control_map without a control_type: plain generation"
            subs.append(Substitution("control", True, False, why))
        return None
    kind = control_type(payload.control_type)
    if kind is None:
        raise RequestFault(f"unknown control_type {payload.control_type!r}")
    if source.processing is None:
        raise RequestFault(f"ControlNet ({kind.name}) needs a source image, and this job's could not be used")
    style = (record.style or "").lower()
    # The server refuses inpainting only; outpainting runs as a ControlNet job like the peers' (mask unused).
    if source.processing == "inpainting" or record.inpainting or style == "inpainting":
        raise RequestFault("ControlNet cannot be combined with inpainting (the horde refuses it)")
    baseline = (record.baseline or "").lower()
    if baseline not in CONTROL_BASELINES:
        raise RequestFault(f"ControlNet does not work with {record.baseline or 'this kind of'} models "
                           "(the horde refuses it)")
    if style == "depth2img":
        raise RequestFault("ControlNet is not supported on depth2img models")
    if controlnet_name(kind, baseline) is None:
        refused = baseline == SD2 and kind.name in REFUSED_ON_SD2
        why = " (the horde refuses this combination)" if refused else " in the horde's reference"
        raise RequestFault(f"there is no {kind.name} ControlNet for {record.baseline} models{why}")
    if payload.image_is_control and payload.return_control_map:
        raise RequestFault("image_is_control with return_control_map asks for the source itself back "
                           "(the horde refuses this pair)")
    return ControlRequest(kind.name, bool(payload.image_is_control), bool(payload.return_control_map))


def control_mode(payload: GenerationPayload, source: SourceKind, subs: list[Substitution]) -> tuple[str, str]:
    """(mode, mask use) of a ControlNet job."""
    if source.mask:
        subs.append(Substitution("source_mask", source.mask, None, "ControlNet jobs do not use masks"))
    if source.processing not in ("img2img", None):
        why = "ControlNet guides from the source; the source_processing is not used"
        subs.append(Substitution("source_processing", source.processing, "controlnet", why))
    strength = payload.denoising_strength
    if payload.return_control_map or strength is None or not strength < 1.0:
        return "txt2img", "none"
    return "img2img", "none"
