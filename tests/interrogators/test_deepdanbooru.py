"""DeepDanbooru: the real file layout (reduced widths), its sha256 check, input sizes and the horde's
reading of the ratings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interrogators.common import WeightsMismatch
from interrogators.deepdanbooru import (
    CONV_COUNT,
    AnimeRatings,
    closest_size,
    load_deepdanbooru,
    rate,
    ratings_from,
)
from interrogators.reference import model_dir
from interrogators.tiny import DEEPDANBOORU_TAGS, TINY_DEEPDANBOORU, deepdanbooru_shapes, write_deepdanbooru
from models.downloads import file_sha256
from tests.interrogators.helpers import picture


def tiny_file(models_dir: Path) -> Path:
    return model_dir(models_dir, "deepdanbooru", TINY_DEEPDANBOORU) / "model-resnet_custom_v3.pt"


def test_file_layout_is_the_real_one(models_dir: Path) -> None:
    state = torch.load(tiny_file(models_dir), map_location="cpu", weights_only=True)
    assert state.pop("tags") == list(DEEPDANBOORU_TAGS)
    convs = {f"n_Conv_{n}.weight" for n in range(CONV_COUNT)}
    convs |= {f"n_Conv_{n}.bias" for n in range(CONV_COUNT - 1)}
    assert set(state) == convs  # the classifier (n_Conv_178) has no bias
    # At full width the shapes are those of model-resnet_custom_v3.pt: 9176 tags, ~614 MiB of float32.
    real = deepdanbooru_shapes(1)
    assert real[0] == (64, 3, 7) and real[178] == (9176, 4096, 1) and real[100] == (1024, 1024, 1)
    assert real[36] == (1024, 512, 1) and real[38] == (256, 256, 3) and real[158] == (2048, 1024, 1)
    params = sum(o * i * k * k + (o if n != 178 else 0) for n, (o, i, k) in real.items())
    assert params * 4 / 2**20 == pytest.approx(614.2, abs=0.5)


def test_sha256_is_checked_before_loading(models_dir: Path) -> None:
    path = tiny_file(models_dir)
    model = load_deepdanbooru(path, file_sha256(path))
    assert model.tags == list(DEEPDANBOORU_TAGS)
    with pytest.raises(WeightsMismatch):
        load_deepdanbooru(path, "0" * 64)


def test_a_foreign_file_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"layers.0.weight": torch.zeros(2, 2), "tags": []}, path)
    with pytest.raises(ValueError, match="not a DeepDanbooru model"):
        load_deepdanbooru(path)


def test_leaning_files_give_the_ratings_they_were_built_for(tmp_path: Path, models_dir: Path) -> None:
    safe = rate(load_deepdanbooru(tiny_file(models_dir)), picture(1, (96, 64)))
    assert safe.safe > 0.99 and safe.explicit < 0.01 and not safe.is_nsfw and not safe.realistic
    leaning = {"rating:explicit": 1.0, "rating:safe": -1.0, "realistic": 1.0}
    explicit = rate(load_deepdanbooru(write_deepdanbooru(tmp_path / "e.pt", leaning)), picture(2, (64, 64)))
    assert explicit.explicit > 0.99 and explicit.is_nsfw and explicit.realistic
    assert explicit.questionable == 0.5  # a zero row: sigmoid(0)


@pytest.mark.parametrize(
    ("size", "target"),
    [
        ((512, 512), (512, 512)),
        ((512, 768), (512, 768)),
        ((768, 512), (768, 512)),  # the landscape orientation of the same pixel count
        ((1024, 1024), (768, 768)),
        ((64, 64), (128, 128)),
        ((640, 384), (640, 384)),
    ],
)
def test_input_size_nearest_pixel_count_then_aspect(size: tuple[int, int], target: tuple[int, int]) -> None:
    assert closest_size(*size) == target


@pytest.mark.parametrize(
    ("safe", "questionable", "explicit", "bikini", "nsfw"),
    [
        (0.99, 0.0, 0.125, 0.0, False),  # at the explicit threshold: not above it
        (0.99, 0.0, 0.1251, 0.0, True),
        (0.92, 0.19, 0.0, 0.0, True),  # questionable with safe below 0.93
        (0.95, 0.19, 0.0, 0.0, False),  # questionable, but clearly safe
        (0.49, 0.0, 0.0, 0.0, True),  # not safe enough
        (0.99, 0.0, 0.0, 0.61, True),  # a bikini tag
        (0.99, 0.18, 0.12, 0.6, False),
    ],
)
def test_ratings_rule(safe: float, questionable: float, explicit: float, bikini: float, nsfw: bool) -> None:
    tags = ["rating:safe", "rating:questionable", "rating:explicit", "bikini"]
    ratings = ratings_from([safe, questionable, explicit, bikini], tags)
    assert ratings.is_nsfw is nsfw
    assert isinstance(ratings, AnimeRatings) and ratings.as_dict()["rating:safe"] == safe
