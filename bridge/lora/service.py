"""The worker's LoRA/TI support as one object on the runtime (`runtime.loras`).

* `available()`: whether pops ask for LoRA jobs (`allow_lora`): the config allows it, the cache folder is
  writable, CivitAI answered (or the cache has files to serve), and CivitAI is not in its back-off after
  repeated failures. Every change is logged once.
* `prepare()`: a job's LoRAs/TIs before it runs (`plan.plan_extras`), within the job's time.
* `applied()`: the runner's step around each pipeline use: the job's LoRAs merged (or any left from an
  earlier job taken out), TI hooks in place; what happened goes into the job's gen_metadata.
* `prefetch()`: the most requested LoRAs downloaded ahead of time (`--download-models`, and a background
  thread at start that never blocks serving).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.lora.civitai import DEFAULT_BASE_URL, CivitaiClient, CivitaiError
from bridge.lora.patch import LoraPatcher, LoraUse, PatchReport
from bridge.lora.plan import JobExtras, PlannedLora, horde_baseline, plan_extras
from bridge.lora.prompts import strip_markers
from bridge.lora.store import GB, LoraStore
from bridge.lora.weights import LoraFormatError, LoraWeights, parse_lora

if TYPE_CHECKING:
    from bridge.api_models import GenerationPayload
    from models.records import ModelRecord

logger = logging.getLogger(__name__)

PARSED_KEEP = 8  # LoRA files kept parsed in RAM (switching back to a recent set needs no re-read)
FETCH_SHARE_OF_TTL = 0.5  # the part of a job's ttl its downloads may take; the rest is for generating
DEFAULT_TTL_S = 120.0
WRITABLE_RECHECK_S = 300.0


class LoraSupport:
    def __init__(self, *, enabled: bool, civitai: CivitaiClient, store: LoraStore, nsfw: bool = True) -> None:
        self.enabled = enabled
        self.civitai = civitai
        self.store = store
        self.nsfw = nsfw
        self.patcher = LoraPatcher()
        self._parsed: OrderedDict[tuple[str, bool], LoraWeights] = OrderedDict()
        self._parse_lock = threading.Lock()
        self._probed: bool | None = None
        self._last_state: tuple[bool, str] | None = None
        self._stop = threading.Event()
        self._writable_at: tuple[float, bool] | None = None

    @classmethod
    def from_config(cls, config: Any, cache_home: Path) -> LoraSupport:
        token = config.civitai_api_token.get_secret_value() if config.civitai_api_token else None
        root = Path(cache_home) / "lora"
        civitai = CivitaiClient(
            config.civitai_url or DEFAULT_BASE_URL, root / "civitai", token=token, nsfw=config.nsfw
        )
        store = LoraStore(root, int(config.max_lora_cache_size * GB), civitai)
        return cls(enabled=bool(config.allow_lora), civitai=civitai, store=store, nsfw=bool(config.nsfw))

    # --- popping honestly ---------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Ask CivitAI once (a one-item listing); the answer feeds `available()`."""
        try:
            self.civitai.get_json("/api/v1/models?limit=1&types=LORA", deadline=None)  # one try
            self._probed = True
        except CivitaiError as exc:
            logger.warning("CivitAI at %s did not answer (%s)", self.civitai.base_url, exc)
            self._probed = False
        return self._probed

    def state(self) -> tuple[bool, str]:
        """(allow_lora, why) as things stand now."""
        if not self.enabled:
            return False, "allow_lora is false"
        if not self._writable():
            return False, f"the LoRA cache {self.store.root} is not writable"
        if not self.civitai.reachable():
            return False, "CivitAI failed repeatedly: backing off"
        if self._probed is False and self.store.is_empty():
            return False, "CivitAI is unreachable and the LoRA cache is empty"
        return True, "CivitAI reachable" if self._probed is not False else "serving the LoRA cache"

    def _writable(self) -> bool:
        # Checked on the disk at most every few minutes: pops come every second.
        now = time.monotonic()
        if self._writable_at is None or now - self._writable_at[0] > WRITABLE_RECHECK_S:
            self._writable_at = (now, self.store.writable())
        return self._writable_at[1]

    def available(self) -> bool:
        allowed, why = self.state()
        if (allowed, why) != self._last_state:
            self._last_state = (allowed, why)
            (logger.info if allowed else logger.warning)(
                "LoRA/TI jobs: %s (%s)", "asking for them" if allowed else "not asking for them", why
            )
        return allowed

    # --- one job ------------------------------------------------------------------------------------------

    def prepare(self, payload: GenerationPayload, record: ModelRecord, *, ttl: float | None) -> JobExtras:
        deadline = time.monotonic() + max(5.0, (ttl or DEFAULT_TTL_S) * FETCH_SHARE_OF_TTL)
        try:
            return plan_extras(self, payload, record, deadline=deadline)
        except Exception as exc:  # noqa: BLE001 - a broken LoRA cache must cost the LoRAs, not the job
            logger.exception("LoRA/TI preparation failed: running the job without them")
            extras = JobExtras(prompt=strip_markers(payload.prompt, {t.name.lower() for t in payload.tis}))
            for spec in payload.loras:
                extras.report("lora", "download_failed", str(spec.name), f"lora {spec.name!r}: {exc}")
            for spec in payload.tis:
                extras.report("ti", "download_failed", str(spec.name), f"ti {spec.name!r}: {exc}")
            return extras

    @contextmanager
    def applied(self, model: str, pipe: Any, extras: JobExtras | None) -> Iterator[PatchReport]:
        """The runner's LoRA step: `pipe`'s model holds exactly the job's LoRAs for the block."""
        planned = list(extras.loras) if extras is not None else []
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        uses = [LoraUse(p.key, p.title, self._loader(p, sdxl, pipe), p.model, p.clip) for p in planned]
        in_use = [p.cache_key for p in planned if p.cache_key]
        with self.store.in_use(in_use), self.patcher.use(model, pipe, uses) as report:
            if extras is not None:
                self._report(extras, planned, report)
            yield report

    def _loader(self, planned: PlannedLora, sdxl: bool, pipe: Any):
        def load() -> LoraWeights:
            key = (planned.key, sdxl)
            with self._parse_lock:
                if key in self._parsed:
                    self._parsed.move_to_end(key)
                    return self._parsed[key]
            weights = parse_lora(planned.path, sdxl=sdxl, unet_config=pipe.unet.config)
            with self._parse_lock:
                self._parsed[key] = weights
                while len(self._parsed) > PARSED_KEEP:
                    self._parsed.popitem(last=False)
            return weights

        return load

    @staticmethod
    def _report(extras: JobExtras, planned: list[PlannedLora], report: PatchReport) -> None:
        extras.patch = report
        for lora in planned:
            if lora.title in report.failed:
                extras.report(
                    "lora", "parse_failed", lora.name, f"lora {lora.title!r}: {report.failed[lora.title]}"
                )
            elif not report.matched.get(lora.title):
                why = f"lora {lora.title!r}: none of its weights fit this model: not applied"
                extras.report("lora", "baseline_mismatch", lora.name, why)
            else:
                skipped = report.skipped.get(lora.title)
                extras.inform(
                    f"lora {lora.title}: applied at model {lora.model:g}, clip {lora.clip:g} "
                    f"({report.matched[lora.title]} weights"
                    + (f", {skipped} did not fit" if skipped else "")
                    + ")"
                )

    # --- ahead of time ------------------------------------------------------------------------------------

    def prefetch(self, count: int, baselines: set[str], *, deadline: float | None = None) -> int:
        """Download the worker's own most used LoRAs and CivitAI's top rated ones for the baselines served,
        within half the cache budget; returns how many are present now."""
        if count <= 0 or not self.enabled:
            return 0
        budget = self.store.budget_bytes // 2
        present = used = 0
        try:
            candidates = self.civitai.top("lora", limit=max(count * 2, 10), deadline=deadline)
        except CivitaiError as exc:
            logger.warning("LoRA prefetch: CivitAI's list is not available (%s)", exc)
            return 0
        for resolved in candidates:
            if self._stop.is_set() or present >= count:
                break
            if horde_baseline(resolved.base_model) not in baselines or (resolved.nsfw and not self.nsfw):
                continue
            if used + resolved.size_bytes > budget:
                continue
            try:
                self.store.ensure(resolved, deadline=deadline)
            except CivitaiError as exc:
                logger.info("LoRA prefetch: %r skipped (%s)", resolved.name, exc)
                continue
            present += 1
            used += resolved.size_bytes
        logger.info("LoRA prefetch: %d LoRA(s) ready in %s", present, self.store.root)
        return present

    def start_background(self, count: int, baselines: set[str]) -> threading.Thread:
        """Probe CivitAI, then prefetch in a daemon thread: serving starts at once."""

        def run() -> None:
            if self.probe():
                self.prefetch(count, baselines)
            self.available()

        thread = threading.Thread(target=run, name="lora-prefetch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


__all__ = ["LoraSupport", "LoraFormatError"]


def describe(config: Any) -> list[str]:
    """What `--check-config` says about LoRA/TI support (no network)."""
    root = Path(config.cache_home) / "lora"
    if not config.allow_lora:
        return ["allow_lora is false: pops never ask for LoRA or textual-inversion jobs"]
    store = LoraStore(
        root, int(config.max_lora_cache_size * GB), CivitaiClient(config.civitai_url, root / "civitai")
    )
    writable = store.writable()
    token = (
        "set (sent on download URLs only)" if config.civitai_api_token else "not set (some files need one)"
    )
    lines = [
        f"allow_lora is true: pops ask for LoRA/TI jobs while {root} is writable "
        f"({'it is' if writable else 'IT IS NOT'}) and CivitAI at {config.civitai_url} answers or the cache "
        "holds files; after 3 CivitAI failures in a row they stop asking for 10 minutes",
        f"cache: {store.used_bytes() / GB:.2f} of {config.max_lora_cache_size} GB used by downloads "
        f"(least recently used evicted first); {sum(len(store.hand_placed(k)) for k in ('lora', 'ti'))} "
        "file(s) placed by hand are kept and served by file name",
        f"civitai_api_token: {token}",
        f"prefetch_loras: {config.prefetch_loras} top-rated LoRA(s) downloaded in the background at start "
        "and by --download-models (within half the cache)",
    ]
    return lines
