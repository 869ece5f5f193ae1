"""DeepDanbooru (`model-resnet_custom_v3.pt`): tag probabilities for anime images, read for its ratings.

The file is a torch pickle of a dict: the weights of 179 convolutions named `n_Conv_0` ... `n_Conv_178`
plus `tags`, the list of tag names (rating:safe, rating:questionable, rating:explicit among them). The
network is a bottleneck ResNet in TensorFlow's padding convention (it was converted from Keras): a 7x7
stem, six stages, and a 1x1 classifier averaged over the image and squashed by a sigmoid. Channel counts
are read from the weights, so a reduced-width file in the same layout (tests) loads through the same code.
Input: RGB in [0, 1], at one of 36 sizes (multiples of 128 up to 768) close to the image's pixel count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from interrogators.common import require_sha256

logger = logging.getLogger(__name__)

FILE_NAME = "model-resnet_custom_v3.pt"
SHA256 = "3841542cda4dd037da12a565e854b3347bb2eec8fbcd95ea3941b2c68990a355"
TAGS_KEY = "tags"
CONV_COUNT = 179

# (first block: projection position, stride), identity blocks after it. "first": the projection shortcut is
# numbered before the block's three convolutions, "last": after them (one stage of the converted graph).
STAGES: tuple[tuple[str, int, int], ...] = (
    ("first", 1, 2),
    ("first", 2, 7),
    ("first", 2, 19),
    ("last", 2, 19),
    ("first", 2, 2),
    ("first", 2, 2),
)

SIZE_STEP, SIZE_MAX = 128, 768
SAFE, QUESTIONABLE, EXPLICIT = "rating:safe", "rating:questionable", "rating:explicit"
REALISTIC = "realistic"
# The horde's reading of the ratings (horde-safety 0.3 NSFWAnimeScores).
EXPLICIT_ABOVE = 0.125
QUESTIONABLE_ABOVE = 0.185  # ... when safe is also below SAFE_CEILING
SAFE_CEILING = 0.93
SAFE_BELOW = 0.5
NSFW_TAGS = {"bikini": 0.6}
TAG_REPORTED = 0.5  # tags above this are "found" (the realistic tag turns an image back into a photo)


@dataclass(frozen=True)
class _Block:
    a: int  # conv numbers
    b: int
    c: int
    projection: int | None
    stride: int


def _layout() -> list[_Block]:
    blocks, n = [], 1
    for where, stride, identities in STAGES:
        if where == "first":
            blocks.append(_Block(n + 1, n + 2, n + 3, n, stride))
        else:
            blocks.append(_Block(n, n + 1, n + 2, n + 3, stride))
        n += 4
        for _ in range(identities):
            blocks.append(_Block(n, n + 1, n + 2, None, 1))
            n += 3
    assert n == CONV_COUNT - 1, n  # the classifier is the last one
    return blocks


class DeepDanbooru(torch.nn.Module):
    def __init__(self, shapes: dict[int, tuple[int, int, int]], tags: list[str]) -> None:
        """`shapes`: conv number -> (out channels, in channels, kernel size), read from a weights file."""
        super().__init__()
        self.tags = list(tags)
        self.blocks = _layout()
        strides = {0: 2}
        for block in self.blocks:
            strides[block.b] = block.stride
            if block.projection is not None:
                strides[block.projection] = block.stride
        for n in range(CONV_COUNT):
            out_ch, in_ch, kernel = shapes[n]
            conv = torch.nn.Conv2d(in_ch, out_ch, kernel, stride=strides.get(n, 1), bias=n != CONV_COUNT - 1)
            self.add_module(f"n_Conv_{n}", conv)

    def conv(self, n: int) -> torch.nn.Conv2d:
        return getattr(self, f"n_Conv_{n}")

    def _block(self, x: torch.Tensor, block: _Block) -> torch.Tensor:
        y = F.relu(self.conv(block.a)(x))
        # TensorFlow "same" padding: symmetric for stride 1, only right/bottom for stride 2.
        y = F.pad(y, [1, 1, 1, 1] if block.stride == 1 else [0, 1, 0, 1])
        y = self.conv(block.c)(F.relu(self.conv(block.b)(y)))
        shortcut = x if block.projection is None else self.conv(block.projection)(x)
        return F.relu(y + shortcut)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, h, w] RGB in [0, 1] -> [n, tags] probabilities."""
        x = F.relu(self.conv(0)(F.pad(pixels, [2, 3, 2, 3])))
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), kernel_size=3, stride=2)
        for block in self.blocks:
            x = self._block(x, block)
        logits = self.conv(CONV_COUNT - 1)(x).mean(dim=(2, 3))
        return torch.sigmoid(logits)


def load_deepdanbooru(path: Path, sha256: str | None = None) -> DeepDanbooru:
    """The model from its file (float32: it may run on the CPU, where half precision is many times
    slower). With `sha256`, a file that does not match is refused before it is unpickled."""
    path = Path(path)
    require_sha256(path, sha256)
    state = torch.load(path, map_location="cpu", weights_only=True)
    tags = [str(t) for t in state.pop(TAGS_KEY, [])]
    shapes = {}
    for n in range(CONV_COUNT):
        weight = state.get(f"n_Conv_{n}.weight")
        if weight is None:
            raise ValueError(f"{path} is not a DeepDanbooru model: n_Conv_{n}.weight is missing")
        shapes[n] = (weight.shape[0], weight.shape[1], weight.shape[2])
    model = DeepDanbooru(shapes, tags)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def resize_targets() -> list[tuple[int, int]]:
    sides = range(SIZE_STEP, SIZE_MAX + 1, SIZE_STEP)
    return [(w, h) for w in sides for h in sides]


def closest_size(width: int, height: int) -> tuple[int, int]:
    """The input size nearest the image's pixel count; among equals, the nearest aspect ratio (the horde's
    list has both orientations of each size, and a landscape image must not be read as a portrait)."""
    pixels, aspect = width * height, width / max(1, height)
    return min(resize_targets(), key=lambda t: (abs(t[0] * t[1] - pixels), abs(t[0] / t[1] - aspect)))


@dataclass(frozen=True)
class AnimeRatings:
    safe: float
    questionable: float
    explicit: float
    found_tags: dict[str, float] = field(default_factory=dict)  # tags above TAG_REPORTED
    nsfw_tags: tuple[str, ...] = ()

    @property
    def is_nsfw(self) -> bool:
        return bool(
            self.nsfw_tags
            or self.explicit > EXPLICIT_ABOVE
            or (self.questionable > QUESTIONABLE_ABOVE and self.safe < SAFE_CEILING)
            or self.safe < SAFE_BELOW
        )

    @property
    def realistic(self) -> bool:
        return REALISTIC in self.found_tags

    def as_dict(self) -> dict[str, float]:
        return {SAFE: self.safe, QUESTIONABLE: self.questionable, EXPLICIT: self.explicit}


def ratings_from(probabilities: list[float], tags: list[str]) -> AnimeRatings:
    """Read the ratings (rounded to 4 decimals, as the horde compares them) and tags."""
    values = {tag: round(float(p), 4) for tag, p in zip(tags, probabilities, strict=False)}
    return AnimeRatings(
        safe=values.get(SAFE, 0.0),
        questionable=values.get(QUESTIONABLE, 0.0),
        explicit=values.get(EXPLICIT, 0.0),
        found_tags={t: p for t, p in values.items() if p > TAG_REPORTED},
        nsfw_tags=tuple(t for t, limit in NSFW_TAGS.items() if values.get(t, 0.0) > limit),
    )


def rate(model: DeepDanbooru, image: Image.Image) -> AnimeRatings:
    """DeepDanbooru's ratings of one image, on whichever device the model is now."""
    parameter = next(model.parameters())
    resized = image.convert("RGB").resize(closest_size(*image.size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        probabilities = model(pixels.to(parameter.device, parameter.dtype) / 255.0)[0]
    return ratings_from(probabilities.float().cpu().tolist(), model.tags)
