"""One model record of the horde's reference files, in both shapes, and how an entry is parsed.

Checkpoint records carry `config.files` / `config.download` (as in `stable_diffusion.json` and its siblings);
diffusers records carry `hf_path` (as in `diffusers-2023.json`). Parsing is tolerant: a malformed entry is
logged and left out, never fatal, since one bad upstream entry must not cost a worker its other models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger("models.reference")

# Order matters only for logs; generation files first.
REFERENCE_FILES: tuple[str, ...] = (
    "stable_diffusion",
    "diffusers",
    "esrgan",
    "gfpgan",
    "codeformer",
    "blip",
    "clip",
    "safety_checker",
    "controlnet",
    "miscellaneous",
)
GENERATION_CATEGORIES: frozenset[str] = frozenset({"stable_diffusion", "diffusers"})

BASELINE_SD15 = "stable diffusion 1"
BASELINE_SD21 = "stable diffusion 2"
BASELINE_SDXL = "stable_diffusion_xl"
# Baselines this worker's loaders can build ("" is an operator's record without one: SD 1.x). Others
# (flux_1, stable_cascade, ...) are never chosen by meta entries or dynamic_models, nor advertised.
SERVABLE_BASELINES = frozenset({BASELINE_SD15, BASELINE_SD21, BASELINE_SDXL, ""})


def is_servable(record: ModelRecord) -> bool:
    """A generation model whose baseline this worker can run."""
    return record.category in GENERATION_CATEGORIES and (record.baseline or "").lower() in SERVABLE_BASELINES

# Keys mapped onto ModelRecord fields; everything else in an entry lands in `extra`.
_KNOWN_KEYS = frozenset(
    {
        "name",
        "type",
        "baseline",
        "inpainting",
        "style",
        "nsfw",
        "description",
        "version",
        "config",
        "hf_path",
        "features_not_supported",
        "requirements",
        "tags",
        "trigger",
        "size_on_disk_bytes",
        "available",
    }
)


class FileSpec(BaseModel):
    """One file a model needs; `path` is relative to the model's directory."""

    model_config = ConfigDict(extra="allow")

    path: str
    sha256sum: str | None = None
    md5sum: str | None = None

    @field_validator("sha256sum", "md5sum", mode="before")
    @classmethod
    def _normalise_hash(cls, value: Any) -> str | None:
        # The reference mixes upper and lower case hex; "" means "no hash".
        if value is None or str(value).strip() == "":
            return None
        return str(value).strip().lower()


class DownloadSpec(BaseModel):
    """Where one file comes from; `file_path` is a sub-directory of the model's directory ("" mostly)."""

    model_config = ConfigDict(extra="allow")

    file_name: str
    file_path: str = ""
    file_url: str = ""

    @field_validator("file_path", "file_url", mode="before")
    @classmethod
    def _none_to_empty(cls, value: Any) -> str:
        return "" if value is None else str(value)

    @property
    def relative_path(self) -> str:
        """The path of the file inside the model's directory, comparable with `FileSpec.path`."""
        # A leading "/" is kept: only local custom records may use absolute paths (checked on download).
        folder = self.file_path.rstrip("/")
        return f"{folder}/{self.file_name}" if folder else self.file_name


class ModelRecord(BaseModel):
    """One entry of any reference file. Tolerant: any optional key may be missing or null."""

    model_config = ConfigDict(extra="ignore")

    name: str
    type: str = ""
    baseline: str | None = None
    inpainting: bool = False
    style: str | None = None
    nsfw: bool = False
    description: str | None = None
    version: str | None = None
    files: list[FileSpec] = Field(default_factory=list)
    downloads: list[DownloadSpec] = Field(default_factory=list)
    hf_path: str | None = None
    features_not_supported: list[str] = Field(default_factory=list)
    requirements: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    trigger: list[str] = Field(default_factory=list)
    size_on_disk_bytes: int | None = None
    available: bool | None = None
    category: str = "stable_diffusion"
    # Set for records read from an operator's local file: relative `files[].path` resolve against it.
    base_dir: Path | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inpainting", "nsfw", mode="before")
    @classmethod
    def _none_false(cls, value: Any) -> bool:
        return bool(value) if value is not None else False

    @field_validator("type", mode="before")
    @classmethod
    def _type_str(cls, value: Any) -> str:
        return "" if value is None else str(value)

    @field_validator("version", "baseline", "style", "description", "hf_path", mode="before")
    @classmethod
    def _optional_str(cls, value: Any) -> str | None:
        # Some entries carry numeric versions (1.5); the horde treats them as strings.
        return None if value is None else str(value)

    @field_validator("features_not_supported", "tags", "trigger", mode="before")
    @classmethod
    def _str_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list | tuple):
            return []  # garbage in an optional list must not cost the whole model
        return [str(v) for v in value]

    @field_validator("requirements", mode="before")
    @classmethod
    def _dict_or_empty(cls, value: Any) -> dict[str, Any]:
        return dict(value) if isinstance(value, Mapping) else {}

    @field_validator("size_on_disk_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @classmethod
    def from_entry(
        cls, key: str, raw: Mapping[str, Any], *, category: str, base_dir: Path | None = None
    ) -> ModelRecord:
        """Build a record from one reference entry; the dict key is the canonical name (the horde's)."""
        config = raw.get("config") or {}
        files = [f for f in (config.get("files") or []) if isinstance(f, Mapping) and f.get("path")]
        downloads = [
            d for d in (config.get("download") or []) if isinstance(d, Mapping) and d.get("file_name")
        ]
        if raw.get("name") not in (None, key):
            # The server indexes by key (e.g. control_qr_sdxl whose name says control_qr_xl).
            logger.debug("reference entry %r names itself %r; using the key", key, raw.get("name"))
        data = {k: v for k, v in raw.items() if k in _KNOWN_KEYS and k != "config"}
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS}
        config_extra = {k: v for k, v in config.items() if k not in ("files", "download")}
        if config_extra:
            extra["config"] = config_extra
        data.update(
            name=key, files=files, downloads=downloads, category=category, base_dir=base_dir, extra=extra
        )
        return cls.model_validate(data)


def parse_reference(
    data: Mapping[str, Any], *, category: str, base_dir: Path | None = None, source: str = "<memory>"
) -> dict[str, ModelRecord]:
    """Parse one reference file's content; malformed entries are logged and left out, never fatal."""
    records: dict[str, ModelRecord] = {}
    for key, raw in data.items():
        if not isinstance(raw, Mapping):
            logger.warning("reference %s: entry %r is not an object; ignored", source, key)
            continue
        entry_category = str(raw.get("category") or category)
        try:
            records[key] = ModelRecord.from_entry(key, raw, category=entry_category, base_dir=base_dir)
        except ValidationError as exc:
            logger.warning("reference %s: entry %r is malformed (%s); ignored", source, key, exc)
    return records


def category_for_file(path: Path) -> str:
    """The category a local reference file contributes to, from its stem (`diffusers-2023` → diffusers)."""
    stem = path.stem.lower().replace("-", "_")
    for known in REFERENCE_FILES:
        if stem == known or stem.startswith(known + "_"):
            return known
    return "stable_diffusion"
