"""The one list of control types, tied to the horde's own copies (the local horde, the model reference)."""

from __future__ import annotations

import json

from controlnet.annotators import ANNOTATORS
from controlnet.types import CONTROL_TYPE_NAMES, CONTROL_TYPES, REFUSED_ON_SD2, SD1, SD2, servable_types
from local_horde.schema import CONTROL_TYPES as HORDE_CONTROL_TYPES
from models.reference import SNAPSHOT_DIR


def test_the_worker_knows_exactly_the_horde_control_types() -> None:
    assert CONTROL_TYPE_NAMES == HORDE_CONTROL_TYPES


def test_every_controlnet_name_is_a_record_of_the_horde_reference() -> None:
    horde = json.loads((SNAPSHOT_DIR / "controlnet.json").read_text(encoding="utf-8"))
    named = {name for kind in CONTROL_TYPES for name in kind.controlnets.values()}
    assert named <= set(horde)
    # Every SD1/SD2 record of the horde that serves one of the nine types is used (mlsd is hough's twin,
    # qr is the SDXL QR-code workflow's).
    sd_records = {n for n in horde if not n.startswith(("control_qr", "control_mlsd"))}
    assert sd_records == named


def test_every_type_has_an_annotator_and_sd1_serves_all_nine() -> None:
    assert all(kind.annotator in ANNOTATORS for kind in CONTROL_TYPES)
    assert [k.name for k in servable_types(SD1)] == list(CONTROL_TYPE_NAMES)
    sd2 = {k.name for k in servable_types(SD2)}
    assert sd2 == {"canny", "hed", "depth", "openpose", "scribble", "fakescribbles"}
    assert not sd2 & set(REFUSED_ON_SD2)
    assert servable_types("stable_diffusion_xl") == []
