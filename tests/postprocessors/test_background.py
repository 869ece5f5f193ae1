from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from postprocessors import PostProcessorRegistry
from postprocessors.u2net import U2NET_FULL, U2Net, stages_from_state_dict
from tests.postprocessors.helpers import picture

REFERENCE = Path(__file__).parents[2] / "postprocessors" / "strip_background.json"


def test_foreground_kept_background_transparent(registry: PostProcessorRegistry) -> None:
    image = picture((360, 330), seed=1)  # above the 320² network input: the mask is enlarged, not averaged
    result = registry.get("strip_background").process(image)
    out = np.asarray(result.image)
    assert result.image.mode == "RGBA" and result.image.size == image.size
    alpha = out[:, :, 3]
    # The mask is min-max scaled: (near) fully cut away and (near) fully kept pixels both occur.
    assert alpha.min() <= 20 and alpha.max() >= 235
    assert (out[alpha == 0, :3] == 0).all()  # nothing of the background survives in the file
    kept = alpha > 0
    assert np.array_equal(out[kept, :3], np.asarray(image)[kept])  # straight alpha: colours untouched


def test_small_images_get_a_graded_mask(registry: PostProcessorRegistry) -> None:
    result = registry.get("strip_background").process(picture((72, 56), seed=1))
    alpha = np.asarray(result.image.getchannel("A"), dtype=int)
    assert alpha.max() - alpha.min() > 100


def test_existing_transparency_stays(registry: PostProcessorRegistry) -> None:
    image = picture((64, 48), mode="RGBA", seed=2)
    alpha = np.full((48, 64), 255, dtype=np.uint8)
    alpha[:, :20] = 0
    image.putalpha(Image.fromarray(alpha, "L"))
    out = np.asarray(registry.get("strip_background").process(image).image)
    assert (out[:, :20, 3] == 0).all()
    assert (out[:, :20, :3] == 0).all()
    assert out[:, 20:, 3].max() > 100  # the opaque part still gets the mask


def test_u2net_definition_matches_the_published_model() -> None:
    """The full variant has the published U²-Net's 44,009,869 parameters, and its stage widths read back
    from its state dict: u2net.pth loads into this class."""
    model = U2Net(U2NET_FULL)
    assert sum(p.numel() for p in model.parameters()) == 44_009_869
    assert stages_from_state_dict(model.state_dict()) == U2NET_FULL


def test_reference_entry_names_a_verifiable_download() -> None:
    entry = json.loads(REFERENCE.read_text())["strip_background"]
    (spec,) = entry["config"]["files"]
    (download,) = entry["config"]["download"]
    assert spec["path"] == download["file_name"] == "u2net.pth"
    assert len(spec["sha256sum"]) == 64 and int(spec["sha256sum"], 16)
    assert download["file_url"].startswith("https://")
    assert entry["category"] == "rembg"


@pytest.mark.parametrize("size", [(1, 1), (500, 3)])
def test_degenerate_sizes(registry: PostProcessorRegistry, size: tuple[int, int]) -> None:
    result = registry.get("strip_background").process(Image.new("RGB", size, (10, 200, 30)))
    assert result.image.size == size and result.image.mode == "RGBA"
