"""build_request: the pure payload -> request step, and every substitution it reports."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.api_models import GenerationPayload
from bridge.generation.request import (
    GenerationRequest,
    RequestFault,
    SourceKind,
    WorkerLimits,
    build_request,
)
from bridge.generation.substitutions import MAX_REF_CHARS, Substitution, cap_metadata
from models.records import ModelRecord

SD1 = ModelRecord(name="sd1", baseline="stable diffusion 1")
SDXL = ModelRecord(name="xl", baseline="stable_diffusion_xl")
INPAINT = ModelRecord(name="paint", baseline="stable diffusion 1", inpainting=True)
DEPTH = ModelRecord(name="depth", baseline="stable diffusion 2", style="depth2img")
LIMITS = WorkerLimits(max_pixels=1024 * 1024)
TXT2IMG = SourceKind()


def build(
    record: ModelRecord = SD1,
    source: SourceKind = TXT2IMG,
    limits: WorkerLimits = LIMITS,
    **payload: Any,
) -> tuple[GenerationRequest, list[Substitution]]:
    fields = {"prompt": "a cat", "seed": "42", "width": 64, "height": 64, "ddim_steps": 2, **payload}
    return build_request(GenerationPayload.model_validate(fields), record, source, limits)


def fields_of(subs: list[Substitution]) -> list[str]:
    return [s.field for s in subs]


def test_plain_txt2img_honours_every_field() -> None:
    request, subs = build(
        prompt="a cat ### ugly ### blurry", cfg_scale=6.5, clip_skip=2, sampler_name="k_euler"
    )
    assert subs == []
    assert (request.mode, request.mask, request.prompt) == ("txt2img", "none", "a cat")
    assert request.negative_prompt == "ugly ### blurry"  # split on the first ### only
    assert (request.width, request.height, request.steps, request.cfg_scale) == (64, 64, 2, 6.5)
    assert (request.seed, request.clip_skip, request.sampler.name) == (42, 2, "k_euler")


def test_size_rounded_up_to_64_and_reported() -> None:
    request, subs = build(width=100, height=64)
    assert (request.width, request.height) == (128, 64)
    assert subs[0].field == "size" and subs[0].used == "128x64"


def test_size_over_max_pixels_faults() -> None:
    with pytest.raises(RequestFault, match="max_pixels"):
        build(width=1024, height=1088)


def test_rounding_that_crosses_max_pixels_faults() -> None:
    with pytest.raises(RequestFault, match="max_pixels"):
        build(limits=WorkerLimits(max_pixels=64 * 64), width=65, height=64)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"ddim_steps": 0}, "at least 1"),
        ({"ddim_steps": -3}, "at least 1"),
        ({"ddim_steps": 100000}, "over the limit"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"width": 0}, "size"),
        ({"height": 100000}, "size"),
        ({"control_type": "canny"}, "ControlNet"),
        ({"workflow": "qr_code"}, "workflow"),
    ],
)
def test_absurd_values_fault_with_a_reason(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(RequestFault, match=reason):
        build(**payload)


def test_limit_max_steps_uses_the_middle_of_the_models_range() -> None:
    limited = WorkerLimits(max_pixels=1024 * 1024, limit_max_steps=True)
    assert build(limits=limited, ddim_steps=30)[0].steps == 30
    with pytest.raises(RequestFault, match="cap of 30"):
        build(limits=limited, ddim_steps=31)
    ranged = SD1.model_copy(update={"requirements": {"min_steps": 4, "max_steps": 8}})
    with pytest.raises(RequestFault, match="cap of 6"):
        build(record=ranged, limits=limited, ddim_steps=7)


def test_missing_seed_is_drawn_and_reported() -> None:
    request, subs = build(seed=None)
    assert 0 <= request.seed < 2**32
    assert subs[0].field == "seed" and subs[0].used == request.seed


def test_batch_seed_rule_is_seed_plus_index_mod_2_32() -> None:
    request, _ = build(seed=str(2**32 - 1), n_iter=3)
    assert [request.seed_for(i) for i in range(3)] == [2**32 - 1, 0, 1]


def test_n_iter_follows_the_popped_ids() -> None:
    payload = GenerationPayload.model_validate(
        {"prompt": "x", "seed": "1", "width": 64, "height": 64, "n_iter": 3}
    )
    request, subs = build_request(payload, SD1, SourceKind(), LIMITS, n_images=2)
    assert request.n_images == 2 and subs[0].field == "n_iter"


@pytest.mark.parametrize(
    ("record", "source", "mode", "mask", "reported"),
    [
        (SD1, SourceKind("img2img"), "img2img", "none", []),
        (SD1, SourceKind("img2img", "alpha"), "inpaint", "given", []),
        (SD1, SourceKind("inpainting", "mask"), "inpaint", "given", ["source_processing"]),
        (SD1, SourceKind("outpainting", "alpha"), "inpaint", "given", ["source_processing"]),
        (SD1, SourceKind("inpainting"), "img2img", "none", ["source_processing"]),
        (SD1, SourceKind("remix"), "img2img", "none", ["source_processing"]),
        (INPAINT, SourceKind("inpainting", "mask"), "inpaint", "given", []),
        (INPAINT, SourceKind("outpainting", "alpha"), "inpaint", "given", []),
        (INPAINT, SourceKind("inpainting"), "inpaint", "full", ["source_mask"]),
        (INPAINT, SourceKind("img2img"), "inpaint", "full", []),
        (INPAINT, SourceKind(), "inpaint", "full", ["source_processing"]),
        (DEPTH, SourceKind("img2img"), "depth2img", "none", []),
        (DEPTH, SourceKind("img2img", "mask"), "depth2img", "none", ["source_mask"]),
        (DEPTH, SourceKind("inpainting", "alpha"), "depth2img", "none", ["source_processing", "source_mask"]),
    ],
)
def test_mode_from_source_and_model(
    record: ModelRecord, source: SourceKind, mode: str, mask: str, reported: list[str]
) -> None:
    request, subs = build(record=record, source=source)
    assert (request.mode, request.mask) == (mode, mask)
    assert fields_of(subs) == reported


def test_depth_model_without_source_faults() -> None:
    with pytest.raises(RequestFault, match="depth2img model"):
        build(record=DEPTH)


def test_denoising_strength_defaults_and_clamp() -> None:
    assert build(source=SourceKind("img2img"))[0].denoising_strength == 0.75
    assert build(record=INPAINT, source=SourceKind("inpainting", "mask"))[0].denoising_strength == 1.0
    assert build(source=SourceKind("img2img"), denoising_strength=0.3)[0].denoising_strength == 0.3
    request, subs = build(source=SourceKind("img2img"), denoising_strength=1.5)
    assert request.denoising_strength == 1.0 and fields_of(subs) == ["denoising_strength"]
    # txt2img has nothing to denoise from: a sent strength is simply not used.
    assert build(denoising_strength=0.2)[0].denoising_strength == 1.0


def test_hires_fix_first_pass_keeps_the_smaller_side_native() -> None:
    request, subs = build(hires_fix=True, width=768, height=1024, hires_fix_denoising_strength=0.5)
    assert subs == []
    assert request.hires_fix and request.first_pass == (512, 640)
    assert request.hires_denoising_strength == 0.5
    assert build(hires_fix=True, width=576, height=640)[0].first_pass == (512, 512)
    assert build(hires_fix=True, width=576, height=640)[0].hires_denoising_strength == 0.65


@pytest.mark.parametrize(
    ("record", "source", "payload", "why"),
    [
        (SD1, SourceKind(), {"width": 512, "height": 1024}, "native"),
        (SDXL, SourceKind(), {"width": 1024, "height": 1024}, "native 1024"),
        (SD1, SourceKind("img2img"), {"width": 640, "height": 640}, "txt2img only"),
        (SD1.model_copy(update={"features_not_supported": ["hires_fix"]}), SourceKind(),
         {"width": 640, "height": 640}, "does not support"),
    ],
)  # fmt: skip
def test_hires_fix_turned_off_and_reported(
    record: ModelRecord, source: SourceKind, payload: dict[str, Any], why: str
) -> None:
    request, subs = build(record=record, source=source, hires_fix=True, **payload)
    assert not request.hires_fix and request.first_pass is None
    hires = [s for s in subs if s.field == "hires_fix"]
    assert len(hires) == 1 and why in hires[0].why


def test_unsupported_extras_are_reported_with_their_metadata_type() -> None:
    _, subs = build(
        prompt="a (cat:1.3)",
        loras=[{"name": "247778", "model": 1.0}],
        tis=[{"name": 7808, "inject_ti": "negprompt"}],
        transparent=True,
    )
    meta = [s.to_metadata() for s in subs]
    assert {"type": "lora", "value": "see_ref", "ref": meta[0]["ref"]} == meta[0] and "247778" in meta[0][
        "ref"
    ]
    assert meta[1]["type"] == "ti" and "7808" in meta[1]["ref"]
    assert [m["type"] for m in meta[2:]] == ["information", "information"]
    assert "transparent" in meta[2]["ref"] and "weights" in meta[3]["ref"]


def test_substitution_refs_fit_the_horde_limit() -> None:
    sub = Substitution("prompt", "x" * 1000, "y" * 1000, "z" * 1000)
    assert len(sub.to_metadata()["ref"]) == MAX_REF_CHARS


def test_metadata_capped_at_50_with_a_note() -> None:
    entries = [{"type": "information", "value": "see_ref", "ref": str(i)} for i in range(80)]
    capped = cap_metadata(entries + entries[:5])
    assert len(capped) == 50
    assert capped[-1]["ref"] == "31 more gen_metadata entries left out"


def test_limits_from_config_use_the_legacy_max_power_rule() -> None:
    from bridge.config import BridgeConfig

    assert WorkerLimits.from_config(BridgeConfig(max_power=8)).max_pixels == 512 * 512
    assert WorkerLimits.from_config(BridgeConfig(max_power=32, limit_max_steps=True)).limit_max_steps
