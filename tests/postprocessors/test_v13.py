"""The eight post-processors of the horde's bridge v13: files in their real layouts (random weights), loaded
by spandrel, upscaling a tile / restoring a face through the same code as the others; their reference records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bridge import horde_names
from models.records import parse_reference
from postprocessors import PostProcessorRegistry
from postprocessors.loading import load_spandrel
from postprocessors.upscalers import UPSCALERS
from tests.postprocessors.helpers import face_landmarks, picture, tiny_registry

V13_UPSCALERS = {
    # horde name: (spandrel architecture, file name, tags the tiny file is detected with)
    "4xNomos8kSC": ("ESRGAN", "4xNomos8kSC.pth", ["16nf", "1nb"]),
    "4xLSDIRplus": ("ESRGAN", "4xLSDIRplus.pth", ["16nf", "1nb"]),
    "4xNomosWebPhoto_RealPLKSR": ("PLKSR", "4xNomosWebPhoto_RealPLKSR.pth", ["16dim", "2nb", "17ks", "Real"]),
    "4xNomos2_realplksr_dysample": ("PLKSR", "4xNomos2_realplksr_dysample.pth",
                                    ["16dim", "2nb", "17ks", "Real", "DySample"]),
    "4xNomos2_hq_dat2": ("DAT", "4xNomos2_hq_dat2.pth",
                         ["light", "s64|8x32", "64nf", "24dim", "2.0ef", "1conv"]),
    "2xModernSpanimationV1": ("SPAN", "2x_ModernSpanimationV1.pth", ["16nf"]),
}  # fmt: skip
REFERENCE = Path(__file__).resolve().parents[2] / "postprocessors" / "horde_v13.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiled(weights_dir: Path, cache) -> PostProcessorRegistry:
    """The real registry with 24 px tiles, so a 40x36 image is four tiles."""
    return tiny_registry(weights_dir, cache, tile=24)


@pytest.mark.parametrize("name", list(V13_UPSCALERS))
def test_each_new_upscaler_file_loads_in_its_layout(weights_dir: Path, name: str) -> None:
    architecture, file_name, tags = V13_UPSCALERS[name]
    path = weights_dir / "esrgan" / file_name
    stored = torch.load(path, weights_only=True)
    assert list(stored) == ["params"]  # neosr's wrapper
    keys = set(stored["params"])
    expected_key = {"ESRGAN": "body.0.rdb1.conv1.weight", "PLKSR": "feats.1.channel_mixer.0.weight",
                    "DAT": "before_RG.1.weight", "SPAN": "block_1.c1_r.sk.weight"}[architecture]  # fmt: skip
    assert expected_key in keys
    if name.endswith("dysample"):
        assert "to_img.init_pos" in keys
    model = load_spandrel(path, architecture=architecture)
    assert model.scale == horde_names.UPSCALER_SCALES[name] and model.descriptor.tags == tags


@pytest.mark.parametrize("name", list(V13_UPSCALERS))
def test_each_new_upscaler_upscales_tile_by_tile(tiled: PostProcessorRegistry, name: str) -> None:
    scale = horde_names.UPSCALER_SCALES[name]
    source = picture((40, 36)).convert("RGBA")
    source.putalpha(Image.linear_gradient("L").resize((40, 36)))
    processor = tiled.get(name)
    calls: list[tuple[int, ...]] = []
    with processor._cache.use(processor.cache_key, processor._load) as model:
        real = model.descriptor._call_fn

        def spy(module, tensor, _real=real):
            calls.append(tuple(tensor.shape[-2:]))
            return _real(module, tensor)

        model.descriptor._call_fn = spy
        try:
            result = tiled.apply(source, [name])
        finally:
            model.descriptor._call_fn = real
    assert result.image.size == (40 * scale, 36 * scale) and result.image.mode == "RGBA"
    assert len(calls) == 4  # one network call per tile (24 px tiles with 16 px of context)
    rgb = np.asarray(result.image.convert("RGB"), dtype=np.int16)
    assert rgb.std() > 0  # a network output, not a blank canvas
    # The alpha channel is resized alongside, not run through the network.
    alpha = np.asarray(result.image.getchannel("A"))
    assert alpha[-1, 0] > alpha[0, 0]


def test_restoreformer_restores_a_face_through_the_face_pipeline(registry: PostProcessorRegistry) -> None:
    image = picture((160, 160), seed=3)
    landmarks = face_landmarks(0.25, (16.0, 10.0))
    restorer = registry.get("RestoreFormer")
    result = restorer.restore_faces(image, [landmarks])
    before, after = np.asarray(image, dtype=np.int16), np.asarray(result.image, dtype=np.int16)
    face = (slice(int(landmarks[:, 1].min()), int(landmarks[:, 1].max())),
            slice(int(landmarks[:, 0].min()), int(landmarks[:, 0].max())))  # fmt: skip
    assert np.abs(after[face] - before[face]).mean() > 5  # the face was replaced by the network's output
    assert np.array_equal(after[-8:, -8:], before[-8:, -8:])  # far from the face: untouched
    # strength 0 is the input, exactly (RestoreFormer has no fidelity weight: strength blends).
    assert np.array_equal(np.asarray(restorer.restore_faces(image, [landmarks], strength=0.0).image), before)


def test_gfpgan_v13_is_a_gfpgan_network_of_its_own_file(weights_dir: Path) -> None:
    model = load_spandrel(weights_dir / "gfpgan" / "GFPGANv1.3.pth", architecture="GFPGAN")
    assert model.scale == 1 and model.path.name == "GFPGANv1.3.pth"


def test_restoreformer_file_layout(weights_dir: Path) -> None:
    stored = torch.load(weights_dir / "gfpgan" / "RestoreFormer.pth", weights_only=True)
    assert list(stored) == ["params_ema"]
    assert {"encoder.conv_in.weight", "quantize.embedding.weight"} <= set(stored["params_ema"])
    model = load_spandrel(weights_dir / "gfpgan" / "RestoreFormer.pth", architecture="RestoreFormer")
    assert model.scale == 1


def test_all_sixteen_names_are_served_and_ordered_by_kind(registry: PostProcessorRegistry) -> None:
    assert sorted(registry.available()) == sorted(horde_names.POST_PROCESSORS)
    assert {cls.name: cls.scale for cls in UPSCALERS} == horde_names.UPSCALER_SCALES
    kinds = [horde_names.post_processor_kind(name) for name in registry.known()]
    assert kinds == sorted(kinds, key=["upscaler", "face_fixer", "background"].index)


def test_the_v13_records_name_the_upstream_files_with_sha256() -> None:
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert list(data) == list(horde_names.POST_PROCESSORS[8:])
    records = parse_reference(data, category="esrgan")
    files = {cls.name: cls.file_name for cls in UPSCALERS}
    files.update({"GFPGANv1.3": "GFPGANv1.3.pth", "RestoreFormer": "RestoreFormer.pth"})
    for name, record in records.items():
        [spec], [download] = record.files, record.downloads
        assert spec.path == files[name] == download.file_name  # where the registry looks for it
        assert spec.sha256sum and len(spec.sha256sum) == 64
        assert download.file_url.startswith("https://github.com/")
        assert record.category == ("gfpgan" if name in horde_names.FACE_FIXERS else "esrgan")
