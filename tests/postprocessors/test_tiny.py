from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from postprocessors import ORDER
from postprocessors.loading import load_spandrel
from postprocessors.tiny import build_tiny_postprocessors


def test_records_have_the_horde_shape_and_real_sha256(weights_dir: Path) -> None:
    references = build_tiny_postprocessors(weights_dir)
    assert set(references) == {"esrgan", "gfpgan", "codeformer", "rembg"}
    names = [name for records in references.values() for name in records]
    assert sorted(names) == sorted(ORDER)
    for category, records in references.items():
        for name, record in records.items():
            assert record["name"] == name and record["category"] == category
            files, downloads = record["config"]["files"], record["config"]["download"]
            assert [f["path"] for f in files] == [d["file_name"] for d in downloads]
            for spec in files:
                path = weights_dir / category / spec["path"]
                assert hashlib.sha256(path.read_bytes()).hexdigest() == spec["sha256sum"]
    gfpgan_files = [f["path"] for f in references["gfpgan"]["GFPGAN"]["config"]["files"]]
    assert gfpgan_files == ["GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"]


def test_building_again_rewrites_nothing(weights_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in weights_dir.rglob("*.pth")}
    build_tiny_postprocessors(weights_dir)
    assert {p: p.stat().st_mtime_ns for p in weights_dir.rglob("*.pth")} == before


def test_face_detector_weights_are_all_zero(weights_dir: Path) -> None:
    state = torch.load(weights_dir / "gfpgan" / "detection_Resnet50_Final.pth", weights_only=True)
    assert state and all(not t.any() for t in state.values())


@pytest.mark.parametrize(
    ("file_name", "scale", "tags"),
    [
        ("RealESRGAN_x4plus.pth", 4, ["16nf", "1nb"]),
        ("RealESRGAN_x2plus.pth", 2, ["16nf", "1nb", "unshuffle"]),
        ("RealESRGAN_x4plus_anime_6B.pth", 4, ["16nf", "2nb"]),
        ("NMKD_Siax.pth", 4, ["16nf", "1nb"]),
        ("4x_AnimeSharp.pth", 4, ["16nf", "2nb"]),
    ],
)
def test_spandrel_detects_the_esrgan_files(
    weights_dir: Path, file_name: str, scale: int, tags: list[str]
) -> None:
    model = load_spandrel(weights_dir / "esrgan" / file_name, architecture="ESRGAN")
    assert model.scale == scale
    assert model.descriptor.tags == tags


def test_new_and_old_key_layouts_are_both_written(weights_dir: Path) -> None:
    new = torch.load(weights_dir / "esrgan" / "RealESRGAN_x4plus.pth", weights_only=True)
    old = torch.load(weights_dir / "esrgan" / "NMKD_Siax.pth", weights_only=True)
    assert {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_up2.weight", "conv_hr.weight"} <= set(
        new["params_ema"]
    )
    assert {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= set(old)


@pytest.mark.parametrize("category", ["esrgan", "gfpgan", "codeformer"])
def test_records_are_ready_where_the_model_manager_looks(weights_dir: Path, category: str) -> None:
    """The records parse as horde reference entries, and the downloader's folder for them is the registry's
    (<weights_dir>/<category>/), with every file present and verified."""
    from models.downloads import is_ready, model_dir
    from models.records import parse_reference

    records = parse_reference(build_tiny_postprocessors(weights_dir)[category], category=category)
    assert records
    for record in records.values():
        assert model_dir(weights_dir, record) == weights_dir / category
        assert is_ready(record, weights_dir / category)


def test_a_build_can_be_limited_to_categories(tmp_path: Path) -> None:
    references = build_tiny_postprocessors(tmp_path, categories=["esrgan"])
    assert list(references) == ["esrgan"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["esrgan"]
    with pytest.raises(ValueError, match="unknown categories"):
        build_tiny_postprocessors(tmp_path, categories=["facexlib"])
