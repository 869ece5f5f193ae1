"""The horde's names are defined once (bridge/horde_names.py): each copy that must exist is tied to it."""

from __future__ import annotations

import re
from pathlib import Path

from bridge import config, horde_names
from interrogators import INTERROGATOR_FORMS
from local_horde import capabilities, rules, schema
from postprocessors import ORDER
from postprocessors.facefix import FACE_FIXERS
from postprocessors.registry import STAGES
from postprocessors.upscalers import UPSCALERS

REPO = Path(__file__).resolve().parents[2]


def test_the_worker_derives_its_lists() -> None:
    assert config.KNOWN_FORMS is horde_names.FORMS
    assert config.RECOGNISED_BRIDGE_NAMES is horde_names.BRIDGE_NAMES
    assert INTERROGATOR_FORMS == horde_names.INTERROGATOR_FORMS
    assert len(set(horde_names.FORMS)) == len(horde_names.FORMS)
    kinds = (*horde_names.UPSCALERS, *horde_names.FACE_FIXERS, *horde_names.BACKGROUND_REMOVERS)
    assert sorted(kinds) == sorted(horde_names.POST_PROCESSORS)


def test_the_post_processor_classes_carry_the_horde_names() -> None:
    """postprocessors/ does not import bridge/: its classes name themselves, and must match."""
    assert {cls.name: cls.scale for cls in UPSCALERS} == horde_names.UPSCALER_SCALES
    assert {cls.name for cls in FACE_FIXERS} == set(horde_names.FACE_FIXERS)
    assert STAGES[2] == horde_names.BACKGROUND_REMOVERS
    assert sorted(ORDER) == sorted(horde_names.POST_PROCESSORS)


def test_the_local_horde_copy_is_the_servers_list() -> None:
    """The stand-in server keeps its own copy (it must refuse what the real server refuses, whatever the
    worker believes); it is the same list."""
    assert schema.POST_PROCESSORS == horde_names.POST_PROCESSORS
    assert horde_names.POST_PROCESSORS[8:] == schema.POST_PROCESSORS_V13
    assert schema.ALCHEMY_FORMS == horde_names.FORMS
    assert schema.SOURCE_PROCESSING == horde_names.SOURCE_PROCESSING
    assert set(schema.NON_UPSCALERS) == {*horde_names.FACE_FIXERS, *horde_names.BACKGROUND_REMOVERS}
    assert rules.UPSCALERS == horde_names.UPSCALERS
    assert set(capabilities.BRIDGE_CAPABILITIES) == set(horde_names.BRIDGE_NAMES)


def test_the_config_file_lists_every_form() -> None:
    comment = re.search(r"# Alchemy forms served:(.*?)\nforms:", (REPO / "bridgeData.yaml").read_text(), re.S)
    assert comment is not None
    listed = {word.rstrip(".") for word in re.findall(r"[A-Za-z0-9_.]+", comment.group(1))}
    assert set(horde_names.FORMS) <= listed
