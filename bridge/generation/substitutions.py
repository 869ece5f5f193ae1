"""A field of the horde's request that the worker did not honour exactly, and how it is reported.

Every substitution becomes one gen_metadata entry on the submit, so the requester sees what was run
instead of what was asked. Most are `information` with a readable `ref`; an unusable source image or mask
is `source_image` / `source_mask` with `parse_failed` or `download_failed` (what the public workers send).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_REF_CHARS = 255
MAX_GEN_METADATA = 50


@dataclass(frozen=True)
class Substitution:
    field: str
    asked: Any
    used: Any
    why: str
    meta_type: str = "information"
    meta_value: str = "see_ref"

    @property
    def ref(self) -> str:
        text = f"{self.field}: asked {_short(self.asked)}, used {_short(self.used)}: {self.why}"
        return text if len(text) <= MAX_REF_CHARS else text[: MAX_REF_CHARS - 1] + "…"

    def to_metadata(self) -> dict[str, str]:
        return {"type": self.meta_type, "value": self.meta_value, "ref": self.ref}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def information(ref: str) -> dict[str, str]:
    """A free-text information entry, cut to the horde's 255-character limit."""
    text = ref if len(ref) <= MAX_REF_CHARS else ref[: MAX_REF_CHARS - 1] + "…"
    return {"type": "information", "value": "see_ref", "ref": text}


def cap_metadata(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """At most 50 entries (the horde rejects the whole submit beyond that); the last one says how many
    were left out. Duplicates are dropped first: n_iter images share the job's substitutions."""
    unique = list({tuple(sorted(e.items())): e for e in entries}.values())
    if len(unique) <= MAX_GEN_METADATA:
        return unique
    kept = unique[: MAX_GEN_METADATA - 1]
    return [*kept, information(f"{len(unique) - len(kept)} more gen_metadata entries left out")]
