"""Pydantic models of the worker's pop and submit bodies, written from the API contract.

Replies are parsed tolerantly: unknown keys are ignored (the horde adds fields over time) and a `null` for
any key means "use the default" (the server sends unset top-level keys as null). Requests are ours, so
their constraints are checked when they are built: a bad config fails at start, not at the first pop.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import zlib
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

DEFAULT_BRIDGE_AGENT = "unknown:0:unknown"
MAX_GEN_METADATA = 50
MAX_REF_CHARS = 255


class _Tolerant(BaseModel):
    # coerce_numbers_to_str: LoRA/TI names arrive as CivitAI ids, sometimes as JSON numbers.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


_LOOSE_FIELDS = frozenset({"seed"})  # a string of an int on the wire, read by seed_from_wire


@functools.cache
def _json_kind(model: type[BaseModel], name: str) -> str | None:
    """"bool" or "number" when the field holds one of those JSON types, else None (free to coerce)."""
    annotation = model.model_fields[name].annotation
    types = {t for t in (get_args(annotation) or (annotation,)) if t is not type(None)}
    if types == {bool}:
        return "bool"
    return "number" if types and types <= {int, float} else None


class _WireTyped(_Tolerant):
    """A pop reply's models: a flag must arrive as true/false and a number as a JSON number. Pydantic's lax
    mode would read `true` as 1 step and "yes" as true; a value of the wrong JSON type is unreadable instead
    (strings still take numbers: LoRA names arrive as CivitAI ids)."""

    @field_validator("*", mode="before")
    @classmethod
    def _own_json_type(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        kind = None if name is None or name in _LOOSE_FIELDS else _json_kind(cls, name)
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError("expected true or false")
        if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
            # NaN and infinities are numbers here: build_request refuses them with its own reason.
            raise ValueError("expected a number")
        return value


class _Readable(_WireTyped):
    """A reply that may arrive with fields of the wrong type: bridge.pop_reader leaves those out and names
    them here, so that the job can be faulted saying which field it could not read."""

    _unreadable: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def unreadable(self) -> dict[str, str]:
        """field -> why it could not be read (empty for a clean reply)."""
        return dict(self._unreadable)

    def note_unreadable(self, field: str, why: str) -> None:
        self._unreadable[field] = why


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- generate


class LoraSpec(_WireTyped):
    name: str
    model: float = 1.0
    clip: float = 1.0
    inject_trigger: str | None = None
    is_version: bool = False


class TiSpec(_WireTyped):
    name: str
    inject_ti: str | None = None  # "prompt" | "negprompt" | absent
    strength: float = 1.0


class ExtraText(_WireTyped):
    text: str = ""
    reference: str | None = None


class ExtraSourceImage(_WireTyped):
    image: str
    strength: float = 1.0


class HordeMessage(_WireTyped):
    id: str | None = None
    message: str = ""
    origin: str | None = None
    expiry: str | None = None


def seed_from_wire(value: Any) -> int | None:
    """The horde sends the seed as a string of an int < 2**32. Anything else still yields a stable seed."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("seed must be a number or a string")
    if isinstance(value, int):
        return value % 2**32
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("seed must be a finite number")
        return int(value) % 2**32
    text = value.strip()
    try:
        return int(text) % 2**32
    except ValueError:
        # A non-numeric seed would otherwise fail the whole job; the legacy worker hashed such seeds too.
        return zlib.crc32(text.encode())


class GenerationPayload(_WireTyped):
    prompt: str = ""
    ddim_steps: int = 30
    n_iter: int = 1
    seed: int | None = None
    sampler_name: str = "k_euler_a"
    cfg_scale: float = 7.5
    width: int = 512
    height: int = 512
    karras: bool = False
    tiling: bool = False
    hires_fix: bool = False
    hires_fix_denoising_strength: float | None = None
    clip_skip: int = 1
    denoising_strength: float | None = None
    post_processing: list[str] = Field(default_factory=list)
    facefixer_strength: float | None = None
    use_nsfw_censor: bool = False
    loras: list[LoraSpec] = Field(default_factory=list)
    tis: list[TiSpec] = Field(default_factory=list)
    special: dict[str, Any] = Field(default_factory=dict)
    image_is_control: bool = False
    return_control_map: bool = False
    transparent: bool = False
    control_type: str | None = None
    extra_texts: list[ExtraText] = Field(default_factory=list)
    workflow: str | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        return seed_from_wire(value)

    @property
    def positive_prompt(self) -> str:
        return self.prompt.split("###", 1)[0].strip()

    @property
    def negative_prompt(self) -> str:
        """The text after the first `###` (the horde's negative-prompt separator)."""
        parts = self.prompt.split("###", 1)
        return parts[1].strip() if len(parts) > 1 else ""


class GenerationPopRequest(_Request):
    """Every field of generate/pop, defaulting to what the server's parser would apply if omitted."""

    name: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list, max_length=300)
    priority_usernames: list[str] = Field(default_factory=list)
    nsfw: bool = True
    blacklist: list[str] = Field(default_factory=list)
    bridge_agent: str = Field(default=DEFAULT_BRIDGE_AGENT, max_length=1000)
    threads: int = Field(default=1, ge=1, le=50)
    require_upfront_kudos: bool = False
    amount: int = Field(default=1, ge=1, le=20)
    extra_slow_worker: bool = False
    max_pixels: int = Field(default=512 * 512, ge=1)
    allow_img2img: bool = True
    allow_painting: bool = True
    allow_unsafe_ipaddr: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    allow_lora: bool = False
    limit_max_steps: bool = False

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: list[str]) -> list[str]:
        bad = [m for m in models if not 3 <= len(m) <= 255]
        if bad:
            raise ValueError(f"model names must be 3-255 characters: {bad}")
        return models

    @field_validator("priority_usernames")
    @classmethod
    def _usernames(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if "#" not in n]
        if bad:
            raise ValueError(f"priority usernames must be 'alias#id': {bad}")
        return names


class GenerationPopResponse(_Readable):
    payload: GenerationPayload = Field(default_factory=GenerationPayload)
    id: str | None = None
    ids: list[str] = Field(default_factory=list)
    messages: list[HordeMessage] = Field(default_factory=list)
    ttl: float | None = None
    skipped: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    source_image: str | None = None
    source_processing: str = "img2img"
    source_mask: str | None = None
    extra_source_images: list[ExtraSourceImage] = Field(default_factory=list)
    r2_upload: str | None = None
    r2_uploads: list[str] = Field(default_factory=list)

    @property
    def is_idle(self) -> bool:
        """No job: the idle reply still carries a default payload, so only the ids tell."""
        return not self.id and not self.ids

    @property
    def job_ids(self) -> list[str]:
        """Every id to submit (older servers sent only `id`)."""
        if self.ids:
            return list(self.ids)
        return [self.id] if self.id else []

    def upload_url_for(self, job_id: str) -> str | None:
        """The presigned PUT for `job_id`: r2_uploads pairs with ids by position."""
        ids = self.job_ids
        if job_id not in ids:
            return None
        index = ids.index(job_id)
        if len(self.r2_uploads) == len(ids):
            return self.r2_uploads[index]
        if index == 0 and self.r2_upload:
            return self.r2_upload
        return None


class MetadataType(enum.StrEnum):
    LORA = "lora"
    TI = "ti"
    CENSORSHIP = "censorship"
    SOURCE_IMAGE = "source_image"
    SOURCE_MASK = "source_mask"
    EXTRA_SOURCE_IMAGES = "extra_source_images"
    BATCH_INDEX = "batch_index"
    INFORMATION = "information"
    AESTHETIC_SCORE = "aesthetic_score"


class MetadataValue(enum.StrEnum):
    DOWNLOAD_FAILED = "download_failed"
    PARSE_FAILED = "parse_failed"
    BASELINE_MISMATCH = "baseline_mismatch"
    CSAM = "csam"
    NSFW = "nsfw"
    SEE_REF = "see_ref"


class GenMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MetadataType
    value: MetadataValue
    ref: str | None = None

    @field_validator("ref", mode="before")
    @classmethod
    def _short_ref(cls, ref: Any) -> Any:
        # A long exception text must not cost the whole submit a 400.
        if isinstance(ref, str) and len(ref) > MAX_REF_CHARS:
            return ref[: MAX_REF_CHARS - 1] + "…"
        return ref


class GenerationSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    generation: str
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    seed: int
    gen_metadata: list[GenMetadata] = Field(default_factory=list, max_length=MAX_GEN_METADATA)

    @field_validator("gen_metadata", mode="before")
    @classmethod
    def _at_most_50(cls, entries: Any) -> Any:
        # Over 50 the horde answers 400 and the image is lost; losing metadata is the lesser harm.
        if isinstance(entries, list) and len(entries) > MAX_GEN_METADATA:
            logger.warning(
                "gen_metadata has %d entries; sending the first %d", len(entries), MAX_GEN_METADATA
            )
            return entries[:MAX_GEN_METADATA]
        return entries

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------------------------------------- alchemy


class InterrogationPopRequest(_Request):
    name: str = Field(min_length=1)
    priority_usernames: list[str] = Field(default_factory=list)
    forms: list[str] = Field(default_factory=list)
    amount: int = Field(default=1, ge=1)
    bridge_agent: str = Field(default=DEFAULT_BRIDGE_AGENT, max_length=1000)
    threads: int = Field(default=1, ge=1, le=100)
    max_tiles: int = Field(default=80, ge=1, le=256)

    @field_validator("forms")
    @classmethod
    def _unique_forms(cls, forms: list[str]) -> list[str]:
        # The swagger model has uniqueItems: a duplicate gets the whole pop rejected.
        return list(dict.fromkeys(forms))


class AlchemyForm(_Readable):
    id: str
    form: str
    payload: dict[str, Any] = Field(default_factory=dict)
    source_image: str | None = None
    r2_upload: str | None = None


class InterrogationPopResponse(_Tolerant):
    forms: list[AlchemyForm] = Field(default_factory=list)
    skipped: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_idle(self) -> bool:
        return not self.forms


class InterrogationSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    result: dict[str, Any]
    # The server does not validate it; only "faulted" means something to it.
    state: str = "ok"

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SubmitResponse(_Tolerant):
    reward: float = 0.0
