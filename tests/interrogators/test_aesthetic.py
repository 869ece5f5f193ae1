"""The LAION aesthetic predictor: the real file layout, its sha256 check, and the head on known inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interrogators.aesthetic import SIZE_BYTES, AestheticHead, load_aesthetic
from interrogators.common import WeightsMismatch
from interrogators.tiny import write_aesthetic
from models.downloads import file_sha256

KEYS = ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]


def test_layout_and_size_of_the_real_file() -> None:
    head = AestheticHead()
    state = head.state_dict()
    assert list(state) == [f"{k}.{p}" for k in KEYS for p in ("weight", "bias")]
    shapes = [tuple(state[f"{k}.weight"].shape) for k in KEYS]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    # sac+logos+ava1-l14-linearMSE.pth holds exactly these float32 tensors (plus pickle framing).
    tensor_bytes = 4 * sum(t.numel() for t in state.values())
    assert tensor_bytes == 3_711_876 and 0 < SIZE_BYTES - tensor_bytes < 4096


def test_known_inputs(tmp_path: Path) -> None:
    head = AestheticHead(4)
    with torch.no_grad():
        for module in head.layers:
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        head.layers[7].bias.fill_(5.5)
    assert head.score(torch.tensor([0.3, -2.0, 1.0, 0.0])) == pytest.approx(5.5)  # only the last bias left
    torch.manual_seed(0)
    head = AestheticHead(4)
    linear = [m for m in head.layers if isinstance(m, torch.nn.Linear)]
    x = torch.tensor([3.0, 0.0, 4.0, 0.0])
    expected = x / 5.0  # the input is L2-normalised first
    for layer in linear:  # no activations between the layers
        expected = layer.weight.detach() @ expected + layer.bias.detach()
    assert head.score(x) == pytest.approx(float(expected[0]), abs=1e-6)
    assert head.score(x * 7) == pytest.approx(head.score(x), abs=1e-6)  # scale does not matter


def test_file_round_trip_and_sha256(tmp_path: Path) -> None:
    path = write_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", input_width=768)
    head = load_aesthetic(path, file_sha256(path))
    assert head.input_width == 768
    embedding = torch.nn.functional.normalize(torch.randn(768), dim=0)
    assert head.score(embedding) == pytest.approx(AestheticHead.score(load_aesthetic(path), embedding))
    with pytest.raises(WeightsMismatch):
        load_aesthetic(path, "f" * 64)
    foreign = tmp_path / "foreign.pth"
    torch.save({"other.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not an aesthetic predictor"):
        load_aesthetic(foreign)
