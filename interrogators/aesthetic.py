"""The LAION improved aesthetic predictor: a score (about 1-10) from a CLIP ViT-L/14 image embedding.

`sac+logos+ava1-l14-linearMSE.pth` is a torch pickle of a state dict: five linear layers 768 -> 1024 -> 128
-> 64 -> 16 -> 1 under the keys `layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7` (the indices skip
the dropouts of the training model; there are no activations). Its input is the L2-normalised embedding.
The input width is read from the file, so a reduced-size file in the same layout (tests) loads the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interrogators.common import require_sha256

FILE_NAME = "sac+logos+ava1-l14-linearMSE.pth"
SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
SIZE_BYTES = 3_714_759
LAYER_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
EMBEDDING_WIDTH = 768  # CLIP ViT-L/14's projection


class AestheticHead(torch.nn.Module):
    def __init__(self, input_width: int = EMBEDDING_WIDTH) -> None:
        super().__init__()
        # Identity where the training model had its dropouts, so that the keys are those of the file.
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_width, 1024),
            torch.nn.Identity(),
            torch.nn.Linear(1024, 128),
            torch.nn.Identity(),
            torch.nn.Linear(128, 64),
            torch.nn.Identity(),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    @property
    def input_width(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[n, width] embeddings (normalised here) -> [n] scores."""
        return self.layers(torch.nn.functional.normalize(embeddings, dim=-1)).squeeze(-1)

    def score(self, embedding: torch.Tensor) -> float:
        parameter = next(self.parameters())
        with torch.inference_mode():
            value = self(embedding.reshape(1, -1).to(parameter.device, parameter.dtype))[0]
        return float(value)


def load_aesthetic(path: Path, sha256: str | None = None) -> AestheticHead:
    """The head from its file (float32); with `sha256`, a file that does not match is refused unread."""
    path = Path(path)
    require_sha256(path, sha256)
    state = torch.load(path, map_location="cpu", weights_only=True)
    first = state.get(f"{LAYER_KEYS[0]}.weight")
    if first is None:
        raise ValueError(f"{path} is not an aesthetic predictor: {LAYER_KEYS[0]}.weight is missing")
    head = AestheticHead(int(first.shape[1]))
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()
