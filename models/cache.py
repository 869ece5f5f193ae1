"""ModelCache: models held in RAM (and, on CUDA, VRAM) within byte budgets, evicted least-recently-used.

Every object keeps one RAM copy of its weights for as long as it is cached (pinned on CUDA). Moving to the
GPU makes a second, device copy; evicting from VRAM just points the parameters back at the RAM copy, so an
offload costs no device-to-host copy. A model in use is locked and is never evicted.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import torch

from models.device import DevicePolicy

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1024 * 1024


class Tier(StrEnum):
    RAM = "ram"
    VRAM = "vram"


class CacheFullError(RuntimeError):
    """No room for a model: it exceeds the budget, or every resident model stays locked."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory while a model moved onto it: the model was dropped; the job faults."""


# --- budgets -------------------------------------------------------------------------------------------


def leave_free_bytes(spec: str | int | float, total_bytes: int) -> int:
    """Bytes to leave free: "80%" is a share of `total_bytes`; a bare number (or "4096", "4096MB") is MiB."""
    text = str(spec).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|MB|MIB|M)?", text)
    if not match:
        raise ValueError(f"memory to leave free must look like '80%' or '4096' (MB), not {spec!r}")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if value > 100:
            raise ValueError(f"cannot leave {value}% of memory free")
        return int(total_bytes * value / 100)
    return int(value * MIB)


def memory_budget(
    spec: str | int | float, *, total_bytes: int, available_bytes: int, held_bytes: int = 0
) -> int:
    """Bytes a cache may hold so that at least `spec` of memory stays free.

    Pure: `available_bytes` is what the system reports free now; `held_bytes` is what this cache already holds
    (it would be given back by eviction, so it counts as usable).
    """
    usable = max(0, available_bytes) + max(0, held_bytes)
    return max(0, min(usable, total_bytes) - leave_free_bytes(spec, total_bytes))


def ram_budget(spec: str | int | float) -> int:
    """The RAM budget on this machine now (psutil), for `ram_to_leave_free`."""
    import psutil

    vm = psutil.virtual_memory()
    return memory_budget(spec, total_bytes=vm.total, available_bytes=vm.available)


def vram_budget(spec: str | int | float, device: DevicePolicy) -> int:
    """The VRAM budget of the policy's device now, for `vram_to_leave_free`; 0 on CPU."""
    free, total = device.vram_bytes()
    return memory_budget(spec, total_bytes=total, available_bytes=free) if total else 0


# --- cached objects ------------------------------------------------------------------------------------


def torch_modules(obj: Any) -> dict[str, torch.nn.Module]:
    """The modules whose weights make up a cached object (module, pipeline, or a `torch_modules()` owner)."""
    if isinstance(obj, torch.nn.Module):
        return {"": obj}
    if hasattr(obj, "torch_modules"):
        return dict(obj.torch_modules())
    components = getattr(obj, "components", None)  # a diffusers DiffusionPipeline
    if isinstance(components, dict):
        return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    raise TypeError(f"cannot cache a {type(obj).__name__}: not a module, pipeline or torch_modules() owner")


def _tensors(obj: Any) -> list[torch.Tensor]:
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for module in torch_modules(obj).values():
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def object_bytes(obj: Any) -> int:
    """Bytes of an object's parameters and buffers (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _release_freed_memory() -> None:
    # Dropped models sit in reference cycles (pipelines <-> hooks); collect them, then ask glibc to return
    # freed arenas to the system, else RSS never goes down after an eviction.
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# One load at a time in the whole process, whichever cache asks: transformers' from_pretrained patches
# module-level functions while it builds a model (weight tying, init), so two loads in two threads can
# leave one model with a tied weight never tied (measured: BLIP's decoder bias left on the meta device).
_LOAD_LOCK = threading.Lock()


@dataclass(eq=False)
class _Entry:
    key: str
    obj: Any = None
    ram_bytes: int = 0
    loading: bool = True
    locks: int = 0
    # Thread ident -> locks it holds: a thread never waits for models only it can release.
    owners: dict[int, int] = field(default_factory=dict)
    on_device: bool = False
    vram_reserved: int = 0
    drop_pending: bool = False
    # (tensor, its RAM copy) pairs: evicting from VRAM points the tensor back at its RAM copy.
    ram_copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    move_lock: threading.Lock = field(default_factory=threading.Lock)
    # Users running on the RAM copy (`use(if_room=True)` without VRAM room): no move while they run.
    cpu_users: int = 0


class ModelCache:
    def __init__(
        self,
        device: DevicePolicy,
        *,
        ram_budget_bytes: int,
        vram_budget_bytes: int | None = None,
        wait_timeout: float = 300.0,
    ) -> None:
        self.device = device
        self._ram_budget = int(ram_budget_bytes)
        if vram_budget_bytes is None:
            vram_budget_bytes = int(device.vram_bytes()[0] * 0.9)
        self._vram_budget = int(vram_budget_bytes)
        self._wait_timeout = wait_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._cond = threading.Condition()
        self.evictions: deque[tuple[str, Tier]] = deque(maxlen=1000)

    # --- public API ----------------------------------------------------------------------------------

    @contextmanager
    def use(
        self, key: str, loader: Callable[[], T], *, size_hint: int | None = None, if_room: bool = False
    ) -> Iterator[T]:
        """Load into RAM if absent (make_room first), move onto the execution device (make_room on VRAM),
        lock against eviction for the duration, yield the object *on the execution device*.

        `size_hint` (bytes, e.g. the checkpoint's size) reserves room before loading so that a load never
        pushes the cache past its budget while the model being replaced is still resident.

        `if_room`: move onto the GPU only when the model is there already or fits the VRAM budget without
        evicting anything; otherwise yield the RAM copy (the caller runs on the CPU). For side passes (the
        safety check) that must never push the next generation's model out of VRAM.
        """
        entry = self._acquire(key, loader, size_hint)
        on_cpu = False
        try:
            if self.device.is_cuda:
                if if_room:
                    on_cpu = not self._to_device_if_room(entry)
                else:
                    self._to_device(entry)
            yield entry.obj
        finally:
            if on_cpu:
                with self._cond:
                    entry.cpu_users -= 1
                    self._cond.notify_all()
            self._release(entry)

    def resident(self) -> list[str]:
        """Keys in RAM, least recently used first."""
        with self._cond:
            return [k for k, e in self._entries.items() if not e.loading]

    def on_device(self) -> list[str]:
        with self._cond:
            return [k for k, e in self._entries.items() if e.on_device]

    def drop(self, key: str) -> None:
        """Forget a model; one in use is dropped when its last user releases it."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return
            if entry.locks or entry.loading:
                entry.drop_pending = True
                return
            self._remove(entry)
        _release_freed_memory()

    def offload(self, key: str) -> bool:
        """Free a model's device copy now (its RAM copy stays); False if in use or not on the device."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.locks or not entry.vram_reserved:
                return False
            self._offload(entry)
            return True

    def make_room(self, nbytes: int, tier: Tier | str = Tier.RAM) -> None:
        """Evict least-recently-used unlocked models until `nbytes` more fit in `tier`'s budget; wait for
        locked models to be released if that is the only way, up to the cache's wait timeout."""
        with self._cond:
            evicted = self._make_room(int(nbytes), Tier(tier))
        if evicted:
            _release_freed_memory()

    @property
    def ram_budget_bytes(self) -> int:
        return self._ram_budget

    @property
    def vram_budget_bytes(self) -> int:
        return self._vram_budget

    def used_bytes(self, tier: Tier | str = Tier.RAM) -> int:
        with self._cond:
            return self._used(Tier(tier))

    # --- internals (callers hold self._cond unless noted) --------------------------------------------

    def _used(self, tier: Tier) -> int:
        if tier is Tier.RAM:
            return sum(e.ram_bytes for e in self._entries.values())
        return sum(e.vram_reserved for e in self._entries.values())

    def _budget(self, tier: Tier) -> int:
        return self._ram_budget if tier is Tier.RAM else self._vram_budget

    def _make_room(self, nbytes: int, tier: Tier) -> bool:
        budget = self._budget(tier)
        if nbytes > budget:
            raise CacheFullError(
                f"a model of {nbytes / MIB:.0f} MiB does not fit "
                f"the {tier.value} budget of {budget / MIB:.0f} MiB"
            )
        deadline = time.monotonic() + self._wait_timeout
        evicted = False
        while self._used(tier) + nbytes > budget:
            victim = self._lru_victim(tier)
            if victim is not None:
                self._evict(victim, tier)
                evicted = True
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._others_hold(tier):
                raise CacheFullError(
                    f"no room for {nbytes / MIB:.0f} MiB in {tier.value}: "
                    f"{self._used(tier) / MIB:.0f} of {budget / MIB:.0f} MiB held by models in use"
                )
            logger.info("cache: waiting for a %s model to be released", tier.value)
            self._cond.wait(remaining)
        return evicted

    def _others_hold(self, tier: Tier) -> bool:
        """Whether another thread holds (or is loading) a model whose release would free `tier` room."""
        me = threading.get_ident()
        for entry in self._entries.values():
            held = entry.ram_bytes if tier is Tier.RAM else entry.vram_reserved
            if held and entry.locks > entry.owners.get(me, 0):
                return True
        return False

    def _lru_victim(self, tier: Tier) -> _Entry | None:
        for entry in self._entries.values():
            if entry.locks or entry.loading:
                continue
            if tier is Tier.RAM or entry.vram_reserved:
                return entry
        return None

    def _evict(self, entry: _Entry, tier: Tier) -> None:
        logger.info("cache: evicting %s from %s (%.0f MiB)", entry.key, tier.value, entry.ram_bytes / MIB)
        self.evictions.append((entry.key, tier))
        if tier is Tier.RAM:
            self._remove(entry)
        else:
            self._offload(entry)

    def _remove(self, entry: _Entry) -> None:
        self._offload(entry)
        self._entries.pop(entry.key, None)
        entry.obj = None
        entry.ram_copies = []
        self._cond.notify_all()

    def _offload(self, entry: _Entry) -> None:
        if entry.on_device:
            for tensor, ram_copy in entry.ram_copies:
                tensor.data = ram_copy
            entry.on_device = False
        entry.vram_reserved = 0
        self._cond.notify_all()

    def _acquire(self, key: str, loader: Callable[[], Any], size_hint: int | None) -> _Entry:
        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is None or not entry.loading:
                    break
                self._cond.wait()  # another thread is loading this key
            if entry is not None:
                self._lock_entry(entry)
                self._entries.move_to_end(key)
                return entry
            reserve = int(size_hint or 0)
            evicted = self._make_room(reserve, Tier.RAM)
            entry = _Entry(key=key, ram_bytes=reserve)
            self._lock_entry(entry)
            self._entries[key] = entry
        if evicted:
            _release_freed_memory()
        try:
            return self._load(entry, loader)
        except BaseException:
            with self._cond:
                self._entries.pop(key, None)
                self._cond.notify_all()
            raise

    def _load(self, entry: _Entry, loader: Callable[[], Any]) -> _Entry:
        started = time.perf_counter()
        with _LOAD_LOCK:
            obj = loader()
        tensors = _tensors(obj)  # raises TypeError for uncacheable objects
        if self.device.pin_memory:
            for t in tensors:
                if t.device.type == "cpu" and not t.is_pinned():
                    t.data = t.data.pin_memory()
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._cond:
            entry.ram_bytes = 0  # the reservation is replaced by the real size
            try:
                evicted = self._make_room(size, Tier.RAM)
            except CacheFullError:
                entry.ram_bytes = size
                raise
            entry.obj, entry.ram_bytes, entry.loading = obj, size, False
            entry.ram_copies = [(t, t.data) for t in tensors]
            self._cond.notify_all()
        if evicted:
            _release_freed_memory()
        logger.info(
            "cache: loaded %s (%.0f MiB) in %.2fs", entry.key, size / MIB, time.perf_counter() - started
        )
        return entry

    @staticmethod
    def _lock_entry(entry: _Entry) -> None:
        me = threading.get_ident()
        entry.locks += 1
        entry.owners[me] = entry.owners.get(me, 0) + 1

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            me = threading.get_ident()
            entry.locks -= 1
            entry.owners[me] -= 1
            if not entry.owners[me]:
                del entry.owners[me]
            dropped = entry.locks == 0 and entry.drop_pending and entry.key in self._entries
            if dropped:
                self._remove(entry)
            self._cond.notify_all()
        if dropped:
            _release_freed_memory()

    def _to_device(self, entry: _Entry) -> None:
        """Copy a locked entry's weights onto the GPU from its pinned RAM copy (not holding self._cond)."""
        with entry.move_lock:
            if entry.on_device:
                return
            with self._cond:
                # Moving swaps the tensors under a forward running on the RAM copy: wait for those to end.
                if not self._cond.wait_for(lambda: entry.cpu_users == 0, timeout=self._wait_timeout):
                    raise CacheFullError(f"{entry.key} stayed in use on the CPU; cannot move it to the GPU")
                self._make_room(entry.ram_bytes, Tier.VRAM)
                entry.vram_reserved = entry.ram_bytes
            self._copy_to_device(entry)

    def _to_device_if_room(self, entry: _Entry) -> bool:
        """Move a locked entry onto the GPU if it fits without evicting; else count a CPU user. True when
        the entry is on the GPU."""
        with entry.move_lock:
            if entry.on_device:
                return True
            with self._cond:
                no_room = self._used(Tier.VRAM) + entry.ram_bytes > self._vram_budget
                if no_room or entry.cpu_users:  # others run on the RAM copy: join them, do not move it
                    entry.cpu_users += 1
                    return False
                entry.vram_reserved = entry.ram_bytes
            self._copy_to_device(entry)
            return True

    def _copy_to_device(self, entry: _Entry) -> None:
        """The copy itself (the caller holds entry.move_lock and has reserved the VRAM)."""
        try:
            for tensor, ram_copy in entry.ram_copies:
                tensor.data = ram_copy.to(self.device.device, non_blocking=ram_copy.is_pinned())
            torch.cuda.current_stream(self.device.device).synchronize()
        except torch.cuda.OutOfMemoryError as exc:
            self._on_device_oom(entry, exc)
        with self._cond:
            entry.on_device = True
            self._entries.move_to_end(entry.key)

    def _on_device_oom(self, entry: _Entry, exc: BaseException) -> None:
        with self._cond:
            used_before = self._used(Tier.VRAM) - entry.vram_reserved
            # Shrink so that the same combination is never tried again: next time others are evicted first.
            self._vram_budget = max(0, min(int(self._vram_budget * 0.9), used_before + entry.ram_bytes - 1))
            entry.on_device = True  # so that _offload restores every tensor, moved or not
            self._offload(entry)
            entry.drop_pending = True
        torch.cuda.empty_cache()
        logger.error(
            "cache: out of device memory moving %s; VRAM budget now %.0f MiB",
            entry.key,
            self._vram_budget / MIB,
        )
        raise DeviceOutOfMemoryError(f"out of device memory loading {entry.key}: {exc}") from exc
