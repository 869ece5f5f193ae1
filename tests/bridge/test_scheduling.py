"""Fair shares between job families: queue places, run slots, device lanes (bridge/scheduling.py).

The run-slot tests drive the real RunSlots from threads with a hand-turned clock: each job blocks inside
its slot until the test lets it go, so the order of grants is exact. The daemon tests through the local
horde are in tests/bridge/test_scheduling_daemon.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from bridge.families import ALCHEMY, GENERATION
from bridge.jobs.base import ON_CPU, Placement
from bridge.scheduling import DeviceLanes, RunSlots, family_quotas, pop_capacity
from models.device import DevicePolicy

GEN, ALC = GENERATION, ALCHEMY
EQUAL = {GEN: 1.0, ALC: 1.0}
CARD = DevicePolicy(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=False)
MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Runner(threading.Thread):
    """One job inside RunSlots.run: records when it got its slot and holds it until released."""

    def __init__(self, slots: RunSlots, family: str, placement: Placement = Placement(), *,
                 log: list[str] | None = None, name: str = "") -> None:
        super().__init__(daemon=True)
        self.slots, self.family, self.placement = slots, family, placement
        self.log = log if log is not None else []
        self.label = name or family
        self.granted = threading.Event()
        self.release = threading.Event()
        self.stop = threading.Event()
        self.result: bool | None = None

    def run(self) -> None:
        with self.slots.run(self.family, self.placement, stop=self.stop.is_set) as granted:
            self.result = granted
            if granted:
                self.log.append(self.label)
            self.granted.set()
            if granted:
                self.release.wait(10)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def enqueue(slots: RunSlots, family: str, placement: Placement = Placement(), **kw) -> Runner:
    """Start a job and return once it holds a slot or is queued (so the queue order is the call order)."""
    before = sum(n for lane in slots.waiting().values() for n in lane.values())
    runner = Runner(slots, family, placement, **kw)
    runner.start()
    wait_until(lambda: runner.granted.is_set()
               or sum(n for lane in slots.waiting().values() for n in lane.values()) > before)
    return runner


def finish(runner: Runner, clock: Clock | None = None, seconds: float = 0.0) -> None:
    if clock is not None:
        clock.now += seconds
    runner.release.set()
    runner.join(5)
    assert not runner.is_alive()


def cpu_slots(slots: int, weights=EQUAL, clock: Clock | None = None) -> RunSlots:
    return RunSlots(slots, weights, DeviceLanes(DevicePolicy.cpu()), clock=clock or Clock())


# ---- queue places ------------------------------------------------------------------------------------------


def test_quotas_split_the_places_and_keep_one_for_every_family_with_a_share():
    assert family_quotas(EQUAL, [GEN, ALC], 2) == {GEN: 1, ALC: 1}
    assert family_quotas({GEN: 3, ALC: 1}, [GEN, ALC], 8) == {GEN: 6, ALC: 2}
    assert family_quotas({GEN: 3, ALC: 1}, [GEN, ALC], 2) == {GEN: 1, ALC: 1}  # at least one each
    assert family_quotas({GEN: 1, ALC: 0}, [GEN, ALC], 4) == {GEN: 4, ALC: 0}
    assert family_quotas(EQUAL, [ALC], 3) == {ALC: 3}  # one family alone: every place, as before


def test_an_idle_family_lends_its_places_and_gets_its_quota_back_at_once():
    quotas, places = {GEN: 1, ALC: 1}, 2

    def capacity(family, in_flight, busy):
        return pop_capacity(family, quotas=quotas, in_flight=in_flight, busy=busy, places=places)

    # Alchemy idle (its last pop was empty): generation may fill every place.
    assert capacity(GEN, {GEN: 0, ALC: 0}, {GEN: True, ALC: False}) == 2
    assert capacity(GEN, {GEN: 1, ALC: 0}, {GEN: True, ALC: False}) == 1
    # Generation holds both places: alchemy still pops its own quota (the total briefly exceeds the limit).
    assert capacity(ALC, {GEN: 2, ALC: 0}, {GEN: True, ALC: False}) == 1
    # While alchemy is busy, its unused place is kept for it: generation does not take it.
    assert capacity(GEN, {GEN: 1, ALC: 0}, {GEN: True, ALC: True}) == 0
    assert capacity(GEN, {GEN: 2, ALC: 1}, {GEN: True, ALC: True}) == 0
    # A family with share 0 only borrows.
    zero = {GEN: 2, ALC: 0}
    assert pop_capacity(ALC, quotas=zero, in_flight={GEN: 0}, busy={GEN: True}, places=2) == 0
    assert pop_capacity(ALC, quotas=zero, in_flight={GEN: 0}, busy={GEN: False}, places=2) == 2


# ---- run slots ---------------------------------------------------------------------------------------------


def test_a_freed_slot_goes_to_the_family_that_lent_it_before_older_jobs_of_the_borrower():
    slots = cpu_slots(2)
    log: list[str] = []
    first, second = enqueue(slots, GEN, log=log, name="g1"), enqueue(slots, GEN, log=log, name="g2")
    queued_gen = enqueue(slots, GEN, log=log, name="g3")  # waits: generation borrowed both slots
    form = enqueue(slots, ALC, log=log, name="f1")  # arrives later than g3
    assert log == ["g1", "g2"] and slots.waiting() == {"cpu": {GEN: 1, ALC: 1}}
    finish(first)
    wait_until(lambda: len(log) == 3)
    assert log[2] == "f1", "the form waits only for a generation that was running when it arrived"
    assert slots.running() == {"cpu": {GEN: 1, ALC: 1}}
    finish(form)
    wait_until(lambda: len(log) == 4)
    assert log[3] == "g3"
    finish(second)
    finish(queued_gen)
    assert slots.running() == {} and slots.waiting() == {}


@pytest.mark.parametrize(("weights", "expected"), [
    # Equal shares: generations take 3 s and forms 0.5 s, so six forms run for each generation.
    (EQUAL, ["g", "f", "f", "f", "f", "f", "f", "g", "f", "f"]),
    # Generation weighs 3: per generation (3 s) alchemy gets 1 s, two forms.
    ({GEN: 3.0, ALC: 1.0}, ["g", "f", "f", "g", "f", "f", "g", "f", "f", "g"]),
])
def test_one_slot_is_shared_by_run_time(weights, expected):
    clock = Clock()
    slots = cpu_slots(1, weights, clock)
    log: list[str] = []
    runners = [enqueue(slots, GEN, log=log, name="g")]
    runners += [enqueue(slots, GEN, log=log, name="g") for _ in range(5)]
    runners += [enqueue(slots, ALC, log=log, name="f") for _ in range(12)]
    done = 0
    while len(log) < len(expected):
        running = next(r for r in runners if r.granted.is_set() and not r.release.is_set())
        finish(running, clock, 3.0 if running.family == GEN else 0.5)
        done += 1
        wait_until(lambda: len(log) > done)
    assert log[: len(expected)] == expected
    for runner in runners:
        runner.stop.set()
        runner.release.set()
    slots.interrupt()


def test_a_family_back_from_idle_banks_no_credit():
    clock = Clock()
    slots = cpu_slots(1, clock=clock)
    log: list[str] = []
    for _ in range(4):  # generation alone for a while: 12 s of run time
        finish(enqueue(slots, GEN, log=log, name="g"), clock, 3.0)
    running = enqueue(slots, GEN, log=log, name="g")
    waiting = [enqueue(slots, GEN, log=log, name="g") for _ in range(2)]
    forms = [enqueue(slots, ALC, log=log, name="f") for _ in range(20)]
    finish(running, clock, 3.0)
    # Started level with generation, alchemy gets its share (six 0.5 s forms per 3 s generation), not 12 s
    # worth of forms in a row.
    for done in range(6):
        wait_until(lambda done=done: len(log) == 6 + done)
        head = next(r for r in forms if r.granted.is_set() and not r.release.is_set())
        finish(head, clock, 0.5)
    wait_until(lambda: len(log) == 12)
    assert log[4:] == ["g", "f", "f", "f", "f", "f", "f", "g"]
    for runner in [*waiting, *forms]:
        runner.stop.set()
        runner.release.set()
    slots.interrupt()


def test_stop_hands_back_a_waiting_job_without_a_slot():
    slots = cpu_slots(1)
    holder = enqueue(slots, GEN)
    waiter = enqueue(slots, ALC)
    waiter.stop.set()
    slots.interrupt()
    waiter.join(5)
    assert waiter.result is False and slots.waiting() == {}
    finish(holder)
    assert slots.running() == {}


# ---- devices -----------------------------------------------------------------------------------------------


def card_slots(budget_mib: int) -> RunSlots:
    return RunSlots(1, EQUAL, DeviceLanes(CARD, lambda: budget_mib * MIB))


def test_on_a_card_a_form_that_fits_beside_the_generation_runs_at_once():
    slots = card_slots(budget_mib=3000)
    generation = enqueue(slots, GEN, Placement(bytes=2000 * MIB))
    form = enqueue(slots, ALC, Placement(bytes=600 * MIB))
    assert form.granted.is_set() and slots.running() == {"cuda:0": {GEN: 1, ALC: 1}}
    # A second form waits: alchemy already has its job on the card, and the slot is generation's.
    second = enqueue(slots, ALC, Placement(bytes=100 * MIB))
    assert not second.granted.is_set()
    # Another generation waits too: generation holds the slot.
    queued = enqueue(slots, GEN, Placement(bytes=2000 * MIB))
    assert not queued.granted.is_set()
    finish(form)
    wait_until(second.granted.is_set)
    finish(second)
    finish(generation)
    wait_until(queued.granted.is_set)
    finish(queued)


def test_on_a_card_a_form_that_does_not_fit_waits_for_the_slot():
    slots = card_slots(budget_mib=2500)
    generation = enqueue(slots, GEN, Placement(bytes=2000 * MIB))
    form = enqueue(slots, ALC, Placement(bytes=600 * MIB))
    unknown = enqueue(slots, ALC, Placement(bytes=0))  # size unknown: never beside
    assert not form.granted.is_set() and not unknown.granted.is_set()
    finish(generation)
    wait_until(form.granted.is_set)
    finish(form)
    wait_until(unknown.granted.is_set)
    finish(unknown)


def test_a_job_that_computes_on_the_cpu_does_not_wait_for_the_cards_slot():
    slots = card_slots(budget_mib=0)  # nothing fits beside anything
    generation = enqueue(slots, GEN, Placement(bytes=2000 * MIB))
    on_cpu = enqueue(slots, ALC, ON_CPU)
    assert on_cpu.granted.is_set()
    assert slots.running() == {"cuda:0": {GEN: 1}, "cpu": {ALC: 1}}
    finish(on_cpu)
    finish(generation)


def test_the_cpu_never_runs_jobs_beside_each_other():
    slots = RunSlots(1, EQUAL, DeviceLanes(DevicePolicy.cpu(), lambda: 1 << 40))
    generation = enqueue(slots, GEN, Placement(bytes=1))
    form = enqueue(slots, ALC, Placement(bytes=1))
    assert not form.granted.is_set()
    finish(generation)
    wait_until(form.granted.is_set)
    finish(form)


def test_device_lanes_read_the_model_caches_budget():
    cache = SimpleNamespace(vram_budget_bytes=1234)
    lanes = DeviceLanes.of(SimpleNamespace(device=CARD, cache=cache))
    assert lanes.lane(Placement()) == "cuda:0" and lanes.lane(ON_CPU) == "cpu"
    assert lanes.shares_memory("cuda:0") and not lanes.shares_memory("cpu")
    assert lanes.budget_bytes("cuda:0") == 1234
    cache.vram_budget_bytes = 99  # read at each decision: a budget that changes is followed
    assert lanes.budget_bytes("cuda:0") == 99
    cpu = DeviceLanes.of(SimpleNamespace(device=DevicePolicy.cpu(), cache=None))
    assert cpu.lane(Placement()) == "cpu" and not cpu.shares_memory("cpu") and cpu.budget_bytes("cpu") == 0
