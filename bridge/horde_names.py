"""The horde's names for what it hands out: alchemy forms, post-processors, source processing, bridge names.

Defined once, here; everything in the worker derives from these tuples (config validation, the alchemy
source, the post-processor registry's stages, --check-config). The local horde (a stand-in of the server)
keeps the server's own copy in local_horde/schema.py; tests/bridge/test_horde_names.py ties every copy to
this module. To add a name the horde starts accepting, add it to the right tuple below: the kinds are
what the worker needs to know to route it.

Facts from the AI Horde server v5.1.5 (horde/consts.py KNOWN_POST_PROCESSORS, the swagger models of
/interrogate/pop and /generate/async, horde/bridge_reference.py).
"""

from __future__ import annotations

# Alchemy forms answered by a model that reads the image (interrogators/; nsfw and aesthetic on the safety
# pass's CLIP embedding).
INTERROGATOR_FORMS: tuple[str, ...] = ("caption", "interrogation", "nsfw", "aesthetic")
# Alchemy forms computed by plain image libraries, without model weights (bridge/jobs/weightless.py).
WEIGHTLESS_FORMS: tuple[str, ...] = ("vectorize", "palette", "describe")

# Post-processors by kind. Upscalers map to their exact output scale.
UPSCALER_SCALES: dict[str, int] = {
    "RealESRGAN_x4plus": 4,
    "RealESRGAN_x2plus": 2,
    "RealESRGAN_x4plus_anime_6B": 4,
    "NMKD_Siax": 4,
    "4x_AnimeSharp": 4,
    # added at the horde's bridge version 13
    "4xNomos8kSC": 4,
    "4xLSDIRplus": 4,
    "4xNomosWebPhoto_RealPLKSR": 4,
    "4xNomos2_realplksr_dysample": 4,
    "4xNomos2_hq_dat2": 4,
    "2xModernSpanimationV1": 2,
}
UPSCALERS: tuple[str, ...] = tuple(UPSCALER_SCALES)
FACE_FIXERS: tuple[str, ...] = ("GFPGAN", "CodeFormers", "GFPGANv1.3", "RestoreFormer")
BACKGROUND_REMOVERS: tuple[str, ...] = ("strip_background",)
# Every post-processor, in the server's KNOWN_POST_PROCESSORS order (the swagger enums list them so).
POST_PROCESSORS: tuple[str, ...] = (
    "GFPGAN",
    "RealESRGAN_x4plus",
    "RealESRGAN_x2plus",
    "RealESRGAN_x4plus_anime_6B",
    "NMKD_Siax",
    "4x_AnimeSharp",
    "CodeFormers",
    "strip_background",
    "4xNomos8kSC",
    "4xLSDIRplus",
    "4xNomosWebPhoto_RealPLKSR",
    "4xNomos2_realplksr_dysample",
    "4xNomos2_hq_dat2",
    "2xModernSpanimationV1",
    "GFPGANv1.3",
    "RestoreFormer",
)
# Every alchemy form the server accepts, in its swagger enum's order (aesthetic after the weightless three).
FORMS: tuple[str, ...] = (
    *INTERROGATOR_FORMS[:3], *WEIGHTLESS_FORMS, *INTERROGATOR_FORMS[3:], *POST_PROCESSORS
)

# Values of a generation's source_processing (remix is for Stable Cascade only).
SOURCE_PROCESSING: tuple[str, ...] = ("img2img", "inpainting", "outpainting", "remix")

# Bridge names the horde's bridge table knows. Only these are granted capabilities (img2img, painting,
# post-processing, r2 sources...); any other name gets none and is paid 0.75x.
BRIDGE_NAMES: tuple[str, ...] = (
    "AI Horde Worker reGen",
    "AI Horde Worker",
    "SD-WebUI Stable Horde Worker Bridge",
    "HordeAutoWebBridge",
)


def post_processor_kind(name: str) -> str:
    """ "upscaler", "face_fixer" or "background"; KeyError for a name that is not a post-processor."""
    if name in UPSCALER_SCALES:
        return "upscaler"
    if name in FACE_FIXERS:
        return "face_fixer"
    if name in BACKGROUND_REMOVERS:
        return "background"
    raise KeyError(f"{name!r} is not one of the horde's post-processors")
