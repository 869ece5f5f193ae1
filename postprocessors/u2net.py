"""U²-Net (Qin et al. 2020, salient object detection), the network behind rembg's `u2net` background remover.

The module names follow the authors' reference implementation, so the official `u2net.pth` (and `u2netp.pth`,
the 1.1 M-parameter variant with the same key layout) load with `load_state_dict(strict=True)`. The channel
widths of every stage are read from the state dict, which is how one class serves both variants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENCODER = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
DECODER = ("stage5d", "stage4d", "stage3d", "stage2d", "stage1d")
# Depth of each stage's residual U-block: RSU-7 ... RSU-4, then the dilated, pool-free RSU-4F.
DEPTH = {
    "stage1": 7, "stage2": 6, "stage3": 5, "stage4": 4, "stage5": 0, "stage6": 0,
    "stage5d": 0, "stage4d": 4, "stage3d": 5, "stage2d": 6, "stage1d": 7,
}  # fmt: skip

# (in, mid, out) channels per stage of the two published variants.
U2NET_FULL = {
    "stage1": (3, 32, 64), "stage2": (64, 32, 128), "stage3": (128, 64, 256), "stage4": (256, 128, 512),
    "stage5": (512, 256, 512), "stage6": (512, 256, 512), "stage5d": (1024, 256, 512),
    "stage4d": (1024, 128, 256), "stage3d": (512, 64, 128), "stage2d": (256, 32, 64),
    "stage1d": (128, 16, 64),
}  # fmt: skip
U2NET_SMALL = {name: (3 if name == "stage1" else 128 if name.endswith("d") else 64, 16, 64) for name in DEPTH}


class REBNCONV(nn.Module):
    """3x3 convolution (optionally dilated) + batch norm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _upsample_like(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=target.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of `depth` levels (RSU-L): an encoder-decoder inside each stage.

    Levels 1..depth-1 pool by two; the innermost level is a dilated convolution. Module names are the
    reference's (rebnconv1..rebnconv<L>, rebnconv<L-1>d..rebnconv1d), so weights load unchanged.
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.depth = depth
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch)
        for level in range(1, depth - 1):
            setattr(self, f"pool{level}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            setattr(self, f"rebnconv{level + 1}", REBNCONV(mid_ch, mid_ch))
        setattr(self, f"rebnconv{depth}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for level in range(depth - 1, 1, -1):
            setattr(self, f"rebnconv{level}d", REBNCONV(mid_ch * 2, mid_ch))
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for level in range(1, self.depth - 1):
            pooled = getattr(self, f"pool{level}")(skips[-1])
            skips.append(getattr(self, f"rebnconv{level + 1}")(pooled))
        hx = getattr(self, f"rebnconv{self.depth}")(skips[-1])
        for level in range(self.depth - 1, 0, -1):
            hx = getattr(self, f"rebnconv{level}d")(torch.cat((hx, skips[level - 1]), 1))
            if level > 1:
                hx = _upsample_like(hx, skips[level - 2])
        return hx + hxin


class RSU4F(nn.Module):
    """The pool-free residual block of the deepest stages: dilations 1, 2, 4, 8 keep the resolution."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2Net(nn.Module):
    """Six encoder stages, five decoder stages, six side outputs fused by a 1x1 convolution."""

    def __init__(self, stages: dict[str, tuple[int, int, int]], out_ch: int = 1) -> None:
        super().__init__()
        for name, (cin, mid, cout) in stages.items():
            depth = DEPTH[name]
            setattr(self, name, RSU4F(cin, mid, cout) if depth == 0 else RSU(depth, cin, mid, cout))
        for level in range(1, 6):
            setattr(self, f"pool{level}{level + 1}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        side_inputs = [
            stages[n][2] for n in ("stage1d", "stage2d", "stage3d", "stage4d", "stage5d", "stage6")
        ]
        for index, channels in enumerate(side_inputs, start=1):
            setattr(self, f"side{index}", nn.Conv2d(channels, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = []
        hx = x
        for level, name in enumerate(ENCODER, start=1):
            hx = getattr(self, name)(hx)
            encoded.append(hx)
            if level < 6:
                hx = getattr(self, f"pool{level}{level + 1}")(hx)
        decoded = {6: encoded[5]}
        hx = encoded[5]
        for level, name in zip(range(5, 0, -1), DECODER, strict=True):
            hx = getattr(self, name)(
                torch.cat((_upsample_like(hx, encoded[level - 1]), encoded[level - 1]), 1)
            )
            decoded[level] = hx
        d1 = self.side1(decoded[1])
        sides = [d1] + [_upsample_like(getattr(self, f"side{i}")(decoded[i]), d1) for i in range(2, 7)]
        d0 = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(d) for d in (d0, *sides))


def stages_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
    """(in, mid, out) channels of every stage, read from the convolution shapes."""
    stages = {}
    for name in DEPTH:
        conv_in = state_dict[f"{name}.rebnconvin.conv_s1.weight"]
        mid = state_dict[f"{name}.rebnconv1.conv_s1.weight"].shape[0]
        stages[name] = (int(conv_in.shape[1]), int(mid), int(conv_in.shape[0]))
    return stages


def load_u2net(path: Path) -> U2Net:
    """Build the U²-Net variant a state dict describes and load it (strict: every key must match)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    # Weights saved from nn.DataParallel carry a "module." prefix.
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model = U2Net(stages_from_state_dict(state_dict), out_ch=int(state_dict["outconv.weight"].shape[0]))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
