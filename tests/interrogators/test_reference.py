"""The shipped reference of transformers-format interrogation models, and the tiny models' records."""

from __future__ import annotations

import hashlib
from pathlib import Path

from interrogators import aesthetic, deepdanbooru
from interrogators.reference import (
    AESTHETIC,
    CAPTION_BASE,
    CAPTION_LARGE,
    CLIP_L14,
    DEEPDANBOORU,
    SAFETY_CHECKER,
    model_dir,
    reference_records,
    reference_sha256,
)
from interrogators.tiny import build_tiny_interrogators
from models.records import parse_reference


def test_shipped_reference_parses_and_names_every_file_with_a_download() -> None:
    raw = reference_records()
    assert set(raw) == {CAPTION_LARGE, CAPTION_BASE, CLIP_L14, SAFETY_CHECKER, DEEPDANBOORU, AESTHETIC}
    records = parse_reference(raw, category="blip", source="interrogators/reference.json")
    assert set(records) == set(raw)
    for name, record in records.items():
        if name in (DEEPDANBOORU, AESTHETIC):
            continue  # single files, below
        files = {f.path for f in record.files}
        downloads = {d.relative_path: d for d in record.downloads}
        assert files == set(downloads), name
        # Files sit in a per-model folder below the category folder, where build_interrogators looks.
        assert all(path.startswith(f"{name}/") for path in files)
        assert model_dir(Path("/cache"), record.category, name) == Path("/cache", record.category, name)
        assert {f"{name}/config.json"} <= files
        assert files & {f"{name}/model.safetensors", f"{name}/pytorch_model.bin"}
        repo = raw[name]["hf_path"]
        revision = raw[name].get("hf_revision", "main")  # pinned: a commit of the repository
        assert all(
            d.file_url == f"https://huggingface.co/{repo}/resolve/{revision}/{d.file_name}"
            for d in downloads.values()
        )
    assert records[CLIP_L14].category == "clip" and records[SAFETY_CHECKER].category == "safety_checker"
    # The safety checker is the very file the horde lists: its hash is known.
    assert records[SAFETY_CHECKER].files[-1].sha256sum == (
        "64b8393f1afd5a0c1ed2aa5f341fa7c08286839a48f3743162a76a2835c808bd"
    )


def test_safety_pass_weights_carry_their_published_sha256() -> None:
    records = parse_reference(reference_records(), category="blip", source="interrogators/reference.json")
    for name, module in ((DEEPDANBOORU, deepdanbooru), (AESTHETIC, aesthetic)):
        record = records[name]
        [spec], [download] = record.files, record.downloads
        assert spec.path == f"{name}/{module.FILE_NAME}" == download.relative_path
        assert spec.sha256sum == module.SHA256 == reference_sha256(name)
        assert download.file_url.startswith("https://github.com/")
        assert model_dir(Path("/cache"), record.category, name) / module.FILE_NAME == Path(
            "/cache", record.category, spec.path
        )
    assert records[AESTHETIC].size_on_disk_bytes == aesthetic.SIZE_BYTES == 3_714_759


def test_tiny_records_match_their_files_and_builds_are_idempotent(models_dir: Path) -> None:
    records = build_tiny_interrogators(models_dir)  # already built by the session fixture: reused
    for record in records.values():
        category_dir = models_dir / record["category"]
        for spec in record["config"]["files"]:
            assert hashlib.sha256((category_dir / spec["path"]).read_bytes()).hexdigest() == spec["sha256sum"]
        assert {d["file_url"] for d in record["config"]["download"]} == {
            (category_dir / f["path"]).resolve().as_uri() for f in record["config"]["files"]
        }
    weights = model_dir(models_dir, "clip", "tiny-clip") / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_interrogators(models_dir) == records
    assert weights.stat().st_mtime_ns == stamp
