"""The machine behind the device policy: this computer read live, or an injected one for tests and benches."""

import pytest
import torch

from models.device import DevicePolicy
from models.machine import GIB, HostMemory, InjectedMachine, MemoryReading, process_rss


def test_this_computer_is_read_live():
    policy = DevicePolicy.cpu()
    assert policy.machine == HostMemory(cuda_index=None)
    ram = policy.machine.ram()
    assert 0 < ram.available <= ram.total
    assert policy.ram_bytes() == (pytest.approx(ram.available, rel=0.2), ram.total)
    assert policy.machine.vram() == MemoryReading(0, 0) and not policy.has_vram
    assert policy.execution_tier == "ram" and policy.machine.name() == "cpu"


def test_an_injected_card_is_the_execution_device_of_a_cpu_policy():
    machine = InjectedMachine.gib(16, 8, ram_others=4, vram_others=0.5)
    policy = DevicePolicy.cpu(memory=machine)
    assert policy.has_vram and policy.execution_tier == "vram" and not policy.is_cuda
    assert policy.vram_bytes() == (int(7.5 * GIB), 8 * GIB)
    assert policy.ram_bytes() == (12 * GIB, 16 * GIB)
    assert "16 GiB RAM + 8 GiB card" in machine.name()


def test_the_ledger_refuses_more_than_the_machine_has_as_a_device_would():
    machine = InjectedMachine(ram_total=100, vram_total=50, ram_others=10, vram_others=10)
    machine.account("vram", 40)
    assert machine.vram() == MemoryReading(50, 0)
    with pytest.raises(torch.OutOfMemoryError):
        machine.account("vram", 1)
    machine.account("vram", -40)
    with pytest.raises(MemoryError):
        machine.account("ram", 91)
    machine.account("ram", 90)
    assert machine.ram() == MemoryReading(100, 0) and machine.held("ram") == 90


def test_rss_mode_counts_this_process():
    machine = InjectedMachine.gib(64, ram_others=4, ram_from_rss=True)
    machine.account("ram", 10 * GIB)  # ignored: the resident set is the truth here
    used = 60 * GIB - machine.ram().available
    assert used == pytest.approx(process_rss(), rel=0.2) and used > 0
