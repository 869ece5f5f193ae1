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

GIB = 1024 * MIB
ONE_MIB_FLOATS = MIB // 4


def mib_module(n_mib: int = 1, fill: float = 1.0) -> torch.nn.Module:
    """A module whose weights take exactly n_mib MiB in float32."""
    module = torch.nn.Linear(ONE_MIB_FLOATS // 256, 256 * n_mib, bias=False)
    torch.nn.init.constant_(module.weight, fill)
    return module


def make_cache(budget_mib: int, **kw) -> ModelCache:
    return ModelCache(DevicePolicy.cpu(), ram_budget_bytes=budget_mib * MIB, **kw)


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


def test_model_larger_than_budget_is_refused_clearly():
    cache = make_cache(2)
    with pytest.raises(CacheFullError, match="does not fit"), cache.use("big", lambda: mib_module(3)):
        pass
    assert cache.resident() == []
    assert cache.used_bytes() == 0


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


def test_locked_model_survives_eviction_pressure():
    cache = make_cache(2, wait_timeout=0.2)
    with cache.use("locked", lambda: mib_module(1, fill=7.0)) as locked:
        for key in ["x", "y", "z"]:
            with cache.use(key, lambda: mib_module(1)):
                assert "locked" in cache.resident()
        with pytest.raises(CacheFullError, match="in use"), cache.use("huge", lambda: mib_module(2)):
            pass
        assert torch.all(locked.weight == 7.0)
    assert "locked" in cache.resident()
    with cache.use("huge", lambda: mib_module(2)):
        assert cache.resident() == ["huge"]


def test_a_thread_never_waits_for_its_own_locks():
    cache = make_cache(2, wait_timeout=60)
    started = time.monotonic()
    with (
        cache.use("held", lambda: mib_module(2)),
        pytest.raises(CacheFullError, match="in use"),
        cache.use("other", lambda: mib_module(1)),
    ):
        pass
    assert time.monotonic() - started < 5  # raised at once, not after the 60 s wait
    assert cache.resident() == ["held"]


def test_waits_for_a_locked_model_to_be_released():
    cache = make_cache(2, wait_timeout=10)
    holding = threading.Event()
    release = threading.Event()

    def hold():
        with cache.use("first", lambda: mib_module(2)):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    with cache.use("second", lambda: mib_module(2)):
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
def test_device_oom_drops_the_model_shrinks_the_budget_and_faults_typed():
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
        assert cache.vram_budget_bytes < 128 * MIB
        assert module.weight.device.type == "cpu"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device.device)
        torch.cuda.empty_cache()
