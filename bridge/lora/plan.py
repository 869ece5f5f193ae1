"""One job's LoRAs and TIs: what is applied, at which strength, what the prompt becomes, what is reported.

For each LoRA (at most 5, the horde's limit) and TI (at most 20), in the job's order:
1. find it: a file the operator put in the cache folder under that name, else CivitAI (name, model id, or
   version id with `is_version`);
2. refuse what must not run: an NSFW LoRA on an SFW worker, a file over the size limits, a base model that
   does not fit the job's model (`baseline_mismatch`);
3. download and verify it (within the job's time), then read a TI's vectors (a LoRA is read when applied);
4. inject: a LoRA's trigger words (`any`: one, chosen with the job's seed; `all`: every one; a word: the
   closest trained word) go in front of the prompt; a TI goes into the prompt or negative prompt as
   `(embedding:NAME:STRENGTH)` (`inject_ti` null: the requester wrote `embedding:NAME` themselves).
Anything that fails is dropped, the job runs without it, and gen_metadata says so
(`{"type": "lora"|"ti", "value": "download_failed"|"parse_failed"|"baseline_mismatch", "ref": name}`); what is
applied is reported as information entries. Every outcome is logged too.
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.generation.substitutions import information
from bridge.lora.civitai import CivitaiError, Resolved
from bridge.lora.patch import PatchReport
from bridge.lora.prompts import strip_markers
from bridge.lora.weights import LoraFormatError, TiEmbedding, parse_ti
from models.records import BASELINE_SD15, BASELINE_SD21, BASELINE_SDXL

if TYPE_CHECKING:
    from bridge.api_models import GenerationPayload, LoraSpec, TiSpec
    from bridge.lora.service import LoraSupport
    from models.records import ModelRecord

logger = logging.getLogger(__name__)

MAX_LORAS = 5
MAX_TIS = 20
STRENGTH_RANGE = (-5.0, 5.0)
CLOSE_TRIGGER_RATIO = 0.65


def horde_baseline(civitai_base_model: str) -> str | None:
    """CivitAI's baseModel -> the horde's baseline name; None for families this worker cannot run."""
    base = civitai_base_model.strip().lower()
    if base.startswith("sd 1"):
        return BASELINE_SD15
    if base.startswith("sd 2"):
        return BASELINE_SD21
    if base.startswith("sdxl") or base in ("pony", "illustrious", "noobai"):
        return BASELINE_SDXL
    return None


def _model_baseline(record: ModelRecord) -> str:
    return (record.baseline or BASELINE_SD15).lower()


@dataclass(frozen=True)
class PlannedLora:
    name: str  # as the job named it
    title: str  # CivitAI's name, or the file's
    path: Path
    key: str  # the file's identity (sha256 or path)
    model: float
    clip: float
    cache_key: str | None = None  # its entry in the LoRA cache (None: a hand-placed file)


@dataclass
class JobExtras:
    """What a job applies, filled in before it runs; the runner appends what happens while applying."""

    loras: list[PlannedLora] = field(default_factory=list)
    tis: dict[str, TiEmbedding] = field(default_factory=dict)  # marker name (lower case) -> vectors
    prompt: str = ""
    metadata: list[dict[str, str]] = field(default_factory=list)
    patch: PatchReport | None = None  # the last merge step's report (times, modules, reuse)

    def report(self, kind: str, value: str, ref: str, log: str) -> None:
        self.metadata.append({"type": kind, "value": value, "ref": ref[:255]})
        logger.info(log)

    def inform(self, text: str) -> None:
        self.metadata.append(information(text))
        logger.info(text)


def _clamp(value: float) -> float:
    return min(STRENGTH_RANGE[1], max(STRENGTH_RANGE[0], float(value)))


def pick_trigger(words: Sequence[str], inject: str | None, seed: int) -> str | None:
    """The trained word(s) to put in front of the prompt for `inject_trigger`."""
    if not inject or not words:
        return None
    if inject.lower() == "any":
        return random.Random(seed).choice(list(words))
    if inject.lower() == "all":
        return ", ".join(words)
    wanted = inject.strip().lower()
    for word in words:
        if word.lower() == wanted:
            return word
    for word in words:
        if wanted in word.lower():
            return word
    scored = [(difflib.SequenceMatcher(None, wanted, w.lower()).ratio(), w) for w in words]
    ratio, best = max(scored)
    return best if ratio >= CLOSE_TRIGGER_RATIO else None


def plan_extras(
    support: LoraSupport, payload: GenerationPayload, record: ModelRecord, *, deadline: float | None
) -> JobExtras:
    """1. LoRAs, 2. TIs, 3. the prompt with triggers and TI markers."""
    positive, _, negative = payload.prompt.partition("###")
    extras = JobExtras()
    seed = int(payload.seed or 0)
    triggers: list[str] = []
    for spec in payload.loras[:MAX_LORAS]:
        trigger = _plan_lora(support, spec, record, extras, seed, deadline)
        if trigger:
            triggers.append(trigger)
    for spec in payload.loras[MAX_LORAS:]:
        extras.inform(f"lora {spec.name}: more than {MAX_LORAS} LoRAs asked: not applied")
    dropped: set[str] = set()
    for spec in payload.tis[:MAX_TIS]:
        positive, negative = _plan_ti(support, spec, record, extras, deadline, positive, negative, dropped)
    for spec in payload.tis[MAX_TIS:]:
        extras.inform(f"ti {spec.name}: more than {MAX_TIS} textual inversions asked: not applied")
        dropped.add(spec.name.strip().lower())
    positive, negative = strip_markers(positive, dropped), strip_markers(negative, dropped)
    if triggers:
        positive = ", ".join([*triggers, positive.strip()]) if positive.strip() else ", ".join(triggers)
    extras.prompt = f"{positive}###{negative}" if negative.strip() else positive
    return extras


def _find(support: LoraSupport, kind: str, name: str, is_version: bool, deadline: float | None):
    """(path, resolved): a hand-placed file (resolved None), or a CivitAI version whose file is present."""
    local = None if is_version else support.store.local(kind, name)
    if local is not None:
        return local, None
    resolved = support.civitai.resolve(kind, name, is_version=is_version, deadline=deadline)
    return None, resolved


def _refusal(support: LoraSupport, resolved: Resolved, record: ModelRecord) -> tuple[str, str] | None:
    """(metadata value, why) when the file must not be used for this job."""
    if resolved.nsfw and not support.nsfw:
        return "download_failed", "it is marked NSFW and this worker is SFW"
    baseline = horde_baseline(resolved.base_model)
    if baseline != _model_baseline(record):
        why = f"its base model {resolved.base_model or '?'} does not fit {record.name} ({record.baseline})"
        return "baseline_mismatch", why
    return None


def _plan_lora(
    support: LoraSupport,
    spec: LoraSpec,
    record: ModelRecord,
    extras: JobExtras,
    seed: int,
    deadline: float | None,
) -> str | None:
    name = str(spec.name)
    try:
        path, resolved = _find(support, "lora", name, spec.is_version, deadline)
        if resolved is not None:
            refusal = _refusal(support, resolved, record)
            if refusal is not None:
                extras.report("lora", refusal[0], name, f"lora {name!r} not applied: {refusal[1]}")
                return None
            path = support.store.ensure(resolved, deadline=deadline)
    except CivitaiError as exc:
        extras.report("lora", "download_failed", name, f"lora {name!r} not applied: {exc}")
        return None
    model, clip = _clamp(spec.model), _clamp(spec.clip)
    title = resolved.name if resolved is not None else path.stem
    if (model, clip) != (spec.model, spec.clip):
        extras.inform(f"lora {title}: strengths model {spec.model:g} / clip {spec.clip:g} clamped to -5...5")
    key = resolved.sha256 if resolved is not None else str(path)
    cache_key = f"lora:{resolved.version_id}" if resolved is not None else None
    extras.loras.append(PlannedLora(name, title, path, key, model, clip, cache_key))
    words = resolved.trained_words if resolved is not None else ()
    trigger = pick_trigger(words, spec.inject_trigger, seed)
    if trigger:
        extras.inform(f"lora {title}: trigger {trigger!r} added to the prompt ({spec.inject_trigger})")
    elif spec.inject_trigger:
        extras.inform(f"lora {title}: no trained word matches inject_trigger {spec.inject_trigger!r}")
    return trigger


def _plan_ti(
    support: LoraSupport,
    spec: TiSpec,
    record: ModelRecord,
    extras: JobExtras,
    deadline: float | None,
    positive: str,
    negative: str,
    dropped: set[str],
) -> tuple[str, str]:
    name = str(spec.name)
    try:
        path, resolved = _find(support, "ti", name, False, deadline)
        if resolved is not None:
            refusal = _refusal(support, resolved, record)
            if refusal is not None:
                extras.report("ti", refusal[0], name, f"ti {name!r} not applied: {refusal[1]}")
                dropped.add(name.lower())
                return positive, negative
            path = support.store.ensure(resolved, deadline=deadline)
        embedding = parse_ti(path)
    except CivitaiError as exc:
        extras.report("ti", "download_failed", name, f"ti {name!r} not applied: {exc}")
        dropped.add(name.lower())
        return positive, negative
    except LoraFormatError as exc:
        extras.report("ti", "parse_failed", name, f"ti {name!r} not applied: {exc}")
        dropped.add(name.lower())
        return positive, negative
    keys = {name.lower()}
    if resolved is not None:
        keys |= {resolved.name.lower(), str(resolved.model_id), str(resolved.version_id)}
    for key in keys:
        extras.tis[key] = embedding
    strength = _clamp(spec.strength)
    if strength != spec.strength:
        extras.inform(f"ti {name}: strength {spec.strength:g} clamped to {strength:g}")
    marker = f"(embedding:{name.lower()}:{strength:g})"
    if spec.inject_ti == "prompt":
        positive = f"{marker},{positive}" if positive.strip() else marker
    elif spec.inject_ti == "negprompt":
        negative = f"{negative},{marker}" if negative.strip() else marker
    where = {"prompt": "the prompt", "negprompt": "the negative prompt"}.get(spec.inject_ti or "", "")
    title = resolved.name if resolved is not None else path.stem
    extras.inform(
        f"ti {title}: {embedding.count} vector(s) in {where} at strength {strength:g}"
        if where
        else f"ti {title}: ready for the prompt's own embedding:{name}"
    )
    return positive, negative
