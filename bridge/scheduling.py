"""Who pops and who runs next: the loop's shares between job families, and its device lanes.

The loop knows families only as the opaque keys its sources and jobs declare (bridge/families.py); the shares
come from the config (`family_shares`, relative weights; a family not named there weighs 1).

**Queue places.** `max_threads + queue_size` jobs may be in flight (popped, not yet executed). Each family
that is on has a quota of them: its share of the places, rounded down, and at least one for a family with a
share. A family always pops up to its quota, whatever the others hold, so every family is popped regularly
however long another's backlog is. The places of an idle family (nothing in flight, last pop empty) are lent
to the busy ones; when the idle family finds work again it pops its quota at once, even while the places it
lent are still taken (the total then briefly exceeds the limit by what was lent).

**Run slots.** Jobs run on device lanes: the worker's device, or the CPU for a job that computes there (one
with no model to run, for instance). Each lane has `max_threads` slots. A freed slot goes to the waiting
family with the fewest running jobs for its share, ties broken by the least run time for its share (weighted
fair queueing over run time). So a family that lent its slots gets the next one that frees, before any job
of the borrower that waits: a short alchemy form waits behind the generation already running, never behind
the generations queued after it. Run time is counted from when a family has work again (an idle family
banks no credit).

**Beside.** On an accelerator, a job of a family that holds no slot on that lane does not wait for one when
its weights and those of every job running there fit the device's memory budget together (the budget the
model cache keeps its models in): it runs beside them. On the CPU the cores, not memory, are what jobs
share, so nothing runs beside there.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge.jobs.base import Placement

if TYPE_CHECKING:
    from models.device import DevicePolicy

# A share of 0 still orders the families (it only ever gets slots nobody else waits for).
_MIN_WEIGHT = 1e-6


def weight_of(weights: Mapping[str, float], family: str) -> float:
    return float(weights.get(family, 1.0))


def family_quotas(weights: Mapping[str, float], families: Iterable[str], places: int) -> dict[str, int]:
    """Queue places kept for each family: its share of `places` rounded down, at least one if it has one."""
    names = list(dict.fromkeys(families))
    total = sum(weight_of(weights, f) for f in names)
    if total <= 0:
        return {f: max(1, places) for f in names}
    return {f: max(1, math.floor(places * weight_of(weights, f) / total)) if weight_of(weights, f) > 0 else 0
            for f in names}


def pop_capacity(family: str, *, quotas: Mapping[str, int], in_flight: Mapping[str, int],
                 busy: Mapping[str, bool], places: int) -> int:
    """How many jobs `family` may pop now: up to its own quota always; beyond it, the places that neither
    hold a job nor are kept for a busy family."""
    own = quotas.get(family, 0) - in_flight.get(family, 0)
    kept = sum(max(0, quota - in_flight.get(other, 0))
               for other, quota in quotas.items() if other != family and busy.get(other, False))
    spare = places - sum(in_flight.values()) - kept
    return max(0, own, spare)


# ---- devices --------------------------------------------------------------------------------------------


class Devices(Protocol):
    """What the run slots need to know of the machine (injected: tests give it a card this machine lacks)."""

    def lane(self, placement: Placement) -> str:
        """The device a job with this placement computes on."""

    def shares_memory(self, lane: str) -> bool:
        """Whether jobs of different families may run side by side on this device when their weights fit."""

    def budget_bytes(self, lane: str) -> int:
        """Bytes the device's memory budget gives to models (what must hold every job running beside)."""


@dataclass(frozen=True)
class DeviceLanes:
    """The worker's device policy and the model cache's VRAM budget, read at each decision."""

    policy: DevicePolicy
    vram_budget: Callable[[], int] = lambda: 0

    @classmethod
    def of(cls, runtime: Any) -> DeviceLanes:
        cache = getattr(runtime, "cache", None)
        if cache is None:
            return cls(runtime.device)
        return cls(runtime.device, lambda: int(cache.vram_budget_bytes))

    def lane(self, placement: Placement) -> str:
        return placement.device or str(self.policy.device)

    def shares_memory(self, lane: str) -> bool:
        return self.policy.is_cuda and lane == str(self.policy.device)

    def budget_bytes(self, lane: str) -> int:
        return self.vram_budget() if self.shares_memory(lane) else 0


# ---- run slots ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Ticket:
    family: str
    lane: str
    bytes: int
    seq: int
    granted: bool = False
    beside: bool = False
    started: float = 0.0


@dataclass
class _Lane:
    name: str
    waiting: dict[str, deque[_Ticket]] = field(default_factory=dict)
    running: list[_Ticket] = field(default_factory=list)
    run_time: dict[str, float] = field(default_factory=dict)  # per family, divided by its share

    def count(self, family: str) -> int:
        return sum(t.family == family for t in self.running)

    def active(self, family: str) -> bool:
        return bool(self.waiting.get(family)) or self.count(family) > 0

    def in_slots(self) -> int:
        return sum(not t.beside for t in self.running)


class RunSlots:
    """`slots` run slots per device lane, shared between families by weight (see the module docstring)."""

    def __init__(self, slots: int, weights: Mapping[str, float], devices: Devices,
                 clock: Callable[[], float] = time.monotonic):
        self.slots = slots
        self.weights = dict(weights)
        self.devices = devices
        self._clock = clock
        self._cond = threading.Condition()
        self._lanes: dict[str, _Lane] = {}
        self._seq = itertools.count()

    @contextmanager
    def run(self, family: str, placement: Placement, *, stop: Callable[[], bool]) -> Iterator[bool]:
        """Wait for a slot (or room beside) for a job of `family`; hold it for the block. Yields False,
        holding nothing, when `stop()` turns true first."""
        ticket = self._enqueue(family, placement)
        try:
            with self._cond:
                while not ticket.granted and not stop():
                    self._cond.wait(1.0)
                granted = ticket.granted
            yield granted
        finally:
            self._leave(ticket)

    def interrupt(self) -> None:
        """Wake every waiter so that it re-reads its stop condition."""
        with self._cond:
            self._cond.notify_all()

    def running(self) -> dict[str, dict[str, int]]:
        """lane -> family -> jobs running there now."""
        with self._cond:
            return {name: {f: lane.count(f) for f in {t.family for t in lane.running}}
                    for name, lane in self._lanes.items() if lane.running}

    def waiting(self) -> dict[str, dict[str, int]]:
        """lane -> family -> jobs waiting there now."""
        with self._cond:
            return {name: {f: len(q) for f, q in lane.waiting.items() if q}
                    for name, lane in self._lanes.items() if any(lane.waiting.values())}

    # ---- internals (callers hold self._cond) ------------------------------------------------------------

    def _weight(self, family: str) -> float:
        return max(weight_of(self.weights, family), _MIN_WEIGHT)

    def _enqueue(self, family: str, placement: Placement) -> _Ticket:
        with self._cond:
            name = self.devices.lane(placement)
            lane = self._lanes.setdefault(name, _Lane(name))
            if not lane.active(family):
                # Coming back from idle: start level with the families already at work, not below them.
                at_work = {*lane.waiting, *(t.family for t in lane.running)} - {family}
                others = [lane.run_time.get(f, 0.0) for f in at_work if lane.active(f)]
                if others:
                    lane.run_time[family] = max(lane.run_time.get(family, 0.0), min(others))
            ticket = _Ticket(family, name, max(0, int(placement.bytes)), next(self._seq))
            lane.waiting.setdefault(family, deque()).append(ticket)
            self._dispatch(lane)
            return ticket

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            lane = self._lanes[ticket.lane]
            if ticket.granted:
                lane.running.remove(ticket)
                spent = (self._clock() - ticket.started) / self._weight(ticket.family)
                lane.run_time[ticket.family] = lane.run_time.get(ticket.family, 0.0) + spent
            else:
                lane.waiting[ticket.family].remove(ticket)
            self._dispatch(lane)

    def _dispatch(self, lane: _Lane) -> None:
        granted = False
        while (chosen := self._next(lane)) is not None:
            ticket, beside = chosen
            lane.waiting[ticket.family].popleft()
            ticket.granted, ticket.beside, ticket.started = True, beside, self._clock()
            lane.running.append(ticket)
            granted = True
        if granted:
            self._cond.notify_all()

    def _order(self, lane: _Lane, family: str) -> tuple[float, float, int]:
        head = lane.waiting[family][0]
        return lane.count(family) / self._weight(family), lane.run_time.get(family, 0.0), head.seq

    def _next(self, lane: _Lane) -> tuple[_Ticket, bool] | None:
        waiting = (f for f, queue in lane.waiting.items() if queue)
        families = sorted(waiting, key=lambda f: self._order(lane, f))
        if not families:
            return None
        if lane.in_slots() < self.slots:
            return lane.waiting[families[0]][0], False
        if not self.devices.shares_memory(lane.name):
            return None
        held = [t.bytes for t in lane.running]
        if not all(held):
            return None  # a running job of unknown size: nothing can be shown to fit beside it
        room = self.devices.budget_bytes(lane.name) - sum(held)
        for family in families:
            head = lane.waiting[family][0]
            if lane.count(family) == 0 and 0 < head.bytes <= room:
                return head, True
        return None
