"""Each annotator on a picture: what the map looks like, its weights loaded from their real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ANNOTATOR_REFERENCE
from controlnet.annotators import ANNOTATORS, AnnotatorLoadError, annotate, detect_resolution
from controlnet.types import BY_NAME, CONTROL_TYPES
from models.cache import object_bytes
from tests.controlnet.conftest import ControlStack


def test_canny_draws_the_squares_edges_at_the_peers_thresholds(picture: Image.Image) -> None:
    edges = np.asarray(annotate(ANNOTATORS["canny"], None, picture))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}
    rows = np.nonzero(edges[:, :, 0].max(axis=1))[0]
    assert rows.min() in (15, 16) and rows.max() in (39, 40)  # the square spans rows 16-39
    assert not edges[26, 28].any()  # nothing inside the flat square


def test_scribble_marks_dark_strokes_white_on_black(picture: Image.Image) -> None:
    scribble = np.asarray(annotate(ANNOTATORS["scribble"], None, picture))
    assert scribble[28, 28].tolist() == [255, 255, 255]  # inside the dark square
    assert scribble[60, 5].tolist() == [0, 0, 0]  # the light bottom of the gradient
    assert scribble[5, 5].tolist() == [255, 255, 255]  # its dark top


@pytest.mark.parametrize("kind", [k.name for k in CONTROL_TYPES])
def test_every_type_makes_a_map_of_the_image(stack: ControlStack, picture: Image.Image, kind: str) -> None:
    control_map = stack.controlnets.annotate(BY_NAME[kind], picture)
    assert control_map.size == picture.size and control_map.mode == "RGB"
    again = stack.controlnets.annotate(BY_NAME[kind], picture)
    assert again.tobytes() == control_map.tobytes()  # deterministic


def test_maps_come_back_at_the_images_own_size(stack: ControlStack, picture: Image.Image) -> None:
    wide = picture.resize((192, 64))
    for kind in ("canny", "hed", "hough"):
        assert stack.controlnets.annotate(BY_NAME[kind], wide).size == (192, 64)


def test_annotators_live_in_the_cache_at_their_real_sizes(stack: ControlStack, picture: Image.Image) -> None:
    stack.controlnets.annotate(BY_NAME["depth"], picture)
    stack.controlnets.annotate(BY_NAME["fakescribbles"], picture)
    resident = stack.cache.resident()
    assert "annotator:annotator_leres" in resident and "annotator:annotator_hed" in resident
    with stack.cache.use("annotator:annotator_leres", lambda: None) as leres:
        params = sum(p.numel() for p in leres.net.parameters())
        assert params > 100_000_000  # LeReS' ResNeXt-101 at its real shape
        # float32 at full size (and its batch-norm statistics): what the budgets count.
        assert params * 4 <= object_bytes(leres) < params * 4 * 1.01
    with stack.cache.use("annotator:annotator_hed", lambda: None) as hed:
        assert {p.dtype for p in hed.net.parameters()} == {torch.float32}  # the fp16 file, run in fp32


def test_seg_paints_ade20k_palette_colours(stack: ControlStack, picture: Image.Image) -> None:
    from controlnet_aux.util import ade_palette

    seg = np.asarray(stack.controlnets.annotate(BY_NAME["seg"], picture.resize((64, 64))))
    colours = {tuple(c) for c in seg.reshape(-1, 3)}
    # Bilinear resizing may blend neighbours at class borders; the map itself is palette colours.
    assert colours & {tuple(c) for c in ade_palette()}


def test_detect_resolution_follows_the_peers() -> None:
    assert detect_resolution(512, 512) == 512 and detect_resolution(1024, 768) == 512
    assert detect_resolution(64, 128) == 64


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ControlNetHED.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(AnnotatorLoadError, match="ControlNetHED.pth"):
        ANNOTATORS["hed"].load([bad])
    (tmp_path / "res101.pth").write_bytes(b"garbage")
    with pytest.raises(AnnotatorLoadError, match="not a readable"):
        ANNOTATORS["leres"].load([tmp_path / "res101.pth"])


def test_the_annotator_reference_pins_every_weight() -> None:
    records = json.loads(ANNOTATOR_REFERENCE.read_text(encoding="utf-8"))
    used = {a.record for a in ANNOTATORS.values() if a.record}
    assert set(records) == used
    for name, record in records.items():
        assert record["category"] == "controlnet"
        downloads = {d["file_name"]: d["file_url"] for d in record["config"]["download"]}
        for spec in record["config"]["files"]:
            assert Path(spec["path"]).name in downloads
            url = downloads[Path(spec["path"]).name]
            assert url.startswith("https://huggingface.co/")
            if "lllyasviel/Annotators" in url:  # hashes published by the peers' catalog
                assert len(spec["sha256sum"]) == 64 and "/resolve/982e7ed" in url, name
