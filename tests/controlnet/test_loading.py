"""ControlNet files in the layouts people download -> diffusers ControlNets, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet.loading import (
    DIFF,
    DIFFUSERS,
    FULL,
    ControlNetLoadError,
    build_controlnet,
    estimated_bytes,
    file_format,
    read_keys,
)
from controlnet.tiny import controlnet_to_ldm, diff_file, random_controlnet, tiny_unet


@pytest.fixture(scope="module")
def nets() -> dict[str, object]:
    reference = tiny_unet(sd2=False, seed=1)
    return {
        "reference": reference,  # the UNet the diff was extracted against (SD1.5 for the real ones)
        "base": tiny_unet(sd2=False, seed=2),  # the job's model
        "controlnet": random_controlnet(reference, seed=3),
    }


def _save(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_full_file_in_the_original_layout_loads_exactly(nets: dict, tmp_path: Path) -> None:
    path = _save(tmp_path, "control_sd15_canny.safetensors", controlnet_to_ldm(nets["controlnet"]))
    keys = read_keys(path)
    assert "control_model.input_hint_block.0.weight" in keys and "control_model.zero_convs.0.0.weight" in keys
    assert "control_model.middle_block_out.0.weight" in keys and file_format(keys) == FULL
    loaded = build_controlnet(path, nets["base"], torch.float32)
    expected = nets["controlnet"].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_diff_file_becomes_the_controlnet_of_the_jobs_own_model(nets: dict, tmp_path: Path) -> None:
    state = diff_file(nets["controlnet"], nets["reference"])
    path = _save(tmp_path, "control_normal_fp16.safetensors", state)  # a full-looking name: keys decide
    assert "difference" in read_keys(path) and file_format(read_keys(path)) == DIFF
    loaded = build_controlnet(path, nets["base"], torch.float32).state_dict()
    controlnet, reference = nets["controlnet"].state_dict(), nets["reference"].state_dict()
    base = nets["base"].state_dict()
    shared = [k for k in controlnet if k in base]
    assert any(k.startswith("down_blocks.") for k in shared) and "conv_in.weight" in shared
    for key in controlnet:
        expected = controlnet[key] - reference[key] + base[key] if key in base else controlnet[key]
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=1e-6)
    # Against the UNet it was extracted from, the diff gives back the original ControlNet.
    again = build_controlnet(path, nets["reference"], torch.float32).state_dict()
    for key in controlnet:
        torch.testing.assert_close(again[key], controlnet[key], rtol=0, atol=1e-6)


def test_fp16_file_loads_in_the_device_dtype_and_sizes_are_known_up_front(nets: dict, tmp_path: Path) -> None:
    state = {k: v.half() for k, v in controlnet_to_ldm(nets["controlnet"]).items()}
    path = _save(tmp_path, "control_seg_fp16.safetensors", state)
    loaded = build_controlnet(path, nets["base"], torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    real = sum(p.numel() * 4 for p in loaded.parameters())
    assert estimated_bytes(path, torch.float32) == real
    assert estimated_bytes(path, torch.float16) == real // 2


def test_diffusers_layout_and_sd2_shapes(tmp_path: Path) -> None:
    sd2 = tiny_unet(sd2=True, seed=4)
    controlnet = random_controlnet(sd2, seed=5)
    path = _save(tmp_path, "diffusion_pytorch_model.safetensors", dict(controlnet.state_dict()))
    assert file_format(read_keys(path)) == DIFFUSERS
    loaded = build_controlnet(path, sd2, torch.float32)
    assert loaded.config.use_linear_projection and torch.equal(
        loaded.controlnet_mid_block.weight, controlnet.controlnet_mid_block.weight
    )


def test_a_controlnet_of_another_shape_or_a_broken_file_is_a_clear_error(
    nets: dict, tmp_path: Path
) -> None:
    sd2 = tiny_unet(sd2=True, seed=6)
    sd2_file = _save(tmp_path, "control_sd21.safetensors", controlnet_to_ldm(random_controlnet(sd2, seed=7)))
    with pytest.raises(ControlNetLoadError, match="does not fit"):
        build_controlnet(sd2_file, nets["base"], torch.float32)
    state = load_file(str(sd2_file))
    del state["control_model.zero_convs.0.0.weight"]
    broken = _save(tmp_path, "broken.safetensors", state)
    with pytest.raises(ControlNetLoadError, match="missing"):
        build_controlnet(broken, sd2, torch.float32)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ControlNetLoadError, match="not a readable"):
        build_controlnet(garbage, sd2, torch.float32)
    unet_only = {"model.diffusion_model.out.0.weight": torch.ones(2)}
    not_controlnet = _save(tmp_path, "unet.safetensors", unet_only)
    with pytest.raises(ControlNetLoadError, match="not a ControlNet"):
        build_controlnet(not_controlnet, sd2, torch.float32)
