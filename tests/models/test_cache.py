import threading
import time

import pytest
import torch

from models.cache import (
    MIB,
    CacheFullError,
    ModelCache,
    Tier,
    leave_free_bytes,
    memory_budget,
    object_bytes,
    torch_modules,
)
from models.device import DevicePolicy
from models.machine import InjectedMachine

GIB = 1024 * MIB
ONE_MIB_FLOATS = MIB // 4


def mib_module(n_mib: int = 1, fill: float = 1.0) -> torch.nn.Module:
    """A module whose weights take exactly n_mib MiB in float32."""
    module = torch.nn.Linear(ONE_MIB_FLOATS // 256, 256 * n_mib, bias=False)
    torch.nn.init.constant_(module.weight, fill)
    return module


def make_cache(budget_mib: int, **kw) -> ModelCache:
    return ModelCache(DevicePolicy.cpu(), ram_budget_bytes=budget_mib * MIB, **kw)


def small_machine(ram_mib: float, vram_mib: float = 0, **others_mib: float) -> InjectedMachine:
    """An injected machine sized in MiB: the cache's ledger is its memory use."""
    return InjectedMachine(
        ram_total=int(ram_mib * MIB),
        vram_total=int(vram_mib * MIB),
        ram_others=int(others_mib.get("ram_others", 0) * MIB),
        vram_others=int(others_mib.get("vram_others", 0) * MIB),
    )


def small_machine_cache(ram_mib: float, *, leave_free: str = "0", vram_mib: float = 0,
                        vram_leave_free: str = "0", **kw) -> ModelCache:  # fmt: skip
    device = DevicePolicy.cpu(memory=small_machine(ram_mib, vram_mib))
    return ModelCache(device, ram_to_leave_free=leave_free, vram_to_leave_free=vram_leave_free, **kw)


# --- budget functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("80%", int(0.8 * 24 * GIB)),
        ("0%", 0),
        ("4096", 4 * GIB),
        (4096, 4 * GIB),
        ("512MB", 512 * MIB),
        (" 1.5 ", int(1.5 * MIB)),
    ],
)
def test_leave_free_bytes_reads_percent_or_megabytes(spec, expected):
    assert leave_free_bytes(spec, 24 * GIB) == expected


@pytest.mark.parametrize("spec", ["lots", "-5%", "120%", "4 GB"])
def test_leave_free_bytes_rejects_nonsense(spec):
    with pytest.raises(ValueError):
        leave_free_bytes(spec, 24 * GIB)


def test_memory_budget_leaves_the_requested_share_free():
    # 24 GiB machine, 20 GiB available, keep 80% (19.2 GiB) free -> 0.8 GiB for models.
    assert memory_budget("80%", total_bytes=24 * GIB, available_bytes=20 * GIB) == 20 * GIB - int(
        0.8 * 24 * GIB
    )
    assert memory_budget("4096", total_bytes=24 * GIB, available_bytes=20 * GIB) == 16 * GIB
    # Memory the cache already holds comes back on eviction, so it counts as usable.
    assert (
        memory_budget("4096", total_bytes=24 * GIB, available_bytes=10 * GIB, held_bytes=6 * GIB) == 12 * GIB
    )
    # Never negative, never above the machine's total.
    assert memory_budget("90%", total_bytes=24 * GIB, available_bytes=2 * GIB) == 0
    assert memory_budget("0", total_bytes=8 * GIB, available_bytes=8 * GIB, held_bytes=4 * GIB) == 8 * GIB


# --- cached objects -----------------------------------------------------------------------------------


class Wrapper:
    def __init__(self):
        self.net = mib_module(2)
        self.head = mib_module(1)

    def torch_modules(self):
        return {"net": self.net, "head": self.head}


def test_object_bytes_counts_parameters_and_buffers_once():
    module = mib_module(2)
    module.register_buffer("scale", torch.zeros(ONE_MIB_FLOATS))
    assert object_bytes(module) == 3 * MIB
    shared = torch.nn.Sequential(module, module)
    assert object_bytes(shared) == 3 * MIB
    assert object_bytes(Wrapper()) == 3 * MIB
    assert set(torch_modules(Wrapper())) == {"net", "head"}
    with pytest.raises(TypeError):
        torch_modules(object())


# --- LRU and budgets ----------------------------------------------------------------------------------


def test_lru_eviction_order_and_budget_hold():
    cache = make_cache(3)
    loads: list[str] = []

    def loader(key):
        def load():
            loads.append(key)
            return mib_module(1)

        return load

    for key in ["a", "b", "c"]:
        with cache.use(key, loader(key)):
            pass
    with cache.use("a", loader("a")):  # a becomes most recent
        pass
    assert cache.resident() == ["b", "c", "a"]
    with cache.use("d", loader("d")):
        assert cache.used_bytes() <= cache.ram_budget_bytes
    assert cache.resident() == ["c", "a", "d"]
    assert list(cache.evictions) == [("b", Tier.RAM)]
    assert loads == ["a", "b", "c", "d"]  # a was served from the cache
    with cache.use("b", loader("b")):
        pass
    assert cache.resident() == ["a", "d", "b"]
    assert cache.used_bytes() == 3 * MIB


def test_model_larger_than_the_budget_still_loads_when_the_machine_holds_it():
    # 20 MiB machine, half to leave free: 10 MiB may stay cached, 19 MiB (less the reserve) can be held.
    cache = small_machine_cache(20, leave_free="50%")
    assert cache.budget() == 10 * MIB and cache.capacity() == 19 * MIB
    with cache.use("big", lambda: mib_module(12)) as big:
        assert big.weight.shape[0] == 12 * 256
        assert cache.resident() == ["big"]
    cache.trim()  # between jobs: more than the soft budget is not kept
    assert cache.resident() == [] and cache.device.machine.held("ram") == 0


def test_model_beyond_what_the_machine_holds_is_refused_clearly():
    cache = small_machine_cache(20, leave_free="50%")
    with cache.use("small", lambda: mib_module(2)):
        pass
    with pytest.raises(CacheFullError, match="does not fit"), cache.use(
        "huge", lambda: mib_module(30), size_hint=30 * MIB
    ):
        pass
    assert "huge" not in cache.resident()
    assert cache.device.machine.held("ram") == cache.used_bytes()


def test_size_hint_makes_room_before_loading():
    cache = make_cache(2)
    with cache.use("a", lambda: mib_module(1)), cache.use("b", lambda: mib_module(1)):
        pass
    seen_during_load: list[list[str]] = []

    def load():
        seen_during_load.append(cache.resident())
        return mib_module(2)

    with cache.use("c", load, size_hint=2 * MIB):
        pass
    assert seen_during_load == [[]]  # both evicted before the load started
    assert cache.resident() == ["c"]


def test_a_large_model_that_must_go_anyway_spares_the_small_ones_used_before_it():
    """Strict LRU would evict the 1 MiB models used before the 4 MiB one and then the 4 MiB one as well; the
    4 MiB one alone makes the room, so only it goes. Nothing strict LRU would keep is evicted."""
    cache = make_cache(7)
    for key, size in [("small-1", 1), ("small-2", 1), ("large", 4)]:
        with cache.use(key, lambda size=size: mib_module(size)):
            pass
    with cache.use("next-large", lambda: mib_module(4)):
        pass
    assert list(cache.evictions) == [("large", Tier.RAM)]
    assert cache.resident() == ["small-1", "small-2", "next-large"]
    # 5 MiB to free: no single model does it, so the least recently used goes first; then the 4 MiB one
    # alone frees the remaining 4 and small-2 (which strict LRU would also have evicted) stays.
    with cache.use("big", lambda: mib_module(6)):
        pass
    assert [key for key, _ in cache.evictions] == ["large", "small-1", "next-large"]
    assert cache.resident() == ["small-2", "big"]


def test_locked_model_survives_eviction_pressure():
    # 4 MiB machine: the reserve leaves 3.8 MiB; one model may stay between jobs.
    cache = small_machine_cache(4, leave_free="70%", wait_timeout=0.2)
    with cache.use("locked", lambda: mib_module(1, fill=7.0)) as locked:
        for key in ["x", "y", "z"]:
            with cache.use(key, lambda: mib_module(1)):
                assert "locked" in cache.resident()
        with pytest.raises(CacheFullError, match="in use"), cache.use(
            "huge", lambda: mib_module(3), size_hint=3 * MIB
        ):
            pass
        assert torch.all(locked.weight == 7.0)
    assert "locked" in cache.resident()
    with cache.use("huge", lambda: mib_module(3), size_hint=3 * MIB):
        assert cache.resident() == ["huge"]


def test_a_thread_never_waits_for_its_own_locks():
    cache = small_machine_cache(4, leave_free="70%", wait_timeout=60)
    started = time.monotonic()
    with (
        cache.use("held", lambda: mib_module(3)),
        pytest.raises(CacheFullError, match="in use"),
        cache.use("other", lambda: mib_module(1), size_hint=MIB),
    ):
        pass
    assert time.monotonic() - started < 5  # raised at once, not after the 60 s wait
    assert cache.resident() == ["held"]


def test_waits_for_a_locked_model_to_be_released():
    cache = small_machine_cache(4, leave_free="70%", wait_timeout=10)
    holding = threading.Event()
    release = threading.Event()

    def hold():
        with cache.use("first", lambda: mib_module(3)):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    with cache.use("second", lambda: mib_module(3), size_hint=3 * MIB):
        assert cache.resident() == ["second"]
    assert time.monotonic() - started >= 0.15
    thread.join()


def test_drop_of_a_model_in_use_happens_on_release():
    cache = make_cache(4)
    with cache.use("a", lambda: mib_module(1)):
        cache.drop("a")
        assert cache.resident() == ["a"]
    assert cache.resident() == []
    cache.drop("never-loaded")


def test_failed_loader_leaves_no_entry():
    cache = make_cache(4)

    def broken():
        raise OSError("corrupt file")

    with pytest.raises(OSError), cache.use("bad", broken):
        pass
    assert cache.resident() == [] and cache.used_bytes() == 0
    with cache.use("bad", lambda: mib_module(1)):
        pass
    assert cache.resident() == ["bad"]


def test_concurrent_jobs_on_two_models():
    cache = make_cache(2)
    loads = {"a": 0, "b": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loader(key, fill):
        def load():
            with lock:
                loads[key] += 1
            time.sleep(0.05)  # a slow load: concurrent users of the same key must wait, not load twice
            return mib_module(1, fill=fill)

        return load

    def job(key, fill):
        try:
            for _ in range(20):
                with cache.use(key, loader(key, fill)) as module:
                    out = module(torch.ones(1, module.in_features))
                    assert torch.all(out == fill * module.in_features)
                    assert cache.used_bytes() <= cache.ram_budget_bytes
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(k, f)) for k, f in [("a", 1.0), ("b", 2.0)] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert loads == {"a": 1, "b": 1}
    assert sorted(cache.resident()) == ["a", "b"]


def test_cpu_use_is_a_no_op_move():
    cache = make_cache(4)
    module = mib_module(1)
    with cache.use("m", lambda: module) as got:
        assert got is module
        assert got.weight.device.type == "cpu"
    assert cache.on_device() == []
    assert cache.offload("m") is False
    assert cache.used_bytes(Tier.VRAM) == 0


def test_if_room_on_a_cpu_cache_is_a_plain_use():
    cache = make_cache(4)
    module = mib_module(1)
    with cache.use("m", lambda: module, if_room=True) as got:
        assert got is module and got.weight.device.type == "cpu"
    assert cache._entries["m"].cpu_users == 0 and cache.on_device() == []


@pytest.mark.gpu
def test_if_room_uses_the_gpu_only_without_evicting_and_never_moves_under_a_cpu_user():
    device = DevicePolicy.detect()
    assert device.is_cuda
    cache = ModelCache(device, ram_budget_bytes=64 * MIB, vram_budget_bytes=2 * MIB)
    with cache.use("generation", lambda: mib_module(2)):  # fills the VRAM budget
        pass
    with cache.use("side", lambda: mib_module(1), if_room=True) as side:
        assert side.weight.device.type == "cpu"  # no room without evicting: the RAM copy
        assert cache.on_device() == ["generation"] and cache._entries["side"].cpu_users == 1
        moved = threading.Event()

        def wants_gpu():
            with cache.use("side", lambda: mib_module(1)):
                moved.set()

        mover = threading.Thread(target=wants_gpu)
        mover.start()
        time.sleep(0.2)
        assert not moved.is_set() and side.weight.device.type == "cpu"  # waits for the CPU user
    mover.join(10)
    assert moved.is_set() and cache._entries["side"].cpu_users == 0
    cache.offload("side")
    cache.drop("generation")
    with cache.use("side", lambda: mib_module(1), if_room=True) as side:
        assert side.weight.device.type == "cuda"  # room now: the GPU


@pytest.mark.gpu
def test_cuda_moves_from_pinned_memory_and_offloads_without_copies():
    device = DevicePolicy.detect()
    assert device.is_cuda
    cache = ModelCache(device, ram_budget_bytes=64 * MIB, vram_budget_bytes=2 * MIB)
    with cache.use("a", lambda: mib_module(1, fill=3.0)) as a:
        assert a.weight.device.type == "cuda"
        ram_copy = cache._entries["a"].ram_copies[0][1]
        assert ram_copy.is_pinned()
    with cache.use("b", lambda: mib_module(1)), cache.use("c", lambda: mib_module(1)):
        pass
    assert "a" not in cache.on_device() and "a" in cache.resident()
    assert a.weight.device.type == "cpu" and a.weight.data_ptr() == ram_copy.data_ptr()
    assert cache.used_bytes(Tier.VRAM) <= 2 * MIB
    assert cache.offload("c") and "c" not in cache.on_device()
    assert not cache.offload("a")  # already off the device


@pytest.mark.gpu
def test_device_oom_drops_the_model_and_faults_typed():
    from models.cache import DeviceOutOfMemoryError

    device = DevicePolicy.detect()
    assert device.is_cuda
    total = device.vram_bytes()[1]
    torch.cuda.set_per_process_memory_fraction(64 * MIB / total, device.device)
    try:
        cache = ModelCache(device, ram_budget_bytes=1024 * MIB, vram_budget_bytes=1024 * MIB)
        module = mib_module(128)
        with pytest.raises(DeviceOutOfMemoryError), cache.use("big", lambda: module):
            pass
        assert cache.resident() == [] and cache.used_bytes(Tier.VRAM) == 0
        assert module.weight.device.type == "cpu"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device.device)
        torch.cuda.empty_cache()


# --- soft budgets and capacity on injected machines ----------------------------------------------------


@pytest.mark.parametrize("ram_gib", [16, 32, 64])
def test_default_ram_budget_on_injected_machines(ram_gib):
    from bridge.config import BridgeConfig

    spec = BridgeConfig().ram_to_leave_free
    others = ram_gib * GIB // 4  # the operating system and the volunteer's programs
    machine = InjectedMachine(ram_total=ram_gib * GIB, ram_others=others)
    cache = ModelCache(DevicePolicy.cpu(memory=machine), ram_to_leave_free=spec)
    free = ram_gib * GIB - others
    assert cache.capacity() == free - 512 * MIB
    assert cache.budget() == free - leave_free_bytes(spec, ram_gib * GIB)
    # BLIP-large + CLIP ViT-L/14 + the safety checker in float32 (4.8 GiB) stay cached between forms even on
    # the 16 GB machine, and the volunteer keeps the rest.
    assert cache.budget() >= int(4.8 * GIB)
    assert ram_gib * GIB - others - cache.budget() >= 4 * GIB


@pytest.mark.parametrize("vram_gib", [8, 12, 24])
def test_default_vram_budget_on_injected_cards(vram_gib):
    from bridge.config import BridgeConfig

    spec = BridgeConfig().vram_to_leave_free
    machine = InjectedMachine(ram_total=32 * GIB, vram_total=vram_gib * GIB, vram_others=GIB // 2)
    device = DevicePolicy.cpu(memory=machine)
    cache = ModelCache(device, ram_to_leave_free="0", vram_to_leave_free=spec)
    assert device.has_vram and device.execution_tier == "vram"
    free = vram_gib * GIB - GIB // 2
    assert cache.capacity(Tier.VRAM) == free - min(512 * MIB, vram_gib * GIB // 20)
    assert cache.budget(Tier.VRAM) == free - leave_free_bytes(spec, vram_gib * GIB)
    # An SD1.5 model in float16 (2.1 GiB) stays on the card between jobs on the smallest of them.
    assert cache.budget(Tier.VRAM) >= int(2.1 * GIB)


def test_budget_is_read_again_as_the_machine_changes():
    machine = small_machine(20)
    cache = ModelCache(DevicePolicy.cpu(memory=machine), ram_to_leave_free="25%")
    for key in ("a", "b", "c"):
        with cache.use(key, lambda: mib_module(4)):
            pass
    assert cache.resident() == ["a", "b", "c"]  # 12 of the 15 MiB budget
    machine.set_others(ram=8 * MIB)  # the volunteer opened a browser: nothing is free now
    assert cache.budget() == 7 * MIB
    cache.trim()
    assert cache.resident() == ["c"]
    assert list(cache.evictions) == [("a", Tier.RAM), ("b", Tier.RAM)]
    machine.set_others(ram=0)
    assert cache.budget() == 15 * MIB


def test_two_models_alternate_under_a_one_model_budget():
    cache = small_machine_cache(12, leave_free="50%")  # 6 MiB may stay: one 5 MiB model
    loads: list[str] = []

    def loader(key):
        def load():
            loads.append(key)
            return mib_module(5, fill=1.0 if key == "a" else 2.0)

        return load

    for key in ["a", "b"] * 3:
        with cache.use(key, loader(key), size_hint=5 * MIB) as module:
            assert torch.all(module.weight == (1.0 if key == "a" else 2.0))
            assert cache.resident() == [key]
    assert loads == ["a", "b"] * 3
    assert cache.used_bytes() == 5 * MIB == cache.device.machine.held("ram")


def test_a_simulated_card_holds_weights_and_working_memory_within_its_size():
    # 16 MiB card: 0.8 MiB reserve, 12 MiB may stay between jobs.
    cache = small_machine_cache(64, vram_mib=16, vram_leave_free="25%")
    machine = cache.device.machine
    with cache.use("a", lambda: mib_module(6)):
        assert cache.on_device() == ["a"] and machine.held("vram") == 6 * MIB
    with cache.use("b", lambda: mib_module(6)):
        assert sorted(cache.on_device()) == ["a", "b"]
    # A job on b needs 8 MiB of activations: a leaves the card (not b, which the job is about to use).
    with cache.working_memory(8 * MIB, keep=("b",)):
        assert cache.on_device() == ["b"] and machine.held("vram") == 14 * MIB
        with cache.use("b", lambda: mib_module(6)):
            pass
    assert machine.held("vram") == 6 * MIB
    assert cache.resident() == ["a", "b"]  # a's RAM copy stays: RAM is plentiful
    with pytest.raises(CacheFullError, match="does not fit"), cache.working_memory(20 * MIB):
        pass
    assert machine.held("vram") == cache.used_bytes(Tier.VRAM)


def test_out_of_memory_moving_onto_the_card_drops_the_model_and_raises_typed():
    from models.cache import DeviceOutOfMemoryError

    class FlakyCard(InjectedMachine):
        """A card that refuses the next allocation although its numbers said it fits (fragmentation)."""

        refuse = True

        def account(self, tier, nbytes):
            if tier == "vram" and nbytes > 0 and self.refuse:
                self.refuse = False
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            super().account(tier, nbytes)

    machine = FlakyCard(ram_total=64 * MIB, vram_total=16 * MIB)
    cache = ModelCache(DevicePolicy.cpu(memory=machine), ram_to_leave_free="0", vram_to_leave_free="0")
    with pytest.raises(DeviceOutOfMemoryError), cache.use("a", lambda: mib_module(4)):
        pass
    assert cache.resident() == [] and cache.on_device() == []
    assert machine.held("vram") == 0 and machine.held("ram") == 0
    with cache.use("a", lambda: mib_module(4)):  # the next use works
        assert cache.on_device() == ["a"]


def test_overlapping_working_memory_holds_are_each_counted_and_released():
    """Two jobs holding working memory at once (here nested, as two run slots overlap): each hold is its own,
    both count while held and each release gives back its own bytes."""
    cache = small_machine_cache(64)
    with cache.working_memory(3 * MIB, tier=Tier.RAM):
        with cache.working_memory(5 * MIB, tier=Tier.RAM):
            assert cache.used_bytes() == 8 * MIB
        assert cache.used_bytes() == 3 * MIB
    assert cache.used_bytes() == 0
