"""Which types are ready, what the pop says, and how ControlNets share the model cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from controlnet import ControlNets, ControlNotReadyError, can_control
from controlnet.types import BY_NAME, CONTROL_TYPE_NAMES
from tests.controlnet.conftest import SD1, SD2, ControlStack, make_stack


def test_every_type_is_ready_on_sd1_and_the_servable_ones_on_sd2(stack: ControlStack) -> None:
    sd1, sd2 = stack.models.record(SD1).baseline, stack.models.record(SD2).baseline
    assert all(stack.controlnets.is_ready(BY_NAME[k], sd1) for k in CONTROL_TYPE_NAMES)
    assert not stack.controlnets.is_ready(BY_NAME["seg"], sd2)
    assert "no seg ControlNet" in stack.controlnets.missing(BY_NAME["seg"], sd2)[0]
    records = [stack.models.record(name) for name in stack.models.ready_models()]
    assert stack.controlnets.serves(records)
    report = stack.controlnets.report(records)
    assert report[0].startswith("stable diffusion 1: ready: canny, hed, depth, normal")
    assert any(line.startswith("stable diffusion 2: seg not ready") for line in report)


def test_inpainting_depth2img_and_sdxl_models_take_no_controlnet(stack: ControlStack) -> None:
    assert can_control(stack.models.record(SD1)) and can_control(stack.models.record(SD2))
    assert not can_control(stack.models.record("tiny-inpainting"))
    assert not can_control(stack.models.record("tiny-sd2-depth"))
    assert not stack.controlnets.serves([stack.models.record("tiny-inpainting")])


def test_a_missing_or_corrupt_file_makes_the_pop_honest(
    tiny_models_json: Path, tiny_controlnets: dict[str, Path], tmp_path: Path
) -> None:
    # A copy of the tiny ControlNet folder, so that breaking it leaves the session's intact.
    copy = tmp_path / "cn"
    shutil.copytree(tiny_controlnets["controlnet"].parent, copy)
    files = {name: copy / path.name for name, path in tiny_controlnets.items()}
    built = make_stack(tiny_models_json, files, tmp_path / "stack")
    records = [built.models.record(SD1)]
    assert built.controlnets.serves(records)
    (copy / "annotators" / "res101.pth").unlink()
    assert not built.controlnets.serves(records)
    assert built.controlnets.missing(BY_NAME["depth"], records[0].baseline) == ["annotator annotator_leres"]
    with open(copy / "control_seg_fp16.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    (copy / "control_seg_fp16.safetensors.sha256").unlink(missing_ok=True)
    assert built.controlnets.missing(BY_NAME["seg"], records[0].baseline) == ["ControlNet control_seg"]
    with pytest.raises(ControlNotReadyError, match="annotator_leres"):
        built.controlnets.annotate(BY_NAME["depth"], Image.new("RGB", (64, 64)))


def test_diff_controlnets_are_cached_per_base_model_and_shared_files_once(stack: ControlStack) -> None:
    sd1 = stack.models.record(SD1).baseline
    for kind in ("canny", "scribble", "fakescribbles"):
        with stack.models.pipeline(SD1) as pipe, \
                stack.controlnets.controlnet(BY_NAME[kind], SD1, sd1, pipe.unet) as net:
            assert net.config.block_out_channels == pipe.unet.config.block_out_channels
    resident = stack.cache.resident()
    assert f"controlnet:diff_control_sd15_canny_fp16.safetensors@{SD1}" in resident
    assert "controlnet:control_scribble_fp16.safetensors" in resident  # scribble and fakescribbles: one
    assert not any(key.startswith("controlnet:control_fakescribbles") for key in resident)


def test_wanted_records_are_what_the_served_baselines_need(stack: ControlStack) -> None:
    names = {r.name for r in stack.controlnets.wanted_records([stack.models.record(SD2).baseline])}
    assert names == {"control_canny_sd2", "control_hed_sd2", "control_depth_sd2", "control_openpose_sd2",
                     "control_scribble_sd2", "control_fakescribbles_sd2", "annotator_hed", "annotator_leres",
                     "annotator_openpose"}
    assert stack.controlnets.wanted_records(["stable_diffusion_xl"]) == []
    assert isinstance(stack.controlnets, ControlNets)
