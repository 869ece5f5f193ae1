"""Architecture-true random-weight post-processor weights, for tests, benchmarks and the offline demo.

Every file has the real key layout and goes through the real loaders (spandrel, facexlib, our U²-Net):
- esrgan/: RRDBNet with 16 filters and 1-2 blocks; the Real-ESRGAN files in the new key layout wrapped in
  `params_ema` (x2plus with its 12-channel pixel-unshuffle input), NMKD_Siax / 4x_AnimeSharp in the old one;
  the bridge-v13 upscalers, trained with neosr (BasicSR's successor), in its `params` wrapper: 4xNomos8kSC and
  4xLSDIRplus as RRDBNet in BasicSR's key layout, the two RealPLKSR files (16 wide, 2 blocks; the second
  with DySample), DAT "dat2" (24 wide, 2 groups of 2 blocks), SPAN (16 wide, x2);
- gfpgan/: GFPGANv1.4 at full size (spandrel builds GFPGAN with fixed hyper-parameters, so it cannot be
  smaller), GFPGANv1.3 as a hard link to it (the same GFPGANv1Clean network), RestoreFormer (32 wide, one
  residual block per level) in `params_ema`, the RetinaFace ResNet-50 detector with all-zero weights (no face
  passes the threshold: a random detector "finds" dozens of faces in noise and takes minutes), ParseNet with
  random weights;
- codeformer/: CodeFormer with a 1-layer, 64-wide transformer and a 64-entry codebook (its VQGAN encoder and
  generator have fixed widths);
- rembg/: U²-Net in the small (u2netp) widths.

Building is idempotent: files already present are kept (the recipe is seeded, so a rebuild is identical).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from models.downloads import file_sha256
from postprocessors.facefix import FACE_HELPER_FILES

logger = logging.getLogger(__name__)

SEED = 1234
TINY_FILTERS = 16


def _rrdb_old_layout(
    *, in_nc: int, num_blocks: int, scale: int, num_filters: int = TINY_FILTERS
) -> dict[str, torch.Tensor]:
    from spandrel.architectures.ESRGAN import ESRGAN

    net = ESRGAN(in_nc=in_nc, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _rrdb_new_layout(old: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Rename old-layout RRDBNet keys to Real-ESRGAN's (basicsr) names: conv_first, body.N.rdbK.convM, ..."""
    new: dict[str, torch.Tensor] = {}
    tail: list[int] = []
    for key, value in old.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            block, rdb, conv, kind = m.groups()
            new[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif m := re.fullmatch(rf"model\.1\.sub\.{num_blocks}\.(weight|bias)", key):
            new[f"conv_body.{m.group(1)}"] = value
        elif key.startswith("model.0."):
            new["conv_first." + key.split(".")[-1]] = value
        elif (index := int(key.split(".")[1])) not in tail:
            tail.append(index)
    # After the trunk come the upsampling convolutions, then the HR and last convolutions, in index order.
    tail_names = [f"conv_up{i}" for i in range(1, len(tail) - 1)] + ["conv_hr", "conv_last"]
    for index, name in zip(sorted(tail), tail_names, strict=True):
        for kind in ("weight", "bias"):
            new[f"{name}.{kind}"] = old[f"model.{index}.{kind}"]
    return new


def realesrgan_state_dict(
    *, num_filters: int = 64, num_blocks: int = 23, in_nc: int = 3
) -> dict[str, dict[str, torch.Tensor]]:
    """A Real-ESRGAN file's content (new key layout in `params_ema`); defaults: RealESRGAN_x4plus's shape."""
    old = _rrdb_old_layout(in_nc=in_nc, num_blocks=num_blocks, scale=4, num_filters=num_filters)
    return {"params_ema": _rrdb_new_layout(old, num_blocks)}


def _esrgan_files() -> dict[str, Callable[[], Any]]:
    def realesrgan(in_nc: int, num_blocks: int) -> Callable[[], Any]:
        # x2plus is a x4 network fed a 2x2 pixel-unshuffled (12-channel) input, exactly like the real file.
        return lambda: realesrgan_state_dict(num_filters=TINY_FILTERS, num_blocks=num_blocks, in_nc=in_nc)

    return {
        "RealESRGAN_x4plus.pth": realesrgan(3, 1),
        "RealESRGAN_x2plus.pth": realesrgan(12, 1),
        "RealESRGAN_x4plus_anime_6B.pth": realesrgan(3, 2),
        "NMKD_Siax.pth": lambda: _rrdb_old_layout(in_nc=3, num_blocks=1, scale=4),
        "4x_AnimeSharp.pth": lambda: _rrdb_old_layout(in_nc=3, num_blocks=2, scale=4),
    }


def _v13_upscaler_files() -> dict[str, tuple[str, str, Callable[[], Any]]]:
    """horde name -> (record type, file name, state factory) of the upscalers added at bridge v13."""

    def rrdb() -> Any:
        old = _rrdb_old_layout(in_nc=3, num_blocks=1, scale=4)
        return neosr_file(_rrdb_new_layout(old, 1))

    return {
        "4xNomos8kSC": ("esrgan", "4xNomos8kSC.pth", rrdb),
        "4xLSDIRplus": ("esrgan", "4xLSDIRplus.pth", rrdb),
        "4xNomosWebPhoto_RealPLKSR": ("realplksr", "4xNomosWebPhoto_RealPLKSR.pth",
                                      lambda: neosr_file(realplksr_state_dict(dysample=False))),
        "4xNomos2_realplksr_dysample": ("realplksr", "4xNomos2_realplksr_dysample.pth",
                                        lambda: neosr_file(realplksr_state_dict(dysample=True))),
        "4xNomos2_hq_dat2": ("dat", "4xNomos2_hq_dat2.pth", lambda: neosr_file(dat2_state_dict())),
        "2xModernSpanimationV1": ("span", "2x_ModernSpanimationV1.pth",
                                  lambda: neosr_file(span_state_dict())),
    }  # fmt: skip


def neosr_file(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """neosr saves the generator as {"params": state_dict} (and its EMA copy as "params_ema")."""
    return {"params": state}


def realplksr_state_dict(*, dysample: bool) -> dict[str, torch.Tensor]:
    from spandrel.architectures.PLKSR import RealPLKSR

    return RealPLKSR(dim=TINY_FILTERS, n_blocks=2, upscaling_factor=4, dysample=dysample).state_dict()


def dat2_state_dict() -> dict[str, torch.Tensor]:
    from spandrel.architectures.DAT import DAT

    # neosr's "dat2": split 8x32, expansion 2, pixelshuffle; fewer and narrower groups than its 6 x 6 x 180.
    net = DAT(img_size=64, embed_dim=24, depth=[2, 2], num_heads=[2, 2], split_size=[8, 32],
              expansion_factor=2.0, upscale=4, resi_connection="1conv", upsampler="pixelshuffle")  # fmt: skip
    return net.state_dict()


def span_state_dict() -> dict[str, torch.Tensor]:
    from spandrel.architectures.SPAN import SPAN

    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=TINY_FILTERS, upscale=2).state_dict()


def restoreformer_state_dict() -> dict[str, Any]:
    from spandrel.architectures.RestoreFormer import RestoreFormer

    # GroupNorm(32) sets the narrowest width; the real one is 64 wide with widths x1..x8 and 2 blocks.
    net = RestoreFormer(n_embed=64, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                        z_channels=32)  # fmt: skip
    return {"params_ema": net.state_dict()}


class SameAs:
    """A recipe entry that is a hard link to another file of the folder (same network, same size)."""

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name


def gfpgan_state_dict() -> dict[str, Any]:
    from spandrel.architectures.GFPGAN import GFPGAN

    net = GFPGAN(
        out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
        num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True,
    )  # fmt: skip
    return {"params_ema": net.state_dict()}


def codeformer_state_dict() -> dict[str, Any]:
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    net = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, latent_size=256,
                     connect_list=["32", "64", "128", "256"])  # fmt: skip
    return {"params_ema": net.state_dict()}


def detector_state_dict() -> dict[str, torch.Tensor]:
    from facexlib.detection.retinaface import RetinaFace

    net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    return {k: torch.zeros_like(v) for k, v in net.state_dict().items()}


def parser_state_dict() -> dict[str, torch.Tensor]:
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()


def u2net_state_dict() -> dict[str, torch.Tensor]:
    from postprocessors.u2net import U2NET_SMALL, U2Net

    return U2Net(U2NET_SMALL).state_dict()


# category -> horde name -> (record type, {file name: state dict factory})
def _recipe() -> dict[str, dict[str, tuple[str, dict[str, Any]]]]:
    esrgan = _esrgan_files()
    v1 = {
        name.removesuffix(".pth"): ("realesrgan" if name.startswith("Real") else "esrgan", {name: build})
        for name, build in esrgan.items()
    }
    v13 = {name: (kind, {file: build}) for name, (kind, file, build) in _v13_upscaler_files().items()}
    return {
        "esrgan": {**v1, **v13},
        "gfpgan": {
            "GFPGAN": (
                "gfpgan",
                {
                    "GFPGANv1.4.pth": gfpgan_state_dict,
                    FACE_HELPER_FILES[0]: detector_state_dict,
                    FACE_HELPER_FILES[1]: parser_state_dict,
                },
            ),
            "GFPGANv1.3": ("gfpgan", {"GFPGANv1.3.pth": SameAs("GFPGANv1.4.pth")}),
            "RestoreFormer": ("restoreformer", {"RestoreFormer.pth": restoreformer_state_dict}),
        },  # fmt: skip
        "codeformer": {"CodeFormers": ("CodeFormers", {"CodeFormers.pth": codeformer_state_dict})},
        "rembg": {"strip_background": ("u2net", {"u2net.pth": u2net_state_dict})},
    }


def _write(path: Path, build: Callable[[], Any] | SameAs, seed: int) -> None:
    if isinstance(build, SameAs):
        try:
            os.link(path.with_name(build.file_name), path)
        except OSError:  # a file system without hard links
            shutil.copyfile(path.with_name(build.file_name), path)
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    # Several test processes may build into one folder at once: one builds, the others wait and reuse.
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / ".postprocessors-build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record(name: str, kind: str, category: str, files: list[Path]) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "category": category,
        "description": f"tiny random-weight {name} (architecture-true; tests and demo only)",
        "version": "tiny",
        "style": "generalist",
        "config": {
            "files": [{"path": f.name, "sha256sum": file_sha256(f)} for f in files],
            "download": [{"file_name": f.name, "file_path": "", "file_url": f.as_uri()} for f in files],
        },
        "available": False,
    }


def build_tiny_postprocessors(dest: Path, *, categories: Iterable[str] | None = None) -> dict[str, dict]:
    """Write the tiny weights under `dest/<category>/` (once) and return reference records by category:
    {"esrgan": {name: record}, "gfpgan": {...}, "codeformer": {...}, "rembg": {...}}, each in the shape of the
    horde's esrgan.json / gfpgan.json / codeformer.json, with real sha256 sums and file:// download URLs.

    `dest` works as the `weights_dir` of a PostProcessorRegistry. `categories` limits the build (e.g.
    ("esrgan",): 9 MB in a second, where the face fixers' full-width networks take 815 MB).
    """
    dest = Path(dest).resolve()
    recipe = _recipe()
    wanted = list(recipe) if categories is None else list(categories)
    unknown = [c for c in wanted if c not in recipe]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {list(recipe)}")
    references: dict[str, dict] = {}
    with _exclusive(dest):
        for category in wanted:
            entries = recipe[category]
            folder = dest / category
            folder.mkdir(parents=True, exist_ok=True)
            references[category] = {}
            for name, (kind, files) in entries.items():
                paths = []
                for file_name, build in files.items():
                    path = folder / file_name
                    if not path.is_file():
                        logger.info("tiny post-processors: writing %s", path)
                        _write(path, build, SEED + zlib.crc32(file_name.encode()))
                    paths.append(path)
                references[category][name] = _record(name, kind, category, paths)
    return references
