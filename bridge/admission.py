"""Admission control: before popping, know what this machine can hold; while a job runs, hold it.

* **Offer** (before every generation pop): each ready model's real size (from its files, in the device's
  dtype) plus the working memory of a job (models/working_memory.py, measured per device) against what the
  device can hold now (`ModelCache.capacity`, read from the machine). A model that cannot hold even the
  smallest job offered is left out of the pop; `max_pixels` is the largest size every offered model holds,
  never more than `max_power` allows.
* **Forms** (before every alchemy pop): a form whose model (interrogator or post-processor) plus working
  memory does not fit is not asked for.
* **Running** (around a job): the job is checked again (the machine may have changed since the pop), its
  working memory is held in the cache so that loads and concurrent jobs count it, and its real peak is
  measured into the table. An out-of-memory error (RAM or device; loading, moving, denoising, decoding)
  is caught here: memory is freed, the model's pixel ceiling is lowered (logged once per lowering) and the
  job ends as a `MemoryFault`, whose reason the job submits in gen_metadata. The next job is served.
* **Trim**: every pop first gives back what the soft budgets no longer allow.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.cache import CacheFullError, DeviceOutOfMemoryError, ModelCache, Tier
from models.device import DevicePolicy
from models.heap import collect_everything
from models.working_memory import (
    JobShape,
    PeakMeter,
    WorkingMemoryTable,
    family_of,
    file_weight_bytes,
    folder_weight_bytes,
)

if TYPE_CHECKING:
    from bridge.generation.request import GenerationRequest
    from bridge.runtime import Runtime
    from models.manager import ModelManager

logger = logging.getLogger(__name__)

GIB = 1024**3
PIXEL_STEP = 64 * 64
# A model that cannot hold a job this large (or max_power's own size, if smaller) is not offered: below it the
# horde has almost nothing to give, and offering it would pull max_pixels down for every other model.
FLOOR_PIXELS = 512 * 512
# After an out-of-memory error at N pixels the model is served up to this share of N.
OOM_CEILING_FACTOR = 0.75
HORDE_TILE = 512  # the horde counts an alchemy source's size in 512x512 tiles
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError, DeviceOutOfMemoryError, CacheFullError)


class MemoryFault(Exception):
    """A job this machine cannot hold, or one that ran out of memory; the message says which and why."""


@dataclass(frozen=True)
class Offer:
    models: list[str]
    max_pixels: int


def free_device_memory(device: DevicePolicy) -> None:
    """After an out-of-memory error: collect what the failed job left (its frames are gone by now) and hand
    the allocator's idle blocks back to the driver."""
    collect_everything()
    if device.is_cuda:
        torch.cuda.empty_cache()


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


class Admission:
    def __init__(
        self,
        *,
        cache: ModelCache,
        device: DevicePolicy,
        table: WorkingMemoryTable,
        models: ModelManager | None = None,
        safety_folder: Path | None = None,
    ) -> None:
        self.cache = cache
        self.device = device
        self.table = table
        self.models = models
        self.safety_folder = safety_folder
        self._ceilings: dict[str, int] = {}
        self._weights: dict[str, int] = {}
        self._last_offer: Offer | None = None
        self._unfit_forms: tuple[str, ...] = ()
        self._lock = threading.Lock()

    @property
    def tier(self) -> Tier:
        return Tier(self.device.execution_tier)

    @property
    def where(self) -> str:
        return "GPU memory" if self.device.has_vram else "RAM"

    # --- sizes ----------------------------------------------------------------------------------------

    def model_bytes(self, name: str) -> int:
        """A generation model's weights in the device's dtype, from its files (read once)."""
        with self._lock:
            known = self._weights.get(name)
        if known is not None:
            return known
        assert self.models is not None
        from models.loading import ModelLoadError, plan_load

        record = self.models.record(name)
        folder = self.models.files_dir(name)
        try:
            size = plan_load(record, folder).estimated_bytes(self.device.dtype)
        except (ModelLoadError, OSError, ValueError) as exc:
            logger.debug("size of %s from its plan failed (%s): using its file sizes", name, exc)
            size = None
        if size is None:
            files = [folder / f.path for f in record.files]
            size = sum(file_weight_bytes(p, self.device.dtype) for p in files if p.suffix != ".yaml")
        with self._lock:
            self._weights[name] = int(size)
        return int(size)

    def family(self, name: str) -> str:
        assert self.models is not None
        return family_of(self.models.record(name).baseline)

    def ceiling(self, name: str) -> int | None:
        """The pixel ceiling an out-of-memory error set for this model, if any."""
        with self._lock:
            return self._ceilings.get(name)

    def _capacities(self) -> tuple[int, int]:
        """(what the execution device holds for us now, what RAM holds for us now)."""
        ram = self.cache.capacity(Tier.RAM)
        return (self.cache.capacity(Tier.VRAM) if self.device.has_vram else ram), ram

    def memory_pixels(self, name: str, capacities: tuple[int, int] | None = None) -> int:
        """The most pixels a one-image job on `name` can have in this machine's memory now (0: the model
        does not fit at all)."""
        device_room, ram_room = capacities or self._capacities()
        weights = self.model_bytes(name)
        if self.device.has_vram and weights > ram_room:
            return 0  # its RAM copy (which the device copy is made from) does not fit
        return self.table.largest_pixels(self.family(name), device_room - weights)

    def holdable_pixels(self, name: str, capacities: tuple[int, int] | None = None) -> int:
        """`memory_pixels`, never above the ceiling an out-of-memory error left."""
        pixels = self.memory_pixels(name, capacities)
        ceiling = self.ceiling(name)
        return pixels if ceiling is None else min(pixels, ceiling)

    # --- before popping -------------------------------------------------------------------------------

    def trim(self) -> None:
        self.cache.trim()

    def offer(self, models: Sequence[str], max_pixels: int) -> Offer:
        """The models to pop for and the max_pixels to advertise, from the machine as it is now."""
        self.trim()
        capacities = self._capacities()
        fits = {name: self.memory_pixels(name, capacities) for name in models}
        floor = min(max_pixels, FLOOR_PIXELS)
        # A model below the floor is left out; one whose ceiling an out-of-memory error lowered stays, and
        # the pop asks for sizes under its ceiling.
        served = [name for name in models if fits[name] >= floor]
        held = [min(fits[name], self.ceiling(name) or fits[name]) for name in served]
        pixels = max(PIXEL_STEP, min([max_pixels, *held]))
        offer = Offer(served, (pixels // PIXEL_STEP) * PIXEL_STEP)
        self._log_offer(offer, models, capacities[0], max_pixels)
        self._last_offer = offer
        return offer

    def _log_offer(self, offer: Offer, models: Sequence[str], room: int, max_pixels: int) -> None:
        """Say what changed: models left out or back, and max_pixels when it moved by a tenth or more (free
        memory moves a little all the time)."""
        last = self._last_offer
        for name in models:
            if name not in offer.models and (last is None or name in last.models):
                logger.warning(
                    "not offering %s: it does not fit this machine's %s (%s weights, %s free for the worker)",
                    name, self.where, _gib(self.model_bytes(name)), _gib(room),
                )  # fmt: skip
            elif name in offer.models and last is not None and name not in last.models:
                logger.info("offering %s again: it fits this machine's %s now", name, self.where)
        moved = last is None or abs(offer.max_pixels - last.max_pixels) >= last.max_pixels / 10
        if offer.models and moved and offer.max_pixels < max_pixels:
            logger.warning(
                "advertising max_pixels %d (about %d²) instead of max_power's %d: what %s holds",
                offer.max_pixels, int(offer.max_pixels**0.5), max_pixels, self.where,
            )  # fmt: skip

    def form_fits(self, form: str, weights: int, working: int) -> bool:
        device_room, ram_room = self._capacities()
        return weights + working <= device_room and (not self.device.has_vram or weights <= ram_room)

    def servable_forms(self, forms: Sequence[str], sizes: dict[str, tuple[int, int]]) -> list[str]:
        """The forms whose model and working memory fit now (`sizes`: form -> (weights, working))."""
        self.trim()
        fitting = [f for f in forms if f not in sizes or self.form_fits(f, *sizes[f])]
        unfit = tuple(f for f in forms if f not in fitting)
        if unfit and unfit != self._unfit_forms:
            logger.warning("not offering alchemy forms %s: their models do not fit this machine's %s",
                           ", ".join(unfit), self.where)  # fmt: skip
        self._unfit_forms = unfit
        return fitting

    # --- while a job runs -----------------------------------------------------------------------------

    def check(self, model: str, shape: JobShape) -> int:
        """The working memory the job needs; MemoryFault when this machine cannot hold it now."""
        ceiling = self.ceiling(model)
        if ceiling is not None and shape.pixels > ceiling:
            raise MemoryFault(
                f"{shape.width}x{shape.height} is over the {ceiling} pixels {model} is served up to on this "
                f"worker since it ran out of memory"
            )
        weights, working = self.model_bytes(model), self.table.job_bytes(shape)
        device_room, ram_room = self._capacities()
        if weights + working > device_room or (self.device.has_vram and weights > ram_room):
            raise MemoryFault(
                f"this worker's {self.where} cannot hold {model} at {shape.width}x{shape.height}: it needs "
                f"{_gib(weights + working)} ({_gib(weights)} weights, {_gib(working)} working memory), "
                f"{_gib(device_room)} is free for it"
            )
        return working

    @contextmanager
    def running(self, model: str, shape: JobShape) -> Iterator[None]:
        """Hold the job's working memory while it runs; turn any out-of-memory error into a MemoryFault."""
        reason, lower = None, False
        try:
            working = self.check(model, shape)
            loads, holds = self.cache.loads, self.cache.holds
            with self.cache.working_memory(working, keep=(model,)), PeakMeter(self.device) as meter:
                yield
            alone = self.cache.holds == holds + 1 and self.cache.loads == loads
            if alone and not shape.post_processors and meter.used:
                self.table.observe(shape.family, shape.pixels, meter.used)
        except MEMORY_ERRORS as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'out of memory'}"
            # No room because other jobs hold it is no reason to serve this model smaller.
            lower = not isinstance(exc, CacheFullError) or "does not fit" in str(exc)
        if reason is not None:  # outside the handler: the failed job's frames are released by now
            free_device_memory(self.device)
            if lower:
                self.on_out_of_memory(model, shape, reason)
            size = f"{shape.width}x{shape.height}"
            raise MemoryFault(f"out of memory running {model} at {size}: {reason}"[:250])

    def on_out_of_memory(self, model: str, shape: JobShape, reason: str) -> None:
        lowered = (int(shape.pixels * OOM_CEILING_FACTOR) // PIXEL_STEP) * PIXEL_STEP
        with self._lock:
            before = self._ceilings.get(model)
            if before is not None and before <= lowered:
                return
            self._ceilings[model] = lowered
        logger.warning(
            "%s ran out of memory at %dx%d (%s): from now on it is served up to %d pixels",
            model, shape.width, shape.height, reason, lowered,
        )  # fmt: skip


# Alchemy form -> the InterrogatorSet attribute holding its model (nsfw and aesthetic share the safety pass).
INTERROGATOR_HOLDERS = {"caption": "caption", "interrogation": "interrogation", "nsfw": "safety",
                        "aesthetic": "safety"}  # fmt: skip


def interrogator_folder(found: object) -> Path | None:
    """The model folder an interrogator runs on (the safety pass, nsfw and aesthetic: its CLIP's)."""
    folder = getattr(found, "folder", None) or getattr(getattr(found, "embedder", None), "folder", None)
    return Path(folder) if folder is not None else None


def interrogator_sizes(interrogators: object, table: WorkingMemoryTable, dtype: torch.dtype
                       ) -> dict[str, tuple[int, int]]:  # fmt: skip
    """form -> (weights, working memory) of the interrogator forms a worker has (caption, interrogation, and
    nsfw and aesthetic on the safety pass's CLIP)."""
    sizes: dict[str, tuple[int, int]] = {}
    for form, holder in INTERROGATOR_HOLDERS.items():
        folder = interrogator_folder(getattr(interrogators, holder, None))
        if folder is not None:
            sizes[form] = (folder_weight_bytes(folder, dtype), table.interrogator_bytes(form))
    return sizes


def post_processor_sizes(registry: object, names: Sequence[str], table: WorkingMemoryTable,
                         dtype: torch.dtype, max_tiles: int) -> dict[str, tuple[int, int]]:  # fmt: skip
    """form -> (weights, working memory) of post-processor forms on a source of `max_tiles` tiles."""
    sizes: dict[str, tuple[int, int]] = {}
    pixels = max_tiles * HORDE_TILE * HORDE_TILE
    for name in names:
        try:
            processor = registry.get(name)  # type: ignore[attr-defined]
        except KeyError:
            continue
        weights = sum(file_weight_bytes(path, dtype) for path in processor.files())
        scale = int(getattr(processor, "scale", 1))
        kinds = {"strip_background": "strip_background"}
        kind = "upscaler" if scale > 1 else kinds.get(name, "face_fixer")
        sizes[name] = (weights, table.post_processor_bytes(kind, pixels, scale))
    return sizes


def memory_guard(runtime: Runtime, request: GenerationRequest) -> AbstractContextManager[None]:
    """`Admission.running` around a generation request (nothing without admission control)."""
    if runtime.admission is None:
        return nullcontext()
    shape = JobShape(
        family=family_of(request.baseline),
        width=request.width,
        height=request.height,
        batch=request.n_images,
        hires_fix=request.hires_fix,
        post_processors=tuple(request.post_processing),
    )
    return runtime.admission.running(request.model, shape)
