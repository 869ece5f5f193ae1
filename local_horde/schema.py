"""The first validation layer of the real server: a Draft-4 jsonschema check of the swagger models.

Only the keywords the horde's models use are implemented, with jsonschema's own message wording and
flask-restx's error keys (dotted paths; a missing required property is keyed by its own name), so a worker
sees the same `{"errors": {...}, "message": "Input payload validation failed"}` bodies as on the real horde.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Schema = dict[str, Any]

# Names shared with the pop/submit logic.
# The horde's KNOWN_POST_PROCESSORS, in its order: reGen v1's set, then the ones added at bridge v13.
POST_PROCESSORS_V1 = (
    "GFPGAN",
    "RealESRGAN_x4plus",
    "RealESRGAN_x2plus",
    "RealESRGAN_x4plus_anime_6B",
    "NMKD_Siax",
    "4x_AnimeSharp",
    "CodeFormers",
    "strip_background",
)
POST_PROCESSORS_V13 = (
    "4xNomos8kSC",
    "4xLSDIRplus",
    "4xNomosWebPhoto_RealPLKSR",
    "4xNomos2_realplksr_dysample",
    "4xNomos2_hq_dat2",
    "2xModernSpanimationV1",
    "GFPGANv1.3",
    "RestoreFormer",
)
POST_PROCESSORS = POST_PROCESSORS_V1 + POST_PROCESSORS_V13
# Those that are not upscalers (no tile count, no size change).
NON_UPSCALERS = ("GFPGAN", "CodeFormers", "strip_background", "GFPGANv1.3", "RestoreFormer")
SAMPLERS = (
    "k_lms",
    "k_heun",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
    "k_dpm_fast",
    "k_dpm_adaptive",
    "k_dpmpp_2s_a",
    "k_dpmpp_2m",
    "dpmsolver",
    "k_dpmpp_sde",
    "DDIM",
    "lcm",
)
ALCHEMY_FORMS = (
    "caption",
    "interrogation",
    "nsfw",
    "vectorize",
    "palette",
    "describe",
    "aesthetic",
    *POST_PROCESSORS,
)
SUBMIT_STATES = ("ok", "censored", "faulted", "csam")
METADATA_TYPES = (
    "lora",
    "ti",
    "censorship",
    "source_image",
    "source_mask",
    "extra_source_images",
    "batch_index",
    "information",
    "aesthetic_score",
)
METADATA_VALUES = ("download_failed", "parse_failed", "baseline_mismatch", "csam", "nsfw", "see_ref")
SOURCE_PROCESSING = ("img2img", "inpainting", "outpainting", "remix")
CONTROL_TYPES = ("canny", "hed", "depth", "normal", "openpose", "seg", "scribble", "fakescribbles", "hough")

VALIDATION_MESSAGE = "Input payload validation failed"


def _t(type_: str, **kw: Any) -> Schema:
    return {"type": type_, **kw}


def _obj(props: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": props, "required": list(required)}


_STR_LIST = _t("array", items=_t("string"))
_BOOL = _t("boolean")

GENERATE_POP: Schema = _obj(
    {
        "name": _t("string"),
        "priority_usernames": _STR_LIST,
        "nsfw": _BOOL,
        "blacklist": _STR_LIST,
        "models": _t("array", items=_t("string", minLength=3, maxLength=255)),
        "bridge_agent": _t("string", maxLength=1000),
        "threads": _t("integer", minimum=1, maximum=50),
        "require_upfront_kudos": _BOOL,
        "amount": _t("integer", minimum=1, maximum=20),
        "extra_slow_worker": _BOOL,
        "max_pixels": _t("integer"),
        **{
            k: _BOOL
            for k in (
                "allow_img2img",
                "allow_painting",
                "allow_unsafe_ipaddr",
                "allow_post_processing",
                "allow_controlnet",
                "allow_sdxl_controlnet",
                "allow_lora",
                "limit_max_steps",
            )
        },
    },
    ("name",),
)

GENERATE_SUBMIT: Schema = _obj(
    {
        "id": _t("string"),
        "generation": _t("string"),
        "state": _t("string", enum=list(SUBMIT_STATES)),
        "seed": _t("integer"),
        "censored": _BOOL,
        "gen_metadata": _t(
            "array",
            items=_obj(
                {
                    "type": _t("string", enum=list(METADATA_TYPES)),
                    "value": _t("string", enum=list(METADATA_VALUES)),
                    "ref": _t("string", maxLength=255),
                },
                ("type", "value"),
            ),
        ),
    },
    ("id", "seed"),
)

def interrogate_pop_schema(forms: Sequence[str] = ALCHEMY_FORMS) -> Schema:
    """InterrogationPopInput for a server accepting `forms` (a test may withdraw or add names)."""
    return _obj(
        {
            "name": _t("string"),
            "priority_usernames": _STR_LIST,
            "forms": _t("array", items=_t("string", enum=list(forms)), uniqueItems=True),
            "amount": _t("integer"),
            "bridge_agent": _t("string", maxLength=1000),
            "threads": _t("integer", minimum=1, maximum=100),
            "max_tiles": _t("integer", minimum=1, maximum=256),
        },
        ("name",),
    )


INTERROGATE_POP: Schema = interrogate_pop_schema()

_LORA = _obj(
    {
        "name": _t("string", minLength=1, maxLength=255),
        "model": _t("number", minimum=-5, maximum=5),
        "clip": _t("number", minimum=-5, maximum=5),
        "inject_trigger": _t("string", minLength=1, maxLength=30),
        "is_version": _BOOL,
    },
    ("name",),
)
_TI = _obj(
    {
        "name": _t("string", minLength=1, maxLength=255),
        "inject_ti": _t("string", enum=["prompt", "negprompt"]),
        "strength": _t("number", minimum=-5, maximum=5),
    },
    ("name",),
)
GENERATION_PARAMS: Schema = _obj(
    {
        "sampler_name": _t("string", enum=list(SAMPLERS)),
        "cfg_scale": _t("number", minimum=0, maximum=100),
        "denoising_strength": _t("number", minimum=0.01, maximum=1.0),
        "hires_fix_denoising_strength": _t("number", minimum=0.01, maximum=1.0),
        "seed": _t("string"),
        "height": _t("integer", minimum=64, maximum=3072, multipleOf=64),
        "width": _t("integer", minimum=64, maximum=3072, multipleOf=64),
        "seed_variation": _t("integer", minimum=1, maximum=1000),
        "post_processing": _t("array", items=_t("string", enum=list(POST_PROCESSORS))),
        "karras": _BOOL,
        "tiling": _BOOL,
        "hires_fix": _BOOL,
        "clip_skip": _t("integer", minimum=1, maximum=12),
        "control_type": _t("string", enum=list(CONTROL_TYPES)),
        "image_is_control": _BOOL,
        "return_control_map": _BOOL,
        "facefixer_strength": _t("number", minimum=0, maximum=1),
        "loras": _t("array", items=_LORA, maxItems=5),
        "tis": _t("array", items=_TI, maxItems=20),
        "special": _t("object"),
        "extra_texts": _t("array", items=_obj({"text": _t("string"), "reference": _t("string")}, ("text",))),
        "workflow": _t("string", enum=["qr_code"]),
        "transparent": _BOOL,
        "steps": _t("integer", minimum=1, maximum=500),
        "n": _t("integer", minimum=1, maximum=20),
    }
)
GENERATE_ASYNC: Schema = _obj(
    {
        "prompt": _t("string", minLength=1),
        "params": GENERATION_PARAMS,
        "nsfw": _BOOL,
        "trusted_workers": _BOOL,
        "censor_nsfw": _BOOL,
        "workers": _STR_LIST,
        "worker_blacklist": _BOOL,
        "models": _STR_LIST,
        "source_image": _t("string"),
        "source_processing": _t("string", enum=list(SOURCE_PROCESSING)),
        "source_mask": _t("string"),
        "extra_source_images": _t(
            "array", items=_obj({"image": _t("string"), "strength": _t("number")}, ("image",))
        ),
        "r2": _BOOL,
        "shared": _BOOL,
        "slow_workers": _BOOL,
        "extra_slow_workers": _BOOL,
        "dry_run": _BOOL,
    },
    ("prompt",),
)
def interrogate_async_schema(forms: Sequence[str] = ALCHEMY_FORMS) -> Schema:
    return _obj(
        {
            "forms": _t(
                "array",
                items=_obj({"name": _t("string", enum=list(forms)), "payload": _t("object")}, ("name",)),
                minItems=1,
            ),
            "source_image": _t("string"),
            "slow_workers": _BOOL,
        },
        ("forms", "source_image"),
    )


INTERROGATE_ASYNC: Schema = interrogate_async_schema()
WORKER_MODIFY: Schema = _obj(
    {
        "maintenance": _BOOL,
        "maintenance_msg": _t("string"),
        "paused": _BOOL,
        "info": _t("string", maxLength=1000),
        "name": _t("string", minLength=5, maxLength=100),
        "team": _t("string", maxLength=36),
    }
)


def _type_ok(value: Any, type_: str) -> bool:
    # Draft 4 semantics: bools are not numbers, 1.0 is not an integer.
    if type_ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(
        value, {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}[type_]
    )


def iter_errors(value: Any, schema: Schema, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, message) for every violation, in jsonschema's wording."""
    type_ = schema.get("type")
    if type_ and not _type_ok(value, type_):
        return [(path, f"{value!r} is not of type {type_!r}")]
    errors: list[tuple[tuple, str]] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append((path, f"{value!r} is not one of {schema['enum']!r}"))
    if "minimum" in schema and value < schema["minimum"]:
        errors.append((path, f"{value!r} is less than the minimum of {schema['minimum']!r}"))
    if "maximum" in schema and value > schema["maximum"]:
        errors.append((path, f"{value!r} is greater than the maximum of {schema['maximum']!r}"))
    if "multipleOf" in schema and value % schema["multipleOf"]:
        errors.append((path, f"{value!r} is not a multiple of {schema['multipleOf']}"))
    if isinstance(value, str | list):
        if (
            "minLength" in schema
            and len(value) < schema["minLength"]
            or "minItems" in schema
            and len(value) < schema["minItems"]
        ):
            errors.append((path, f"{value!r} is too short"))
        if (
            "maxLength" in schema
            and len(value) > schema["maxLength"]
            or "maxItems" in schema
            and len(value) > schema["maxItems"]
        ):
            errors.append((path, f"{value!r} is too long"))
    if isinstance(value, list):
        if schema.get("uniqueItems") and len({repr(v) for v in value}) != len(value):
            errors.append((path, f"{value!r} has non-unique elements"))
        for i, item in enumerate(value):
            errors.extend(iter_errors(item, schema.get("items", {}), (*path, i)))
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(((*path, name), f"{name!r} is a required property"))
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors.extend(iter_errors(value[name], sub, (*path, name)))
    return errors


def validate(value: Any, schema: Schema) -> dict[str, str]:
    """flask-restx's `errors` dict (empty when valid)."""
    return {".".join(str(p) for p in path): msg for path, msg in iter_errors(value, schema)}
