"""ModelCache: models held in RAM (and, on CUDA, VRAM), evicted least-recently-used through one make_room.

Every object keeps one RAM copy of its weights for as long as it is cached (pinned on CUDA). Moving to the
GPU makes a second, device copy; evicting from VRAM just points the parameters back at the RAM copy, so an
offload costs no device-to-host copy. A model in use is locked and is never evicted.

Two limits per tier, both read from the machine (`DevicePolicy.memory`) whenever room is made:
* the soft budget (`ram_to_leave_free` / `vram_to_leave_free`): what may stay cached *between* jobs. Room
  for a load evicts unlocked models down to it, and `trim()` (before each pop) gives memory back as other
  programs grow;
* the capacity: what the device physically holds for this process (free memory plus what the cache itself
  holds, less a small reserve). The model a job needs always loads when it fits the capacity, every unlocked
  model evicted first; only a model beyond it (or beyond what models in use leave) raises CacheFullError.
A job's working memory (activations) is held through `working_memory()` and counts like a model.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from models.heap import collect_everything
from models.machine import RAM, VRAM

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1024 * 1024


class Tier(StrEnum):
    RAM = RAM
    VRAM = VRAM


class CacheFullError(RuntimeError):
    """No room for a model: the device cannot hold it, or what models in use leave is not enough."""


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
    """Bytes a cache may keep between jobs so that at least `spec` of memory stays free (the soft budget).

    Pure: `available_bytes` is what the system reports free now; `held_bytes` is what this cache already holds
    (it would be given back by eviction, so it counts as usable).
    """
    usable = max(0, available_bytes) + max(0, held_bytes)
    return max(0, min(usable, total_bytes) - leave_free_bytes(spec, total_bytes))


def hard_reserve(total_bytes: int) -> int:
    """What the cache never takes even for a job: the device's own slack (driver, allocator, page tables)."""
    return min(512 * MIB, total_bytes // 20)


def device_capacity(*, total_bytes: int, available_bytes: int, held_bytes: int = 0) -> int:
    """Bytes this process can hold on a device now: free memory plus what it holds, less the reserve. Pure."""
    usable = max(0, available_bytes) + max(0, held_bytes)
    return max(0, min(usable, total_bytes) - hard_reserve(total_bytes))


def ram_budget(spec: str | int | float, device: DevicePolicy | None = None) -> int:
    """The soft RAM budget of the machine now (the policy's, or this computer's), for `ram_to_leave_free`."""
    reading = (device or DevicePolicy.cpu()).machine.ram()
    return memory_budget(spec, total_bytes=reading.total, available_bytes=reading.available)


def vram_budget(spec: str | int | float, device: DevicePolicy) -> int:
    """The soft VRAM budget of the policy's device now, for `vram_to_leave_free`; 0 without a card."""
    reading = device.machine.vram()
    if not reading.total:
        return 0
    return memory_budget(spec, total_bytes=reading.total, available_bytes=reading.available)


@dataclass(frozen=True)
class Budget:
    """What one tier may keep cached between jobs: what leaves `leave_free` of the machine free (re-read every
    time), or a set number of bytes (`fixed`: tools and eviction-order tests)."""

    leave_free: str | int | float | None = None
    fixed: int | None = None

    def soft_bytes(self, total: int, available: int, held: int) -> int:
        if self.fixed is not None:
            return int(self.fixed)
        spec = self.leave_free if self.leave_free is not None else 0
        return memory_budget(spec, total_bytes=total, available_bytes=available, held_bytes=held)


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
    # Dropped models sit in reference cycles (pipelines <-> hooks); collect them (a model loaded before the
    # loop froze the heap too), then ask glibc to return freed arenas, else RSS never goes down.
    collect_everything()
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


@dataclass(frozen=True)
class _Working:
    tier: Tier
    nbytes: int
    owner: int  # thread ident


class ModelCache:
    def __init__(
        self,
        device: DevicePolicy,
        *,
        ram_budget_bytes: int | None = None,
        vram_budget_bytes: int | None = None,
        ram_to_leave_free: str | int | float | None = None,
        vram_to_leave_free: str | int | float | None = None,
        wait_timeout: float = 300.0,
    ) -> None:
        """Budgets: `*_to_leave_free` (the operator's keys, re-read from the machine) or `*_budget_bytes`
        (a set number of bytes). RAM needs one of them; VRAM defaults to leaving 10% of the card free."""
        if ram_budget_bytes is None and ram_to_leave_free is None:
            raise TypeError("ModelCache needs ram_to_leave_free (or ram_budget_bytes)")
        self.device = device
        vram_spec = vram_to_leave_free if vram_to_leave_free is not None else "10%"
        self._budgets = {
            Tier.RAM: Budget(ram_to_leave_free, ram_budget_bytes),
            Tier.VRAM: Budget(vram_spec, vram_budget_bytes),
        }
        self._wait_timeout = wait_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._working: dict[object, _Working] = {}
        self._cond = threading.Condition()
        self.evictions: deque[tuple[str, Tier]] = deque(maxlen=1000)
        self.loads = 0  # models loaded from disk so far (a job that loaded one measures no working memory)
        self.holds = 0  # working-memory holds so far (a job that overlapped another measures nothing either)

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
            if self.device.has_vram:
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

    @contextmanager
    def working_memory(self, nbytes: int, *, keep: tuple[str, ...] = (), tier: Tier | str | None = None
                       ) -> Iterator[None]:  # fmt: skip
        """Hold `nbytes` of the execution device (or `tier`) for a job's activations while the block runs:
        room is made as for a model (models in `keep`, the ones the job is about to use, are not evicted
        for it), and loads during the block count it as used."""
        chosen = Tier(tier or self.device.execution_tier)
        nbytes = max(0, int(nbytes))
        token = object()  # the object itself, kept alive: a bare id() is reused by the next call
        with self._cond:
            evicted = self._make_room(nbytes, chosen, keep=frozenset(keep))
            self.device.machine.account(chosen, nbytes)
            self._working[token] = _Working(chosen, nbytes, threading.get_ident())
            self.holds += 1
        if evicted:
            _release_freed_memory()
        try:
            yield
        finally:
            with self._cond:
                del self._working[token]
                self.device.machine.account(chosen, -nbytes)
                self._cond.notify_all()

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
        """Evict least-recently-used unlocked models down to the soft budget with `nbytes` more; raise
        CacheFullError if `nbytes` then exceeds what the device can hold, after waiting (up to the cache's
        wait timeout) for models in use by other threads to be released."""
        with self._cond:
            evicted = self._make_room(int(nbytes), Tier(tier))
        if evicted:
            _release_freed_memory()

    def trim(self) -> None:
        """Give back what the soft budgets no longer allow (between jobs: the machine may have changed)."""
        evicted = False
        with self._cond:
            for tier in self._tiers():
                evicted = self._make_room(0, tier, wait=False) or evicted
        if evicted:
            _release_freed_memory()

    def budget(self, tier: Tier | str = Tier.RAM) -> int:
        """The soft budget of `tier` now: what may stay cached between jobs."""
        with self._cond:
            return self._limits(Tier(tier))[0]

    def capacity(self, tier: Tier | str = Tier.RAM) -> int:
        """What `tier` can hold for this process now, counting everything the cache holds as reclaimable."""
        with self._cond:
            return self._limits(Tier(tier))[1]

    @property
    def ram_budget_bytes(self) -> int:
        return self.budget(Tier.RAM)

    @property
    def vram_budget_bytes(self) -> int:
        return self.budget(Tier.VRAM)

    def used_bytes(self, tier: Tier | str = Tier.RAM) -> int:
        with self._cond:
            return self._used(Tier(tier))

    # --- internals (callers hold self._cond unless noted) --------------------------------------------

    def _tiers(self) -> tuple[Tier, ...]:
        return (Tier.RAM, Tier.VRAM) if self.device.has_vram else (Tier.RAM,)

    def _used(self, tier: Tier) -> int:
        working = sum(w.nbytes for w in self._working.values() if w.tier is tier)
        if tier is Tier.RAM:
            return working + sum(e.ram_bytes for e in self._entries.values())
        return working + sum(e.vram_reserved for e in self._entries.values())

    def _limits(self, tier: Tier) -> tuple[int, int]:
        """(soft budget, capacity) of `tier`, read from the machine now."""
        reading = self.device.machine.ram() if tier is Tier.RAM else self.device.machine.vram()
        held = self._used(tier)
        capacity = device_capacity(
            total_bytes=reading.total, available_bytes=reading.available, held_bytes=held
        )
        soft = self._budgets[tier].soft_bytes(reading.total, reading.available, held)
        return min(soft, capacity), capacity

    def _make_room(self, nbytes: int, tier: Tier, *, wait: bool = True, keep: frozenset[str] = frozenset()
                   ) -> bool:  # fmt: skip
        """The one eviction path. Returns whether anything was evicted."""
        deadline = time.monotonic() + self._wait_timeout
        evicted = False
        while True:
            # Read once per round: evictions below free memory the machine only reports after collection.
            soft, capacity = self._limits(tier)
            if nbytes > capacity:
                raise CacheFullError(
                    f"{nbytes / MIB:.0f} MiB does not fit: this machine's {tier.value} holds "
                    f"{capacity / MIB:.0f} MiB for the worker (with every cached model unloaded)"
                )
            while (need := self._used(tier) + nbytes - soft) > 0 and (
                victim := self._lru_victim(tier, keep, need)
            ) is not None:
                self._evict(victim, tier)
                evicted = True
            if self._used(tier) + nbytes <= capacity or not wait:
                return evicted
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._others_hold(tier):
                raise CacheFullError(
                    f"no room for {nbytes / MIB:.0f} MiB in {tier.value}: "
                    f"{self._used(tier) / MIB:.0f} of {capacity / MIB:.0f} MiB held by models in use"
                )
            logger.info("cache: waiting for a %s model to be released", tier.value)
            self._cond.wait(remaining)

    def _others_hold(self, tier: Tier) -> bool:
        """Whether another thread holds (or is loading) something whose release would free `tier` room."""
        me = threading.get_ident()
        for entry in self._entries.values():
            held = entry.ram_bytes if tier is Tier.RAM else entry.vram_reserved
            if held and entry.locks > entry.owners.get(me, 0):
                return True
        return any(w.tier is tier and w.nbytes and w.owner != me for w in self._working.values())

    def _lru_victim(self, tier: Tier, keep: frozenset[str] = frozenset(), need: int = 0) -> _Entry | None:
        """The least recently used unlocked entry, except where strict LRU order would evict several to free
        `need` and the last of them frees it alone: then only that one. Never evicts what strict LRU would
        not; spares the small models every job uses (the safety pass's) when a large model must go anyway."""
        held = (lambda e: e.ram_bytes) if tier is Tier.RAM else (lambda e: e.vram_reserved)
        candidates = [
            entry for entry in self._entries.values()
            if not (entry.locks or entry.loading or entry.key in keep) and (tier is Tier.RAM or held(entry))
        ]  # fmt: skip
        freed = 0
        for entry in candidates:
            freed += held(entry)
            if freed >= need:
                return entry if held(entry) >= need else candidates[0]
        return candidates[0] if candidates else None

    def _evict(self, entry: _Entry, tier: Tier) -> None:
        logger.info("cache: evicting %s from %s (%.0f MiB)", entry.key, tier.value, entry.ram_bytes / MIB)
        self.evictions.append((entry.key, tier))
        if tier is Tier.RAM:
            self._remove(entry)
        else:
            self._offload(entry)

    def _hold(self, entry: _Entry, tier: Tier, nbytes: int) -> None:
        """Set what an entry holds in `tier`, telling the machine (an injected one keeps a ledger, and
        refuses more than it has as the real device would)."""
        before = entry.ram_bytes if tier is Tier.RAM else entry.vram_reserved
        if nbytes != before:
            self.device.machine.account(tier, nbytes - before)
        if tier is Tier.RAM:
            entry.ram_bytes = nbytes
        else:
            entry.vram_reserved = nbytes

    def _remove(self, entry: _Entry) -> None:
        self._offload(entry)
        self._hold(entry, Tier.RAM, 0)
        self._entries.pop(entry.key, None)
        entry.obj = None
        entry.ram_copies = []
        self._cond.notify_all()

    def _offload(self, entry: _Entry) -> None:
        if entry.on_device:
            if self.device.is_cuda:
                for tensor, ram_copy in entry.ram_copies:
                    tensor.data = ram_copy
            entry.on_device = False
        self._hold(entry, Tier.VRAM, 0)
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
            entry = _Entry(key=key)
            self._hold(entry, Tier.RAM, reserve)
            self._lock_entry(entry)
            self._entries[key] = entry
        if evicted:
            _release_freed_memory()
        try:
            return self._load(entry, loader)
        except BaseException:
            with self._cond:
                self._hold(entry, Tier.RAM, 0)
                self._entries.pop(key, None)
                self._cond.notify_all()
            raise

    def _load(self, entry: _Entry, loader: Callable[[], Any]) -> _Entry:
        waited = time.perf_counter()
        with _LOAD_LOCK:
            started = time.perf_counter()
            obj = loader()
        tensors = _tensors(obj)  # raises TypeError for uncacheable objects
        if self.device.pin_memory:
            for t in tensors:
                if t.device.type == "cpu" and not t.is_pinned():
                    t.data = t.data.pin_memory()
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._cond:
            self.loads += 1
            self._hold(entry, Tier.RAM, size)  # the reservation becomes the real size
            # It is in memory already: only what else stays cached is the budget's business now.
            evicted = self._make_room(0, Tier.RAM, wait=False)
            entry.obj, entry.loading = obj, False
            entry.ram_copies = [(t, t.data) for t in tensors]
            self._cond.notify_all()
        if evicted:
            _release_freed_memory()
        queued = f", after {started - waited:.2f}s behind another load" if started - waited >= 0.1 else ""
        logger.info("cache: loaded %s (%.0f MiB) in %.2fs%s",
                    entry.key, size / MIB, time.perf_counter() - started, queued)
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
        """Put a locked entry's weights on the device (not holding self._cond): a copy from its pinned RAM
        copy on CUDA; on an injected machine's simulated card, the bookkeeping alone."""
        with entry.move_lock:
            if entry.on_device:
                return
            with self._cond:
                # Moving swaps the tensors under a forward running on the RAM copy: wait for those to end.
                if not self._cond.wait_for(lambda: entry.cpu_users == 0, timeout=self._wait_timeout):
                    raise CacheFullError(f"{entry.key} stayed in use on the CPU; cannot move it to the GPU")
            try:
                with self._cond:
                    evicted = self._make_room(entry.ram_bytes, Tier.VRAM, keep=frozenset({entry.key}))
                    entry.on_device = True  # from here an offload restores every tensor, moved or not
                    self._hold(entry, Tier.VRAM, entry.ram_bytes)
                if evicted:
                    _release_freed_memory()
            except torch.OutOfMemoryError as exc:
                self._on_device_oom(entry, exc)
            self._copy_to_device(entry)

    def _to_device_if_room(self, entry: _Entry) -> bool:
        """Move a locked entry onto the device if it fits the soft budget without evicting; else count a CPU
        user. True when the entry is on the device."""
        with entry.move_lock:
            if entry.on_device:
                return True
            try:
                with self._cond:
                    soft, _capacity = self._limits(Tier.VRAM)
                    no_room = self._used(Tier.VRAM) + entry.ram_bytes > soft
                    if no_room or entry.cpu_users:  # others run on the RAM copy: join them, do not move it
                        entry.cpu_users += 1
                        return False
                    entry.on_device = True
                    self._hold(entry, Tier.VRAM, entry.ram_bytes)
            except torch.OutOfMemoryError as exc:
                self._on_device_oom(entry, exc)
            self._copy_to_device(entry)
            return True

    def _copy_to_device(self, entry: _Entry) -> None:
        """The copy itself, from the pinned RAM copy (the caller holds entry.move_lock and has reserved the
        VRAM); on an injected machine's simulated card the bookkeeping was all there is."""
        try:
            if self.device.is_cuda:
                for tensor, ram_copy in entry.ram_copies:
                    tensor.data = ram_copy.to(self.device.device, non_blocking=ram_copy.is_pinned())
                torch.cuda.current_stream(self.device.device).synchronize()
        except torch.OutOfMemoryError as exc:
            self._on_device_oom(entry, exc)
        with self._cond:
            self._entries.move_to_end(entry.key)

    def _on_device_oom(self, entry: _Entry, exc: BaseException) -> None:
        with self._cond:
            self._offload(entry)
            entry.drop_pending = True
        if self.device.is_cuda:
            torch.cuda.empty_cache()
        logger.error("cache: out of device memory moving %s onto the device: dropped it", entry.key)
        raise DeviceOutOfMemoryError(f"out of device memory loading {entry.key}: {exc}") from exc
