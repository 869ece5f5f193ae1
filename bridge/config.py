"""The worker's one configuration object.

Built once from bridgeData.yaml, then the environment, then the command line; validated once; frozen. A reload
builds a new object. Every key the legacy AI-Horde-Worker and horde-worker-reGen accept is accepted with
their defaults, so an operator's existing file runs unchanged. Derived values (max_pixels, the API base,
memory budgets, which modes run) are pure functions below, never validators that rewrite fields.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from bridge import horde_names
from bridge.families import FAMILIES
from bridge.peer_keys import MAPPED_KEYS, PEER_KEYS_WITHOUT_EFFECT

ANONYMOUS_API_KEY = "0000000000"
BRIDGE_NAME = "horde-bridge-py"
BRIDGE_VERSION = "0.1.0"
BRIDGE_URL = "https://github.com/horde-bridge-py/horde-bridge-py"
DEFAULT_BRIDGE_AGENT = f"{BRIDGE_NAME}:{BRIDGE_VERSION}:{BRIDGE_URL}"
# The names the horde grants capabilities to (img2img, inpainting, post-processing, r2 sources...).
RECOGNISED_BRIDGE_NAMES = horde_names.BRIDGE_NAMES
# Forms the `forms` key may name: the horde's (bridge/horde_names.py). Others are dropped with a warning.
KNOWN_FORMS = horde_names.FORMS
# `post-process` in a peer's forms list (the legacy worker's and reGen's template default) means every
# post-processor form; tests tie this to postprocessors.ORDER. It is never sent as a form name.
POST_PROCESS_ALIAS = "post-process"
POST_PROCESSOR_FORMS = horde_names.POST_PROCESSORS
# The names horde workers' templates ship as defaults: a worker that keeps one collides with everyone else's.
TEMPLATE_WORKER_NAMES = frozenset(
    {"An Awesome AI Horde Worker", "An Awesome Dreamer", "An Awesome Alchemist", "My Awesome Instance"}
)
REAL_HORDE_HOSTS = frozenset({"aihorde.net", "stablehorde.net"})
# The format models.cache.leave_free_bytes computes with: "80%" of the total, or megabytes ("4096", "4096MB").
_MEMORY_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|mb|mib|m)?\s*$", re.IGNORECASE)

# Keys the legacy workers read that have no meaning for this bridge (their machinery does not exist here).
# They are accepted so an old file loads, and --check-config lists them.
LEGACY_KEYS_WITHOUT_EFFECT: dict[str, str] = {
    "disable_voodoo": "the model cache always keeps models in RAM within its budget",
    "enable_model_cache": "the model cache is always on",
    "low_vram_mode": "VRAM use is governed by vram_to_leave_free",
    "ray_temp_dir": "no ray here",
    "disable_download_progress": "progress bars follow the terminal",
    "queue_size_type": "not used",
    "safety_on_gpu": "the safety pass runs on the GPU when it fits the VRAM budget, else on the CPU",
    "high_memory_mode": "memory use is governed by ram_to_leave_free / vram_to_leave_free",
    "very_high_memory_mode": "memory use is governed by ram_to_leave_free / vram_to_leave_free",
    "high_performance_mode": "not used",
    "moderate_performance_mode": "not used",
    "unload_models_from_vram": "the cache moves models off the GPU as its budget requires",
    "post_process_job_overlap": "post-processing always overlaps with submits",
    "capture_kudos_training_data": "not used",
    "kudos_training_data_file": "not used",
    "exit_on_unhandled_faults": "a faulted job never stops this daemon",
    "purge_loras_on_download": "the LoRA cache keeps to max_lora_cache_size, least recently used out first",
    "load_large_models": "model sizes follow the memory budgets",
    "custom_models": "use a local reference file (custom_model_reference)",
    "process_timeout": "jobs are bounded by the horde's ttl",
    "preload_timeout": "not used",
    "enable_controlnet": "use allow_controlnet",
}

# Accepted keys this bridge does not act on yet. Kept honest: --check-config prints this list.
NOT_ACTED_ON: dict[str, str] = {
    "allow_sdxl_controlnet": "the horde's SDXL ControlNet is its QR-code workflow, which this worker does "
                             "not run; it always pops with it false",
    "temp_dir": "the worker writes no scratch files",
    "always_download": "missing model files are always downloaded at start; the worker never asks",
    "suppress_speed_warnings": "the worker emits no speed warnings yet",
}

# Keys whose values are secrets: read as plain strings, never printed.
SECRET_KEYS = ("api_key", "civitai_api_token")

# Old spellings that mean the same key.
KEY_ALIASES = {"image_models_to_load": "models_to_load", "image_models_to_skip": "models_to_skip"}


class BridgeConfig(BaseModel):
    """Every key of bridgeData.yaml. Defaults are those of the legacy worker / reGen."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # Identity and the horde
    api_key: SecretStr = SecretStr(ANONYMOUS_API_KEY)
    horde_url: str = "https://aihorde.net"
    worker_name: str = "An Awesome AI Horde Worker"
    dreamer_name: str | None = None
    alchemist_name: str = "An Awesome Alchemist"
    bridge_agent: str = DEFAULT_BRIDGE_AGENT
    priority_usernames: list[str] = Field(default_factory=list)
    remove_maintenance_on_init: bool = False
    # Which job families run ("auto": generation where a GPU is present, alchemy where none is)
    dreamer: bool | Literal["auto"] = "auto"
    alchemist: bool | Literal["auto"] = "auto"
    force_cpu_generation: bool = False
    # Capacity
    max_threads: int = Field(1, ge=1, le=50)
    queue_size: int = Field(1, ge=0, le=20)
    max_batch: int = Field(1, ge=1, le=20)
    max_power: int = Field(8, ge=2, le=288)
    extra_slow_worker: bool = False
    limit_max_steps: bool = False
    require_upfront_kudos: bool = False
    # What is served
    nsfw: bool = True
    censor_nsfw: bool = False
    blacklist: list[str] = Field(default_factory=list)
    censorlist: list[str] = Field(default_factory=list)
    allow_img2img: bool = True
    allow_painting: bool = True
    allow_unsafe_ip: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    # LoRA and textual inversion (CivitAI)
    allow_lora: bool = False
    max_lora_cache_size: int = Field(10, ge=0)
    civitai_api_token: SecretStr | None = None
    civitai_url: str = "https://civitai.com"
    prefetch_loras: int = Field(10, ge=0)
    forms: list[str] = Field(default_factory=lambda: ["caption", "nsfw"])
    # Models
    models_to_load: list[str] = Field(default_factory=lambda: ["stable_diffusion"])
    models_to_skip: list[str] = Field(default_factory=list)
    dynamic_models: bool = False
    number_of_dynamic_models: int = Field(0, ge=0)
    max_models_to_download: int = Field(10, ge=0)
    always_download: bool = False
    custom_model_reference: list[str] = Field(default_factory=list)
    # Places and memory
    cache_home: str = "./model-cache"
    temp_dir: str = "./tmp"
    state_dir: str = "./worker-state"
    # Soft targets: how much stays free between jobs (models/cache.py), never a ceiling on a job. Not the
    # legacy "80%": on a 16 GB machine that keeps no model loaded, so every job reloads its model from disk.
    ram_to_leave_free: str = "30%"
    vram_to_leave_free: str = "30%"
    # Safety pass (every generated image is checked for CSAM/NSFW whatever the keys above say)
    send_aesthetic_score: bool = True  # the aesthetic_score gen_metadata of each delivered image
    sd_safety_checker: bool = False  # Stable Diffusion's checker as a second opinion on images to censor
    # Output
    disable_terminal_ui: bool = False
    stats_output_frequency: int = Field(30, ge=0)
    suppress_speed_warnings: bool = False
    # Real files and start-up (keys reGen's 2026 line shares are honoured with its meaning)
    only_models_on_disk: bool = False
    download_rate_limit_kbps: int | None = Field(None, ge=0)
    gpu_device_indices: list[int] | None = None
    limited_console_messages: bool = False
    model_reference: str | None = None
    caption_model: str | None = None
    clip_model: str | None = None
    nsfw_model: str | None = None
    # Sharing between job families (bridge/scheduling.py): relative weights, a family left out weighs 1
    family_shares: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(FAMILIES, 1.0))
    # Hostile input: source image URLs come from requesters. Off, only public addresses are fetched; on, also
    # loopback and private networks (a horde of your own on your LAN, the tests and the demo).
    allow_private_sources: bool = False

    @field_validator("ram_to_leave_free", "vram_to_leave_free", mode="before")
    @classmethod
    def _memory_spec(cls, value: Any) -> str:
        text = str(value)
        match = _MEMORY_SPEC.match(text)
        if not match or (match.group(2) == "%" and float(match.group(1)) > 100):
            raise ValueError("expected a percentage like '80%' or megabytes like 4096")
        return text.strip()

    @field_validator("forms", mode="before")
    @classmethod
    def _known_forms(cls, value: Any) -> list[str]:
        """Spellings normalise (reGen lower-cases forms and writes post_process); `post-process` expands. A
        name the horde does not know is kept here and dropped with a warning (`unknown_forms`), so that a
        name the server adds later never stops the worker."""
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list of form names")
        by_spelling = {_form_key(form): form for form in KNOWN_FORMS}
        forms: list[str] = []
        for raw in value:
            key = _form_key(str(raw))
            if key == _form_key(POST_PROCESS_ALIAS):
                forms.extend(POST_PROCESSOR_FORMS)
            else:
                forms.append(by_spelling.get(key, str(raw)))
        return list(dict.fromkeys(forms))

    @field_validator("family_shares")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [name for name in value if name not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown job famil{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                             f"allowed: {', '.join(FAMILIES)}")
        if any(not 0 <= share < float("inf") for share in value.values()):
            raise ValueError("each share must be a number >= 0")
        if not any(family_weights_of(value).values()):
            raise ValueError("at least one family needs a share above 0")
        return value

    @field_validator("horde_url", "civitai_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http(s) URL such as https://aihorde.net")
        return value

    @field_validator("priority_usernames")
    @classmethod
    def _alias_ids(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.match(r"^.+#\d+$", name)]
        if bad:
            raise ValueError(f"{bad} are not of the form alias#id")
        return value


def _form_key(form: str) -> str:
    return form.strip().lower().replace("-", "_")


# ---- derived values: pure functions -------------------------------------------------------------------


def api_base(config: BridgeConfig) -> str:
    """The server root without a trailing /api: both 'https://aihorde.net' and reGen's
    'https://aihorde.net/api/' name the same server."""
    url = config.horde_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def max_pixels(config: BridgeConfig) -> int:
    """The legacy rule: max_power 8 is 512x512."""
    return 64 * 64 * 8 * config.max_power


def configured_forms(config: BridgeConfig) -> list[str]:
    """The `forms` the worker may offer: names the horde knows, each once, in the operator's order. An
    unknown name is dropped (semantic_warnings says so) rather than stopping the worker or failing a pop."""
    return [form for form in dict.fromkeys(config.forms) if form in KNOWN_FORMS]


def unknown_forms(config: BridgeConfig) -> list[str]:
    return [form for form in dict.fromkeys(config.forms) if form not in KNOWN_FORMS]


def dreamer_name(config: BridgeConfig) -> str:
    return config.dreamer_name or config.worker_name


def bridge_agent_name(config: BridgeConfig) -> str:
    return config.bridge_agent.split(":", 1)[0]


def is_anonymous(config: BridgeConfig) -> bool:
    return config.api_key.get_secret_value() == ANONYMOUS_API_KEY


def family_weights_of(shares: Mapping[str, float]) -> dict[str, float]:
    return {family: float(shares.get(family, 1.0)) for family in FAMILIES}


def family_weights(config: BridgeConfig) -> dict[str, float]:
    """Every family's share weight (a family the file leaves out weighs 1)."""
    return family_weights_of(config.family_shares)


def modes(config: BridgeConfig, *, has_gpu: bool) -> tuple[bool, bool]:
    """(dreamer, alchemist) after resolving 'auto' against the machine."""
    dream = has_gpu if config.dreamer == "auto" else bool(config.dreamer)
    alchemy = (not has_gpu) if config.alchemist == "auto" else bool(config.alchemist)
    return dream, alchemy


# ---- loading -------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration cannot be used. `lines` holds one line per problem, each naming its key."""

    def __init__(self, lines: Sequence[str]):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


@dataclass
class LoadedConfig:
    config: BridgeConfig
    warnings: list[str] = field(default_factory=list)
    ignored_legacy_keys: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    # Keys of other workers' files turned into ours: key -> what it became.
    mapped_keys: dict[str, str] = field(default_factory=dict)


def env_var_for(key: str) -> str:
    """HORDE_API_KEY, HORDE_URL, HORDE_WORKER_NAME ... (no doubled HORDE_ for horde_url)."""
    upper = key.upper()
    return upper if upper.startswith("HORDE_") else f"HORDE_{upper}"


_SECRET_LINE = re.compile(r"""(?im)^[ \t]*["']?(api_key|civitai_api_token)["']?[ \t]*:[ \t]*(.*?)[ \t]*$""")


def _yaml_error(path: Path, text: str, err: yaml.YAMLError) -> str:
    """Where the file is broken and why, without the snippet of the file PyYAML quotes: on the api_key line
    that snippet is the key itself."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
    message = f"config file {path} is not valid YAML{where}: {problem or type(err).__name__}"
    for match in _SECRET_LINE.finditer(text):
        for secret in (match.group(2), match.group(2).strip("\"'")):
            if len(secret) >= 4:
                message = message.replace(secret, "***")
    return message


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError([f"config file {path} does not exist"]) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([_yaml_error(path, text, err)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path} must be a mapping of keys to values"])
    return data


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in BridgeConfig.model_fields:
        raw = environ.get(env_var_for(key))
        if raw is None or raw == "":
            continue
        # yaml scalars give env vars the same typing as the file ("true", "4", "[a, b]").
        values[key] = raw if key in SECRET_KEYS else yaml.safe_load(raw)
    return values


def _format_error(error: Mapping[str, Any], values: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "config"
    top = str(error["loc"][0]) if error["loc"] else ""
    shown = "***" if top == "api_key" else repr(values.get(top, error.get("input")))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{key}: {shown} is not allowed: {message}"


def build_config(
    file_values: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: Path | None = None,
) -> LoadedConfig:
    """yaml < environment < CLI overrides, validated once."""
    warnings: list[str] = []
    ignored: dict[str, str] = {}
    merged: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    for raw_key, value in file_values.items():
        key = KEY_ALIASES.get(str(raw_key), str(raw_key))
        if key in BridgeConfig.model_fields:
            merged[key] = value
        elif key in MAPPED_KEYS:
            peer[key] = value
        elif key in LEGACY_KEYS_WITHOUT_EFFECT or key in PEER_KEYS_WITHOUT_EFFECT:
            ignored[key] = LEGACY_KEYS_WITHOUT_EFFECT.get(key) or PEER_KEYS_WITHOUT_EFFECT[key]
        else:
            warnings.append(f"unknown key {raw_key!r} ignored (check its spelling)")
    mapped = _map_peer_keys(peer, merged, warnings)
    merged.update(_from_environment(os.environ if environ is None else environ))
    merged.update(overrides or {})
    try:
        config = BridgeConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError([_format_error(e, merged) for e in err.errors()]) from None
    return LoadedConfig(config, warnings + semantic_warnings(config), ignored, source, mapped)


_TEMPLATE_LEAVE_FREE = "80%"  # both peers' template value, which reGen's 2026 line no longer reads


def _map_peer_keys(peer: Mapping[str, Any], merged: dict[str, Any], warnings: list[str]) -> dict[str, str]:
    """reGen keys that mean one of ours, written into `merged` (the file's own value of ours wins, unless it
    is the template's untouched default beside a reserve the operator set); returns key -> what it became."""
    mapped: dict[str, str] = {}
    for reserve, ours in (("vram_reserve_mb", "vram_to_leave_free"), ("ram_reserve_mb", "ram_to_leave_free")):
        if peer.get(reserve) is None:
            continue
        try:
            megabytes = int(peer[reserve])
        except (TypeError, ValueError):
            raise ConfigError([f"{reserve}: {peer[reserve]!r} is not allowed: expected megabytes"]) from None
        if str(merged.get(ours, _TEMPLATE_LEAVE_FREE)).strip() == _TEMPLATE_LEAVE_FREE:
            merged[ours] = str(megabytes)
            mapped[reserve] = f"{ours}: {megabytes} (MB)"
        else:
            mapped[reserve] = f"not used: {ours} is set ({merged[ours]!r}) and wins"
            warnings.append(f"{reserve} and {ours} both set: {ours} ({merged[ours]!r}) is used")
    if peer.get("alchemy_caption_enabled") is False:
        forms = merged.get("forms")
        if isinstance(forms, list) and any(_form_key(str(f)) == "caption" for f in forms):
            merged["forms"] = [f for f in forms if _form_key(str(f)) != "caption"]
        mapped["alchemy_caption_enabled"] = "false: caption is not served"
    elif "alchemy_caption_enabled" in peer:
        mapped["alchemy_caption_enabled"] = "caption is served when forms lists it"
    if "model_stickiness" in peer:
        why = PEER_KEYS_WITHOUT_EFFECT["horde_model_stickiness"]
        mapped["model_stickiness"] = f"horde_model_stickiness: {why}"
    return mapped


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    file_values = _read_yaml(path) if path is not None else {}
    return build_config(file_values, environ=environ, overrides=overrides, source=path)


def semantic_warnings(config: BridgeConfig) -> list[str]:
    """Valid but probably not what the operator wants."""
    warnings = []
    if is_anonymous(config):
        warnings.append(
            "api_key is the anonymous key 0000000000: the horde refuses anonymous workers "
            "(AnonForbiddenWorker). Register at https://aihorde.net/register and set HORDE_API_KEY."
        )
    if bridge_agent_name(config) not in RECOGNISED_BRIDGE_NAMES:
        warnings.append(
            f"bridge_agent {bridge_agent_name(config)!r} is not a name the horde recognises: it will offer "
            "no img2img, inpainting or post-processing jobs and pays 0.75x kudos"
        )
    if dreamer_name(config) == config.alchemist_name and config.dreamer is not False \
            and config.alchemist is not False:
        warnings.append("the image worker's name (dreamer_name / worker_name) equals alchemist_name: "
                        "the horde needs distinct names when both run")
    if unknown_forms(config):
        warnings.append(
            f"forms: {', '.join(repr(f) for f in unknown_forms(config))} dropped: not a form the horde "
            f"knows (known: {', '.join(KNOWN_FORMS)})"
        )
    for key, why in NOT_ACTED_ON.items():
        if getattr(config, key) != BridgeConfig.model_fields[key].default:
            warnings.append(f"{key} is set but not acted on yet: {why}")
    return warnings


def masked_dump(config: BridgeConfig) -> dict[str, Any]:
    """The resolved config for display: secrets masked."""
    data = config.model_dump(mode="json")
    key = config.api_key.get_secret_value()
    data["api_key"] = "0000000000 (anonymous)" if key == ANONYMOUS_API_KEY else f"***{len(key)} chars***"
    if config.civitai_api_token is not None:
        data["civitai_api_token"] = f"***{len(config.civitai_api_token.get_secret_value())} chars***"
    return data


def secrets(config: BridgeConfig) -> list[str]:
    """Every secret value of the config (the log masks them)."""
    values = [config.api_key.get_secret_value()]
    if config.civitai_api_token is not None:
        values.append(config.civitai_api_token.get_secret_value())
    return [v for v in values if v]
