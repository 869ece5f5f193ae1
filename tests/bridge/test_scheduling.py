"""Fair shares between job families: queue places, run slots, device lanes (bridge/scheduling.py).

The run-slot tests drive the real RunSlots from threads with a hand-turned clock: each job blocks inside
its slot until the test lets it go, so the order of grants is exact. The daemon tests at the end run the
real loop against the local horde with both families served (tiny SD generations and tiny nsfw forms); a
ledger of when each job was ready, started and ended checks the order of the slots.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.families import ALCHEMY, GENERATION
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.jobs.base import ON_CPU, Job, Placement, bytes_on_disk
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.scheduling import DeviceLanes, RunSlots, family_quotas, pop_capacity
from bridge.sources import SourceFetcher
from bridge.stats import Stats
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.cache import ModelCache
from models.device import DevicePolicy
from tests.interrogators.helpers import cpu_cache, tiny_models_dir, tiny_set

GEN, ALC = GENERATION, ALCHEMY
EQUAL = {GEN: 1.0, ALC: 1.0}
CARD = DevicePolicy(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=False)
MIB = 1 << 20
ANYWHERE = Placement()  # the worker's device, size unknown


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Runner(threading.Thread):
    """One job inside RunSlots.run: records when it got its slot and holds it until released."""

    def __init__(self, slots: RunSlots, family: str, placement: Placement = ANYWHERE, *,
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


def enqueue(slots: RunSlots, family: str, placement: Placement = ANYWHERE, **kw) -> Runner:
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
        wait_until(lambda done=done: len(log) > done)
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


# ---- the daemon, both families, through the local horde ----------------------------------------------------

MODEL = "tiny-sd1"
REGEN = "AI Horde Worker reGen:10.0.0:https://github.com/Haidra-Org/horde-worker-reGen"
GENERATION_PARAMS = {"width": 192, "height": 192, "steps": 4, "sampler_name": "k_euler", "seed": "3"}
TOLERANCE_S = 0.05  # thread hand-over between a slot's grant and the ledger's clock read


class _LedgerSlot:
    """A job's run slot, timed from its grant to its release; a gated family waits inside it."""

    def __init__(self, ledger: Ledger, job: Job, slot) -> None:
        self.ledger, self.job, self.slot = ledger, job, slot
        self.start = self.end = 0.0

    def __enter__(self):
        entered = self.slot.__enter__()
        self.start = time.monotonic()
        with self.ledger.lock:
            self.ledger.starts.append((self.job.family, self.start))
        if self.job.family in self.ledger.gates:
            self.ledger.gates[self.job.family].wait(20)
        return entered

    def __exit__(self, *exc_info):
        self.end = time.monotonic()
        return self.slot.__exit__(*exc_info)


@dataclass
class Span:
    family: str
    popped: float
    ready: float  # prepared, asking for a slot
    start: float
    end: float
    state: str = "ok"  # of its first submission


class Ledger:
    """Test instrumentation: every job's time in its run slot is recorded (the job, loop and HTTP are the
    real ones)."""

    def __init__(self, gates: dict[str, threading.Event] | None = None) -> None:
        self.gates = gates or {}  # family -> event its jobs wait for, holding their slot, before running
        self.spans: list[Span] = []
        self.starts: list[tuple[str, float]] = []
        self.pops: dict[str, list[float]] = {GEN: [], ALC: []}
        self.lock = threading.Lock()

    def watch(self, family: str, jobs: list[Job]) -> list[Job]:
        with self.lock:
            self.pops[family].append(time.monotonic())
        for job in jobs:
            real = job.execute_in_slot

            def in_slot(runtime, slot, real=real, job=job):
                held = _LedgerSlot(self, job, slot)
                submissions = real(runtime, held)
                ready = held.start - job.timings.queue_wait
                state = submissions[0].state
                span = Span(job.family, job.timings.popped_at, ready, held.start, held.end, state)
                with self.lock:
                    self.spans.append(span)
                return submissions

            job.execute_in_slot = in_slot
        return jobs

    def next_start(self, family: str, timeout: float = 20.0) -> None:
        """Wait until a job of `family` starts (after the call)."""
        seen = sum(f == family for f, _ in self.starts)
        wait_until(lambda: sum(f == family for f, _ in self.starts) > seen, timeout)

    def of(self, family: str) -> list[Span]:
        return [s for s in self.spans if s.family == family]

    def running(self, family: str, at: float) -> int:
        return sum(s.start <= at < s.end for s in self.of(family))

    def overtaken(self, family: str, share: int) -> list[tuple[Span, Span]]:
        """Jobs of `family` that waited while a job of another family started although `family` ran fewer
        than `share` jobs at that moment."""
        return [(mine, other) for mine in self.of(family) for other in self.spans
                if other.family != family and self.running(family, other.start) < share
                and mine.ready + TOLERANCE_S < other.start < mine.start - TOLERANCE_S]


class WatchedGeneration(GenerationSource):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def pop(self, client, runtime, capacity):
        return self.ledger.watch(self.family, super().pop(client, runtime, capacity))


class WatchedAlchemy(AlchemySource):
    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def pop(self, client, runtime, capacity):
        return self.ledger.watch(self.family, super().pop(client, runtime, capacity))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Tiny SD1 (single file, loaded by the real ModelManager) and the tiny nsfw checker, one torch thread
    (microsecond ops on a shared 2-core machine otherwise wait on descheduled OpenMP threads)."""
    from models.manager import ModelManager
    from models.reference import ModelReference
    from models.tiny import build_tiny_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.getbasetemp() / "tiny-sd"
    reference_json = build_tiny_models(root)
    reference = ModelReference.load(cache_dir=root / "ref-cache", upstream=None, extra_files=[reference_json])
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=1 << 30)
    manager = ModelManager(reference=reference, cache=cache, device=DevicePolicy.cpu(),
                           cache_home=root / "home", models=[MODEL])
    interrogators = tiny_set(tiny_models_dir(tmp_path_factory), cpu_cache(), forms=("nsfw",))
    interrogators.warm()
    record = manager.record(MODEL)
    generation_bytes = bytes_on_disk(manager.files_dir(MODEL) / f.path for f in record.files)
    yield SimpleNamespace(manager=manager, interrogators=interrogators, cache=cache,
                          generation_bytes=generation_bytes,
                          form_bytes=bytes_on_disk([Path(interrogators.safety.embedder.folder)]))
    torch.set_num_threads(threads)


def webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), "teal").save(buffer, format="WEBP")
    return buffer.getvalue()


def start(horde: LocalHorde, served, tmp_path: Path, ledger: Ledger, *, devices=None, **settings):
    config = build_config({"dreamer_name": "fair-dreamer", "alchemist_name": "fair-alchemist",
                           "forms": ["nsfw"], "bridge_agent": REGEN, "max_threads": 1, "queue_size": 1,
                           **settings}, environ={}).config
    fetcher = SourceFetcher(timeout=2.0, allow_private=True)  # the local horde is on loopback
    runtime = Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher,
                      models=served.manager, interrogators=served.interrogators, cache=served.cache,
                      safety=served.interrogators.safety)  # the nsfw form's pass checks the images too
    client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="test:1:none", timeout=5.0,
                         retry=RetryPolicy(base_delay=0.01, max_delay=0.05))
    sources = [WatchedGeneration(ledger), WatchedAlchemy(ledger)]
    daemon = Daemon(client=client, runtime=runtime, sources=sources,
                    journal=Journal(tmp_path / "inflight.json"), stats=Stats(), devices=devices,
                    timings=LoopTimings(idle_poll_s=0.05, error_poll_s=0.05))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return daemon, thread


def stop(daemon: Daemon, thread: threading.Thread) -> None:
    daemon.request_stop("test")
    thread.join(timeout=30)
    assert not thread.is_alive()


def generations(horde: LocalHorde, count: int, tag: str = "", params=GENERATION_PARAMS) -> list[str]:
    return [horde.request_generation(params, models=[MODEL], prompt=f"a boat {tag}{i}") for i in range(count)]


def forms_every(horde: LocalHorde, url: str, count: int, every_s: float) -> list[tuple[float, str]]:
    asked = []
    for _ in range(count):
        asked.append((time.monotonic(), horde.request_interrogation(url, ["nsfw"])))
        time.sleep(every_s)
    return asked


def test_forms_are_served_within_their_expiry_while_the_generation_queue_stays_full(served, tmp_path):
    ledger = Ledger()
    with LocalHorde(known_models=[MODEL], form_ttl=3.0) as horde:
        url = horde.host_image(webp(), "form.webp")
        backlog = generations(horde, 20)  # several seconds of work, always more than the queue holds
        daemon, thread = start(horde, served, tmp_path, ledger)
        time.sleep(0.3)
        asked = forms_every(horde, url, 5, 0.3)
        done = horde.wait_done([rid for _, rid in asked], timeout=20)
        served_at = time.monotonic()
        horde.wait_done(backlog, timeout=60)
        stop(daemon, thread)
        books = horde.accounting()
    assert all(status["state"] == "done" for status in done.values())
    last_generation = max(s.start for s in ledger.of(GEN))
    assert max(s.end for s in ledger.of(ALC)) < last_generation, "forms waited for the generation backlog"
    assert served_at - asked[-1][0] < 3.0
    assert not books.requeues and books.unfinished() == []  # no form expired, nothing lost
    assert all(len(submits) == 1 for submits in books.submits.values())
    # A form never waited behind a generation that started after it was ready.
    assert ledger.overtaken(ALC, share=1) == []
    longest = max(s.end - s.start for s in ledger.of(GEN))
    assert max(s.start - s.ready for s in ledger.of(ALC)) < longest + TOLERANCE_S
    # Alchemy was asked for work all along, not only once the images were done.
    pops = ledger.pops[ALC]
    assert max(b - a for a, b in zip(pops, pops[1:], strict=False)) < longest + 1.0
    snap = daemon.stats.snapshot()
    assert snap.families[ALC].submits == 5 and snap.families[GEN].submits == 20
    assert snap.families[ALC].kudos > 0 and snap.families[GEN].kudos > 0


def test_each_familys_share_holds_and_an_idle_family_lends_its_slots(served, tmp_path):
    ledger = Ledger()
    with LocalHorde(known_models=[MODEL]) as horde:
        url = horde.host_image(webp(), "form.webp")
        alone = generations(horde, 6, "alone ")
        daemon, thread = start(horde, served, tmp_path, ledger, max_threads=2, queue_size=1)
        horde.wait_done(alone, timeout=60)
        lent = list(ledger.of(GEN))
        mixed = generations(horde, 12, "mixed ")
        asked = forms_every(horde, url, 10, 0.05)
        horde.wait_done(mixed + [rid for _, rid in asked], timeout=60)
        stop(daemon, thread)
    # Alchemy idle: generation ran on both slots, and popped ahead into alchemy's places (3 > its quota 1).
    assert any(a.start < b.start < a.end for a in lent for b in lent if a is not b)
    assert max(sum(s.popped <= t < s.end for s in lent) for t in (s.popped for s in lent)) == 3
    # Both busy: a job of one family never started while the other waited below its share (one slot),
    # and alchemy kept its slot and its place in the queue: its forms were done while the generations
    # still had work queued.
    assert ledger.overtaken(ALC, share=1) == []
    assert ledger.overtaken(GEN, share=1) == []
    forms = ledger.of(ALC)
    assert len(forms) == 10
    assert max(f.end for f in forms) < max(g.start for g in ledger.of(GEN))


@pytest.mark.parametrize("fits", [True, False])
def test_on_a_card_forms_that_fit_beside_run_during_the_generation(served, tmp_path, fits):
    """The device policy is injected: a CUDA card whose budget holds the generation's model and the form's
    together, or only the generation's. The jobs themselves compute on this machine's CPU; each generation
    holds its slot until the test opens the gate."""
    card = DevicePolicy(device=torch.device("cuda", 0), dtype=torch.float16, pin_memory=False)
    budget = served.generation_bytes + (served.form_bytes if fits else 0)
    gate = threading.Event()
    ledger = Ledger(gates={GEN: gate})
    with LocalHorde(known_models=[MODEL]) as horde:
        url = horde.host_image(webp(), "form.webp")
        backlog = generations(horde, 3)
        daemon, thread = start(horde, served, tmp_path, ledger, devices=DeviceLanes(card, lambda: budget))
        ledger.next_start(GEN)  # the first generation holds the card's one slot
        # A form that will only fault (unreadable source) computes nothing: it goes on the CPU lane, never
        # waits for the card (the horde hands it out again after each faulted submit, up to its limit).
        broken = horde.request_interrogation(horde.host_image(b"not an image", "broken.webp"), ["nsfw"])
        horde.wait_done([broken], timeout=20)
        forms = [horde.request_interrogation(url, ["nsfw"]) for _ in range(2)]
        if fits:  # both forms ran beside the generation, one after the other
            horde.wait_done(forms, timeout=20)
        else:  # they wait for the slot
            time.sleep(0.5)
            assert not any(horde.is_done(rid)[0] for rid in forms)
        assert not gate.is_set() and len(ledger.of(GEN)) == 0
        gate.set()
        horde.wait_done([*backlog, *forms], timeout=60)
        stop(daemon, thread)
    first = min(ledger.of(GEN), key=lambda s: s.start)
    served_forms = [f for f in ledger.of(ALC) if f.state == "ok"]
    assert len(served_forms) == 2
    if fits:
        assert all(first.start < f.start < first.end for f in served_forms)
        assert all(f.start - f.ready < TOLERANCE_S for f in served_forms)
    else:
        assert all(f.start > first.end - TOLERANCE_S for f in served_forms)
        assert ledger.overtaken(ALC, share=1) == []  # and behind nothing but that generation
