"""One reference record: tolerant parsing, the record's shape, the category a local file contributes to."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models.records import ModelRecord, category_for_file, parse_reference


def test_category_from_local_file_name() -> None:
    assert category_for_file(Path("x/diffusers-2023.json")) == "diffusers"
    assert category_for_file(Path("safety_checker.json")) == "safety_checker"
    assert category_for_file(Path("tiny/reference.json")) == "stable_diffusion"


def test_tolerant_parsing_keeps_good_entries(caplog: pytest.LogCaptureFixture) -> None:
    data = {
        "odd": {
            "name": "odd",
            "version": 1.5,
            "nsfw": None,
            "inpainting": None,
            "tags": None,
            "trigger": "wow",
            "requirements": None,
            "size_on_disk_bytes": "12",
            "new_key": {"x": 1},
            "config": {"files": [{"path": "a.ckpt", "sha256sum": ""}, {"sha256sum": "ff"}], "download": None},
        },
        "not-an-object": [1, 2],
        "lenient": {"name": "lenient", "features_not_supported": 7},
        "bad": {"name": "bad", "config": {"files": [{"path": ["a", "list"]}]}},
    }
    with caplog.at_level(logging.WARNING):
        records = parse_reference(data, category="stable_diffusion", source="test.json")
    odd = records["odd"]
    assert (odd.version, odd.nsfw, odd.tags, odd.trigger, odd.size_on_disk_bytes) == (
        "1.5",
        False,
        [],
        ["wow"],
        12,
    )
    assert [f.path for f in odd.files] == ["a.ckpt"] and odd.files[0].sha256sum is None
    assert odd.extra == {"new_key": {"x": 1}} and odd.downloads == []
    assert records["lenient"].features_not_supported == []
    assert set(records) == {"odd", "lenient"}
    assert sum("ignored" in r.message for r in caplog.records) == 2


def test_record_is_the_interface_shape() -> None:
    record = ModelRecord(name="m")
    assert (record.files, record.downloads, record.hf_path, record.requirements) == ([], [], None, {})
    assert record.features_not_supported == [] and record.inpainting is False
