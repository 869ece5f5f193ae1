"""The working-memory table: estimates by family, size, batch, hires fix, dtype; measured once per device."""

import json

import numpy as np
import pytest
import torch

from models.device import DevicePolicy
from models.machine import InjectedMachine
from models.working_memory import (
    GIB,
    MIB,
    JobShape,
    PeakMeter,
    WorkingMemoryTable,
    family_of,
    folder_weight_bytes,
)


def card_policy(dtype=torch.float32) -> DevicePolicy:
    machine = InjectedMachine.gib(16, 8)
    return DevicePolicy(device=torch.device("cpu"), dtype=dtype, pin_memory=False, memory=machine)


def test_estimates_grow_with_size_batch_and_hires_and_halve_in_float16():
    table = WorkingMemoryTable(card_policy())
    small, large = JobShape("sd", 512, 512), JobShape("sd", 1024, 1024)
    assert table.job_bytes(large) > 3 * table.job_bytes(small)
    assert table.job_bytes(JobShape("sd", 512, 512, batch=4)) > table.job_bytes(small)
    assert table.job_bytes(JobShape("sd", 512, 512, hires_fix=True)) > table.job_bytes(small)
    assert table.job_bytes(JobShape("sdxl", 1024, 1024)) > table.job_bytes(large)
    # The SD1.5 VAE decode measured on a CPU in float32 at 512²: 0.94 GiB. The estimate covers it.
    assert 0.94 * GIB < table.diffusion_bytes("sd", 512 * 512) < 2 * GIB
    half = WorkingMemoryTable(card_policy(torch.float16))
    full = table.diffusion_bytes("sd", 512 * 512)
    assert half.diffusion_bytes("sd", 512 * 512) == pytest.approx(full / 2, abs=1)


def test_largest_pixels_is_the_largest_size_that_fits():
    table = WorkingMemoryTable(card_policy())
    room = 2 * GIB
    pixels = table.largest_pixels("sd", room)
    assert pixels % 4096 == 0
    assert table.job_bytes(JobShape("sd", pixels, 1)) <= room
    assert table.job_bytes(JobShape("sd", pixels + 4096, 1)) > room
    assert table.largest_pixels("sd", 100 * MIB) == 0


def test_first_measurement_replaces_the_default_later_ones_only_raise_it(tmp_path):
    path = tmp_path / "working-memory.json"
    table = WorkingMemoryTable(card_policy(), path)
    pixels = 512 * 512
    default = table.diffusion_bytes("sd", pixels)
    table.observe("sd", pixels, default // 4)  # this device needs far less than the default says
    measured = table.diffusion_bytes("sd", pixels)
    assert measured == pytest.approx(default // 4 * 1.2, rel=0.01)
    table.observe("sd", pixels, default // 8)  # a lighter job does not lower it again
    assert table.diffusion_bytes("sd", pixels) == measured
    table.observe("sd", pixels, default)  # a heavier one raises it
    assert table.diffusion_bytes("sd", pixels) == pytest.approx(default * 1.2, rel=0.01)
    # Kept beside the model cache, per device and dtype: a new table on the same device starts measured.
    again = WorkingMemoryTable(card_policy(), path)
    assert again.diffusion_bytes("sd", pixels) == table.diffusion_bytes("sd", pixels)
    assert again.coefficients("sd").measured and not again.coefficients("sdxl").measured
    assert list(json.loads(path.read_text())) == [table.key]
    other = WorkingMemoryTable(DevicePolicy.cpu(), path)
    assert other.diffusion_bytes("sd", pixels) == WorkingMemoryTable(DevicePolicy.cpu()).diffusion_bytes(
        "sd", pixels
    )


def test_unreadable_table_falls_back_to_the_defaults(tmp_path):
    path = tmp_path / "working-memory.json"
    path.write_text("{not json")
    table = WorkingMemoryTable(card_policy(), path)
    assert table.diffusion_bytes("sd", 4096) == WorkingMemoryTable(card_policy()).diffusion_bytes("sd", 4096)


def test_family_of_baselines():
    assert family_of("stable_diffusion_xl") == "sdxl"
    assert family_of("stable diffusion 1") == family_of("stable diffusion 2") == family_of(None) == "sd"


def test_peak_meter_sees_a_temporary_allocation_on_the_cpu():
    with PeakMeter(DevicePolicy.cpu()) as meter:
        block = np.ones(64 * MIB // 8)
        del block
    if not meter.ok:
        pytest.skip("no /proc peak RSS here")
    assert 48 * MIB < meter.used < 256 * MIB


def test_folder_weight_bytes_reads_the_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(256, 1024, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    assert folder_weight_bytes(tmp_path, torch.float32) == 1 * MIB
    assert folder_weight_bytes(tmp_path, torch.float16) == MIB // 2
