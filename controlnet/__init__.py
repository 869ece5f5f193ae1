"""ControlNet for the horde's control jobs: the nine control types, their annotators and ControlNets.

    controlnets = ControlNets(reference=reference, cache=model_cache, device=device_policy, cache_home=home)
    controlnets.serves(records)                       # pop with allow_controlnet?
    control_map = controlnets.annotate(kind, image)   # the annotator's map at the image's size
    with controlnets.controlnet(kind, model, baseline, pipe.unet) as net:
        ...                                           # a diffusers ControlNetModel on the device

`controlnet.types` holds the one list of control types; `controlnet.loading` turns full and diff ControlNet
files into diffusers modules; `controlnet.annotators` the annotators; `controlnet.tiny` builds random-weight
stand-ins in the real file layouts.
"""

from controlnet.manager import ANNOTATOR_REFERENCE, ControlNets, ControlNotReadyError, can_control
from controlnet.types import CONTROL_TYPE_NAMES, CONTROL_TYPES, ControlType, control_type

__all__ = [
    "ANNOTATOR_REFERENCE",
    "CONTROL_TYPES",
    "CONTROL_TYPE_NAMES",
    "ControlNets",
    "ControlNotReadyError",
    "ControlType",
    "can_control",
    "control_type",
]
