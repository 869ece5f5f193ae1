"""The horde's rules as pure functions: defaults, seeds, ttl, kudos, and which worker may take which job."""

from __future__ import annotations

import hashlib
import random
import re
from typing import TYPE_CHECKING, Any

from local_horde.schema import NON_UPSCALERS, POST_PROCESSORS
from local_horde.state import ApiError, Worker

if TYPE_CHECKING:
    from local_horde.generation import GenRequest

SLOW_BASELINES = ("flux_1", "qwen_image", "z_image_turbo")
SLOW_SAMPLERS = ("k_heun", "k_dpm_2", "k_dpm_2_a", "k_dpmpp_2s_a", "k_dpmpp_sde")
UPSCALERS = tuple(p for p in POST_PROCESSORS if p not in NON_UPSCALERS)
_USERNAME = re.compile(r"^.+#\d+$")


def fill_generation_defaults(params: dict[str, Any]) -> None:
    """What the server fills in before queueing (not the swagger defaults an idle pop shows)."""
    params.setdefault("width", 512)
    params.setdefault("height", 512)
    steps = params.setdefault("steps", 20 if params.get("control_type") else 30)
    if params.get("control_type"):
        params["steps"] = min(steps, 40)
    params.setdefault("sampler_name", "k_euler_a")
    params.setdefault("cfg_scale", 5.0)
    params.setdefault("karras", True)
    for key in ("tiling", "hires_fix", "image_is_control", "return_control_map", "transparent"):
        params.setdefault(key, False)


def resolve_seed(seed: str | None, rng: random.Random) -> int | None:
    """A requester's seed string as the int the horde uses; None means a random seed per image."""
    if seed is None or seed == "":
        return None
    if seed.isdigit():
        return int(seed) % 2**32
    return int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 2**32


# Baselines the server refuses ControlNet on, with the name its message uses.
NO_CONTROLNET_BASELINES = {
    "stable_diffusion_xl": "SDXL",
    "stable_cascade": "Stable Cascade",
    "flux_1": "Flux",
    "qwen_image": "Qwen",
    "z_image_turbo": "Z-Image",
}


def check_control_request(body: dict[str, Any], baselines: dict[str, str]) -> None:
    """The server's refusals of a ControlNet request at generate/async (same order, messages and codes)."""
    params = body.get("params") or {}
    if "control_type" not in params:
        return
    models = list(body.get("models") or [])
    kind = params.get("control_type")
    if kind in ("normal", "mlsd", "hough") and any(
        (baselines.get(m) or "").startswith("stable diffusion 2") for m in models
    ):
        raise ApiError(400, "No current model available for this particular ControlNet for SD2.x",
                       "ControlNetUnsupported")
    if "pix2pix" in models:
        raise ApiError(400, "You cannot use ControlNet with these models.", "ControlNetUnsupported")
    if not body.get("source_image"):
        raise ApiError(400, "Controlnet Requires a source image.", "ControlNetSourceMissing")
    if body.get("source_processing") == "inpainting":
        raise ApiError(400, "ControlNet cannot be used with inpainting at this time",
                       "ControlNetInpaintingMismatch")
    for baseline, label in NO_CONTROLNET_BASELINES.items():
        if any((baselines.get(m) or "").startswith(baseline) for m in models):
            raise ApiError(400, f"ControlNet does not work with {label} currently.", "ControlNetMismatch")
    if params.get("transparent"):
        raise ApiError(400, "Generating Transparent images is not supported during controlnet workflows "
                       "currently.", "InvalidTransparencyCN")


def check_priority_usernames(names: list[str]) -> None:
    for name in names:
        if not _USERNAME.match(name):
            raise ApiError(
                400,
                f"Priority usernames need to be in the form of 'alias#id'. '{name}' is not.",
                "InvalidPriorityUsername",
            )


def usable_models(worker: Worker, req: GenRequest, baselines: dict[str, str]) -> list[str]:
    """Models of this request the worker serves and its bridge can run (flux needs the capability)."""
    candidates = [m for m in (req.models or worker.models) if m in worker.models]
    return [m for m in candidates if baselines.get(m) != "flux_1" or worker.agent.has("flux")]


def job_ttl(params: dict[str, Any], settings: dict[str, Any], baseline: str | None = None) -> float:
    steps = params["steps"]
    if params["sampler_name"] in SLOW_SAMPLERS:
        steps *= 2
    elif params["sampler_name"] == "k_dpm_adaptive":
        steps = 40
    ttl = max(150.0, 30 + steps * 2 * (params["width"] * params["height"] / 512**2))
    if params.get("control_type"):
        ttl *= 2
    if baseline in SLOW_BASELINES:
        ttl *= 3
    if settings.get("extra_slow_worker"):
        ttl *= 3
    return ttl


def image_kudos(params: dict[str, Any], baseline: str | None = None) -> float:
    """The contract's fallback formula (the real server uses an MLP; this is a plausible stand-in),
    times the worker-side baseline factor."""
    steps, pixels = params["steps"], params["width"] * params["height"]
    kudos = (
        0.1232 * steps + ((max(pixels - 4096, 0)) ** 1.75 / (1024**2 - 4096) ** 1.75) * 0.1232 * steps * 8.75
    )
    kudos *= 1.2 ** len(params.get("post_processing") or [])
    if params.get("control_type") and not params.get("return_control_map"):
        kudos *= 3  # a control map alone costs what a plain image does
    kudos += 3 * len(params.get("loras") or [])
    if params.get("tis"):
        kudos += 1
    return kudos * baseline_factor(baseline, params)


def baseline_factor(baseline: str | None, params: dict[str, Any]) -> float:
    if baseline == "stable_diffusion_xl":
        return 4.0 if params.get("workflow") == "qr_code" else 2.0
    if baseline == "stable_cascade":
        return 7.0 if params.get("hires_fix") else 4.0
    return {"flux_1": 8.0, "z_image_turbo": 8.0, "qwen_image": 12.0}.get(baseline or "", 1.0)


def maintenance_error(worker: Worker) -> ApiError:
    msg = worker.maintenance_msg or "This worker has been put into maintenance mode by its owner"
    return ApiError(403, f"Worker {worker.name} is in maintenance mode: {msg}", "WorkerMaintenance")


def _bridge_lacks(worker: Worker, req: GenRequest) -> bool:
    """True when the bridge's name/version does not grant a feature this request needs."""
    p, has = req.params, worker.agent.has
    needs: list[str] = []
    if req.source_key:
        needs.append("img2img")
        if req.source_processing in ("inpainting", "outpainting"):
            needs.append("inpainting")
    if p.get("post_processing"):
        needs += ["post-processing", *p["post_processing"]]
    for flag in ("tiling", "hires_fix", "return_control_map", "image_is_control"):
        if p.get(flag):
            needs.append(flag)
    if (p.get("clip_skip") or 1) > 1:
        needs.append("clip_skip")
    if p.get("control_type"):
        needs += ["controlnet", "image_is_control"]  # the server asks both of any ControlNet job's bridge
    if p.get("loras"):
        needs.append("lora")
        if any(lora.get("is_version") for lora in p["loras"]):
            needs.append("lora_versions")
    if p.get("tis"):
        needs.append("textual_inversion")
    if req.extra_sources:
        needs.append("extra_source_images")
    if p.get("workflow"):
        needs.append("workflow")
    if p.get("extra_texts"):
        needs.append("extra_texts")
    return any(not has(feature) for feature in needs)


def generation_skip_reason(worker: Worker, req: GenRequest, baselines: dict[str, str]) -> str | None:
    """The `skipped` key this worker counts for this request, or None when it may take it."""
    s, p = worker.settings, req.params
    if req.workers and worker.id not in req.workers:
        return "worker_id"
    if req.nsfw and not s["nsfw"]:
        return "nsfw"
    prompt = req.prompt.lower()
    if any(word.lower() in prompt for word in s["blacklist"] if word):
        return "blacklist"
    if req.models and not any(m in worker.models for m in req.models):
        return "models"
    if not usable_models(worker, req, baselines):
        return "bridge_version"
    if p["width"] * p["height"] > s["max_pixels"]:
        return "max_pixels"
    # The server names these two capabilities' skips after the job kind, not "bridge_version".
    if req.source_key and not worker.agent.has("img2img"):
        return "img2img"
    if req.source_key and req.source_processing in ("inpainting", "outpainting") and not worker.agent.has(
        "inpainting"
    ):
        return "painting"
    if req.source_key and not s["allow_img2img"]:
        return "img2img"
    if req.source_key and req.source_processing in ("inpainting", "outpainting") and not s["allow_painting"]:
        return "painting"
    if p.get("post_processing") and not s["allow_post_processing"]:
        return "post-processing"
    if p.get("loras") and not s["allow_lora"]:
        return "lora"
    if p.get("control_type") and not s["allow_controlnet"]:
        return "controlnet"
    if _bridge_lacks(worker, req):
        return "bridge_version"
    return None


def tiles(size: tuple[int, int] | None) -> int:
    """512x512 tiles of an image (1 when its size is unknown)."""
    if size is None:
        return 1
    w, h = size
    return max(1, -(-w // 512)) * max(1, -(-h // 512))


def form_kudos(form: str, n_tiles: int) -> float:
    """As the server's set_forms: 1 for every form (caption, nsfw, aesthetic...), 3 for interrogation,
    3 per tile for post-processors."""
    if form in ("caption", "nsfw", "aesthetic"):
        return 1.0
    if form == "interrogation":
        return 3.0
    if form in UPSCALERS or form in (
        "GFPGAN",
        "CodeFormers",
        "strip_background",
        "GFPGANv1.3",
        "RestoreFormer",
    ):
        return 3.0 * n_tiles
    return 1.0
