"""Admission control on injected machines, with the tiny SD models, the real job classes, the real daemon and
the local horde over HTTP: what is offered, what is held, and what an out-of-memory error ends in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.admission import Admission, MemoryFault
from bridge.config import BRIDGE_NAME, build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.generation import GenerationJob, GenerationSource, pop_request
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from bridge.stats import Stats
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.cache import ModelCache, Tier
from models.device import DevicePolicy
from models.machine import InjectedMachine
from models.manager import ModelManager
from models.reference import ModelReference
from models.working_memory import GIB, JobShape, WorkingMemoryTable
from tests.bridge.generation import conftest as generation_fixtures

tiny_reference = generation_fixtures.tiny_reference
one_torch_thread = generation_fixtures.one_torch_thread

MODEL = "tiny-sd1-diffusers"
WORKER = "admission-test-worker"
FAST = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05, maintenance_poll_s=0.05, fault_pause_s=0.2)


def card_runtime(reference_json: Path, machine: InjectedMachine, safety: Any = None, **settings) -> Runtime:
    """A generation runtime whose device is `machine`'s card (simulated; the jobs compute on this CPU), with
    the committed defaults for everything memory-related."""
    config = build_config({"dreamer_name": WORKER, "api_key": DEFAULT_API_KEY, **settings}, environ={}).config
    device = DevicePolicy.cpu(memory=machine)
    cache = ModelCache(device, ram_to_leave_free=config.ram_to_leave_free,
                       vram_to_leave_free=config.vram_to_leave_free)  # fmt: skip
    root = reference_json.parent
    reference = ModelReference.load(cache_dir=root / "ref-cache", upstream=None, extra_files=[reference_json])
    manager = ModelManager(reference=reference, cache=cache, device=device, cache_home=root / "home",
                           models=[MODEL])  # fmt: skip
    admission = Admission(cache=cache, device=device, table=WorkingMemoryTable(device), models=manager)
    return Runtime(config=config, device=device, fetcher=SourceFetcher(), models=manager, admission=admission,
                   safety=safety)


@pytest.fixture()
def horde() -> Iterator[LocalHorde]:
    with LocalHorde(known_models=[MODEL], extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"}) as local:
        yield local


def client_for(horde: LocalHorde) -> HordeClient:
    return HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="tests:0:none",
                       retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05))  # fmt: skip


def params(size: int) -> dict:
    return {"width": size, "height": size, "steps": 2, "sampler_name": "k_euler", "seed": "3"}


def test_never_advertises_more_pixels_than_the_card_holds(passing_safety, tiny_reference, horde):
    # A 3 GiB card with 0.5 GiB taken by the desktop: far less than max_power 32 (1024x1024) needs.
    machine = InjectedMachine.gib(16, 3, vram_others=0.5)
    runtime = card_runtime(tiny_reference, machine, passing_safety, max_power=32)
    admission = runtime.admission
    offer = admission.offer([MODEL], 1024 * 1024)
    assert offer.models == [MODEL] and 256 * 256 < offer.max_pixels < 1024 * 1024
    # The advertised size fits the card with the model on it; one step more does not.
    room = admission.cache.capacity(Tier.VRAM) - admission.model_bytes(MODEL)
    assert admission.table.job_bytes(JobShape("sd", offer.max_pixels, 1)) <= room
    assert admission.table.job_bytes(JobShape("sd", offer.max_pixels + 4096, 1)) > room
    with pytest.raises(MemoryFault, match="cannot hold"):
        admission.check(MODEL, JobShape("sd", 1024, 1024))
    # Over HTTP: the horde keeps the 1024x1024 request for another worker and hands us the small one.
    big = horde.request_generation(params(1024), models=[MODEL])
    small = horde.request_generation(params(64), models=[MODEL])
    with client_for(horde) as client:
        [job] = GenerationSource().pop(client, runtime, capacity=1)
        assert horde.worker_details(WORKER)["max_pixels"] == offer.max_pixels
        assert (job.pop.payload.width, job.pop.payload.height) == (64, 64)
        job.prepare(runtime)
        [submission] = job.execute(runtime)
        job.send(client, submission)
    assert submission.state == "ok"
    assert horde.wait_done([small])[small]["done"]
    assert horde.generation_status(big)["waiting"] == 1


def test_a_card_that_cannot_hold_the_model_pops_nothing(passing_safety, tiny_reference, horde, caplog):
    machine = InjectedMachine.gib(16, 0.5)  # 512 MiB: not even the smallest job's working memory
    runtime = card_runtime(tiny_reference, machine, passing_safety)
    horde.request_generation(params(64), models=[MODEL])
    with client_for(horde) as client, caplog.at_level("WARNING"):
        assert GenerationSource().pop(client, runtime, capacity=1) == []
        assert GenerationSource().pop(client, runtime, capacity=1) == []
    assert horde.worker_details(WORKER) is None  # no pop was sent at all
    said = [r.message for r in caplog.records if "not offering" in r.message]
    assert len(said) == 1 and MODEL in said[0] and "GPU memory" in said[0]


@pytest.mark.parametrize(
    ("machine", "error"),
    [
        (lambda: InjectedMachine.gib(16, 8), torch.OutOfMemoryError("CUDA out of memory (2 GiB)")),
        (lambda: InjectedMachine.gib(16), MemoryError("cannot allocate 2 GiB")),  # RAM is the device
    ],
    ids=["card", "cpu"],
)
def test_out_of_memory_in_diffusion_faults_lowers_the_ceiling_and_the_next_job_is_served(
    passing_safety, tiny_reference, horde, tmp_path, machine, error
):
    machine = machine()
    runtime = card_runtime(tiny_reference, machine, passing_safety, max_power=8)
    with runtime.models.pipeline(MODEL) as pipe:
        unet = pipe.unet
    failures = []

    def out_of_memory_once(module, args):
        if not failures:
            failures.append(True)
            raise error

    hook = unet.register_forward_pre_hook(out_of_memory_once)
    first = horde.request_generation(params(256), models=[MODEL])
    second = horde.request_generation(params(128), models=[MODEL])
    daemon = Daemon(client=client_for(horde), runtime=runtime, sources=[GenerationSource()],
                    journal=Journal(tmp_path / "inflight.json"), stats=Stats(), timings=FAST)  # fmt: skip
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        statuses = horde.wait_done([second], timeout=60)
    finally:
        daemon.request_stop("test")
        thread.join(timeout=30)
        hook.remove()
    assert not thread.is_alive()
    submits = [s for i in horde.accounting().handed_out for s in horde.submits(i)]
    assert len(submits) == 2  # one submit per popped id
    [faulted] = [s for s in submits if s["state"] == "faulted"]
    refs = [m.get("ref", "") for m in faulted["gen_metadata"]]
    assert any("out of memory" in r and type(error).__name__ in r for r in refs)
    # The ceiling of that model came down below the size that failed; what is advertised follows.
    assert runtime.admission.ceiling(MODEL) == 256 * 256 * 3 // 4
    assert runtime.admission.offer([MODEL], 512 * 512).max_pixels == 256 * 256 * 3 // 4
    [generation] = statuses[second]["generations"]
    assert generation["state"] == "ok"
    # The horde put the failed request back in its queue: at 256x256 it is over what we now ask for.
    assert horde.generation_status(first)["waiting"] == 1
    # Nothing of the failed job is still held: only the model's weights.
    tier = runtime.admission.tier
    assert runtime.admission.cache.used_bytes(tier) == machine.held(tier) <= 64 * 1024 * 1024
    assert len(failures) == 1


def test_a_job_over_the_lowered_ceiling_faults_with_the_reason(passing_safety, tiny_reference, horde):
    runtime = card_runtime(tiny_reference, InjectedMachine.gib(16, 8), passing_safety)
    runtime.admission.on_out_of_memory(MODEL, JobShape("sd", 128, 128), "simulated")
    request = horde.request_generation(params(128), models=[MODEL])
    with client_for(horde) as client:
        reply = client.pop_generation(pop_request(runtime.config, [MODEL]))
        job = GenerationJob(reply)
        [submission] = job.execute(runtime)
        job.send(client, submission)
    assert submission.state == "faulted"
    assert any("since it ran out of memory" in m.get("ref", "") for m in submission.gen_metadata)
    [submitted] = horde.submits(job.ids[0])
    assert submitted["state"] == "faulted" and submitted["gen_metadata"] == submission.gen_metadata
    assert horde.generation_status(request)["waiting"] == 1  # back in the queue for another worker


def test_ram_is_the_device_on_a_cpu_machine(passing_safety, tiny_reference):
    # A 16 GB CPU-only machine: the same decisions, with RAM as the device.
    machine = InjectedMachine.gib(16, ram_others=4)
    runtime = card_runtime(tiny_reference, machine, passing_safety, max_power=8)
    assert runtime.admission.where == "RAM"
    assert runtime.admission.offer([MODEL], 512 * 512).max_pixels == 512 * 512
    machine.set_others(ram=int(15.5 * GIB))  # the volunteer's programs take almost everything
    assert runtime.admission.offer([MODEL], 512 * 512).models == []


def test_a_job_the_machine_can_no_longer_hold_faults_saying_so_and_the_worker_goes_on(
    passing_safety, tiny_reference, horde
):
    machine = InjectedMachine.gib(16, 8)
    runtime = card_runtime(tiny_reference, machine, passing_safety)
    request = horde.request_generation(params(256), models=[MODEL])
    with client_for(horde) as client:
        [job] = GenerationSource().pop(client, runtime, capacity=1)
        machine.set_others(vram=int(7.8 * GIB))  # a game started on the card after the pop
        [submission] = job.execute(runtime)
        job.send(client, submission)
        assert submission.state == "faulted"
        [reason] = [m["ref"] for m in submission.gen_metadata if m["type"] == "information"]
        assert "cannot hold tiny-sd1-diffusers at 256x256" in reason and "GPU memory" in reason
        assert runtime.admission.ceiling(MODEL) is None  # nothing ran out: no reason to serve it smaller
        machine.set_others(vram=0)  # the game ended: the requeued job is served
        [again] = GenerationSource().pop(client, runtime, capacity=1)
        [ok] = again.execute(runtime)
        again.send(client, ok)
    assert ok.state == "ok"
    assert horde.wait_done([request])[request]["done"]


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_in_diffusion_is_a_fault_and_frees_the_card(tiny_reference):
    device = DevicePolicy.detect()
    assert device.is_cuda
    cache = ModelCache(device, ram_to_leave_free="30%", vram_to_leave_free="30%")
    root = tiny_reference.parent
    reference = ModelReference.load(cache_dir=root / "ref-cache", upstream=None, extra_files=[tiny_reference])
    manager = ModelManager(reference=reference, cache=cache, device=device, cache_home=root / "home",
                           models=[MODEL])  # fmt: skip
    admission = Admission(cache=cache, device=device, table=WorkingMemoryTable(device), models=manager)
    with manager.pipeline(MODEL):
        pass
    before = torch.cuda.memory_allocated(device.device)
    total = torch.cuda.mem_get_info(device.device)[1]
    torch.cuda.set_per_process_memory_fraction((before + (256 << 20)) / total, device.device)
    try:
        shape = JobShape("sd", 2048, 2048)  # fits the card by the table; not the 256 MiB this test allows
        with (
            pytest.raises(MemoryFault, match="out of memory"),
            admission.running(MODEL, shape),
            manager.pipeline(MODEL) as pipe,
        ):
            pipe(prompt="a cat", width=2048, height=2048, num_inference_steps=1, output_type="pil")
        assert admission.ceiling(MODEL) == 2048 * 2048 * 3 // 4
        assert torch.cuda.memory_allocated(device.device) <= before + (16 << 20)  # the job's tensors are gone
        with manager.pipeline(MODEL) as pipe:  # the next job runs
            pipe(prompt="a cat", width=64, height=64, num_inference_steps=1, output_type="pil")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device.device)
        torch.cuda.empty_cache()
