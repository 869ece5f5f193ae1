"""Tiny ControlNets and annotators in the layouts of the files people download, for tests, the demo and
benchmarks (random weights; nothing is downloaded).

    python -m controlnet.tiny DEST      # builds once into DEST, prints the reference files

* `controlnet.json`: the horde's SD1 and SD2 ControlNet records (same names, same file names), each file a
  tiny ControlNet for the tiny models' UNet shape in the original layout (`control_model.*`, fp16): the
  `diff_control_*` files in kohya-ss's diff format (ControlNet minus a reference UNet, plus the `difference`
  marker), the others full ControlNets.
* `annotators.json`: the annotator records with their real file names and layouts (controlnet-aux's
  networks at their real shapes, each tensor stored as a broadcast view of a small random vector, so a
  500 MB network is a few hundred KB on disk; the OpenPose body network is all zeros so that it finds no
  one instead of thousands of random keypoints), and a tiny ADE20k UperNet (all at full size with
  `full_size`, for benchmarks).
* `tiny-sd2.json`: a tiny SD2 txt2img model (the tiny set has only a depth2img SD2 model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from models.tiny import _RESNET_PARTS, _exclusive, _file_specs, _split_prefix

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
TINY_SD2 = "tiny-sd2"
# The horde's records: (name, file, format); SD1 shapes follow the tiny SD1 models, SD2 the tiny SD2 model.
SD1_FILES = {
    "control_canny": ("diff_control_sd15_canny_fp16.safetensors", "diff"),
    "control_depth": ("diff_control_sd15_depth_fp16.safetensors", "diff"),
    "control_hed": ("diff_control_sd15_hed_fp16.safetensors", "diff"),
    "control_normal": ("control_normal_fp16.safetensors", "full"),
    "control_openpose": ("control_openpose_fp16.safetensors", "full"),
    "control_seg": ("control_seg_fp16.safetensors", "full"),
    "control_scribble": ("control_scribble_fp16.safetensors", "full"),
    "control_fakescribbles": ("control_scribble_fp16.safetensors", "full"),
    "control_hough": ("control_mlsd_fp16.safetensors", "full"),
}
SD2_FILES = {
    "control_canny_sd2": ("diff_control_sd21_canny_fp16.safetensors", "diff"),
    "control_depth_sd2": ("diff_control_sd21_depth_fp16.safetensors", "diff"),
    "control_hed_sd2": ("diff_control_sd21_hed_fp16.safetensors", "diff"),
    "control_openpose_sd2": ("control_openpose_fp21.safetensors", "full"),
    "control_scribble_sd2": ("control_scribble_fp21.safetensors", "full"),
    "control_fakescribbles_sd2": ("control_scribble_fp21.safetensors", "full"),
}


# --- ControlNets ----------------------------------------------------------------------------------------


def tiny_unet(*, sd2: bool, seed: int) -> Any:
    """A UNet of the tiny models' shape (models.tiny), with its own random weights."""
    from models.tiny import _unet

    torch.manual_seed(seed)
    return _unet(4, sd2=sd2)


def random_controlnet(unet: Any, seed: int) -> Any:
    """A ControlNet for `unet`'s shape with random weights everywhere (zero convolutions included, so that
    the control visibly changes the image)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet.eval()


def controlnet_to_ldm(controlnet: Any) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights in the original layout (`control_model.*`)."""
    cfg = controlnet.config
    layers, blocks = cfg.layers_per_block, len(cfg.block_out_channels)
    pairs = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.resnets.1.": "middle_block.2.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
    }
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for j in range(hint_blocks):
        pairs[f"controlnet_cond_embedding.blocks.{j}."] = f"input_hint_block.{2 * (j + 1)}."
    pairs["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * (hint_blocks + 1)}."
    for i in range(blocks):
        for j in range(layers):
            pairs[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.0."
            pairs[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.1."
        pairs[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
    for k in range(len(controlnet.controlnet_down_blocks)):
        pairs[f"controlnet_down_blocks.{k}."] = f"zero_convs.{k}.0."
    out = {}
    for key, value in controlnet.state_dict().items():
        hf, ldm, rest = _split_prefix(key, pairs)
        if not hf:
            raise KeyError(f"no original-layout name for {key}")
        if "resnets." in hf:
            _, part, tail = _split_prefix(rest, _RESNET_PARTS)
            rest = part + tail
        out["control_model." + ldm + rest] = value.detach().contiguous()
    return out


def diff_file(controlnet: Any, reference_unet: Any) -> dict[str, torch.Tensor]:
    """kohya-ss's diff format: the weights shared with the UNet hold ControlNet minus the reference UNet."""
    unet_state = reference_unet.state_dict()
    ldm = controlnet_to_ldm(controlnet)
    diffusers_names = dict(zip(ldm, controlnet.state_dict(), strict=True))
    out = {}
    for ldm_key, value in ldm.items():
        base = unet_state.get(diffusers_names[ldm_key])
        out[ldm_key] = value - base if base is not None else value
    out["difference"] = torch.zeros(1)
    return out


def _save_controlnets(dest: Path, files: dict[str, tuple[str, str]], *, sd2: bool, seed: int) -> None:
    from safetensors.torch import save_file

    reference_unet = tiny_unet(sd2=sd2, seed=seed)
    done: set[str] = set()
    for offset, (file_name, fmt) in enumerate(files.values()):
        if file_name in done:
            continue
        done.add(file_name)
        controlnet = random_controlnet(reference_unet, seed + 1 + offset)
        state = diff_file(controlnet, reference_unet) if fmt == "diff" else controlnet_to_ldm(controlnet)
        save_file({k: v.to(torch.float16) for k, v in state.items()}, str(dest / file_name))


def _controlnet_records(dest: Path) -> dict[str, Any]:
    records = {}
    for files, baseline in ((SD1_FILES, "stable diffusion 1"), (SD2_FILES, "stable diffusion 2")):
        for name, (file_name, _) in files.items():
            records[name] = {
                "name": name, "type": name.removesuffix("_sd2"), "style": name.removesuffix("_sd2"),
                "description": f"tiny random-weight {name} for {baseline} (tests)", "version": "0.1.0",
                "nsfw": False, "config": {"files": _file_specs(dest, [dest / file_name]), "download": []},
            }
    return records


# --- annotators -----------------------------------------------------------------------------------------


def compact(state: dict[str, torch.Tensor], seed: int, *, zero: bool = False, scale: float = 0.02,
            dtype: torch.dtype = torch.float32, dense: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `state`, same name, shape and dtype, as a broadcast view of one random vector along
    its last dimension: the file keeps the real layout at a fraction of the bytes. `dense`: fully random
    tensors of their real size instead (benchmarks time the networks with real memory traffic)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif dense:
            full = torch.zeros(value.shape) if zero else torch.randn(value.shape, generator=generator) * scale
            out[key] = full.to(dtype)
        else:
            width = value.shape[-1] if value.ndim else 1
            base = torch.zeros(width) if zero else torch.randn(width, generator=generator) * scale
            base = base.to(dtype)
            out[key] = base.expand(value.shape) if value.ndim else base[0].clone()
    return out


def _meta_state(build: Any) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            net = build()
    return net.state_dict()


def _save_annotators(dest: Path, *, full_size: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.hed import ControlNetHED_Apache2
        from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
        from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
        from controlnet_aux.open_pose.model import bodypose_model

    folder = dest / "annotators"
    folder.mkdir(parents=True, exist_ok=True)
    dense = full_size
    hed = compact(_meta_state(ControlNetHED_Apache2), 1, dtype=torch.float16, dense=dense)
    torch.save(hed, folder / "ControlNetHED.pth")
    leres = compact(_meta_state(lambda: RelDepthModel(backbone="resnext101")), 2, dense=dense)
    torch.save({"depth_model": {f"module.{k}": v for k, v in leres.items()}}, folder / "res101.pth")
    midas = _meta_state(lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True))
    torch.save(compact(midas, 3, dense=dense), folder / "dpt_hybrid-midas-501f0c75.pt")
    body = compact(_meta_state(bodypose_model), 4, zero=True, dense=dense)
    torch.save({k.split(".", 1)[1]: v for k, v in body.items()}, folder / "body_pose_model.pth")
    torch.save(compact(_meta_state(MobileV2_MLSD_Large), 5, dense=dense), folder / "mlsd_large_512_fp32.pth")
    _save_seg(folder / "upernet-convnext-small", real_shape=full_size)


def _save_seg(folder: Path, *, real_shape: bool = False) -> None:
    """An UperNet-ConvNeXt with the 150 ADE20k classes, as the hub repository ships it: tiny, or (for
    benchmarks) at upernet-convnext-small's real shape and size."""
    from transformers import (
        ConvNextConfig,
        SegformerImageProcessor,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    torch.manual_seed(6)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if real_shape:
        backbone = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 27, 3], out_features=stages)
        config = UperNetConfig(backbone_config=backbone, hidden_size=512, auxiliary_in_channels=384,
                               num_labels=150)
        with torch.device("meta"):
            state = UperNetForSemanticSegmentation(config).state_dict()
        state, size = compact(state, 6, dense=True), 512
    else:
        backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=stages)
        config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32,
                               auxiliary_channels=16, num_labels=150)
        state, size = UperNetForSemanticSegmentation(config).eval().state_dict(), 64
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)


def _annotator_records(dest: Path) -> dict[str, Any]:
    from controlnet.manager import ANNOTATOR_REFERENCE

    real = json.loads(ANNOTATOR_REFERENCE.read_text(encoding="utf-8"))
    records = {}
    for name, record in real.items():
        paths = [dest / spec["path"] for spec in record["config"]["files"]]
        records[name] = {**record, "description": f"tiny stand-in of {name} (tests)",
                         "config": {"files": _file_specs(dest, paths), "download": []}}
    return records


# --- a tiny SD2 txt2img model ---------------------------------------------------------------------------


def _save_sd2(dest: Path, work: Path) -> dict[str, Any]:
    import diffusers

    from models.tiny import _scheduler, _text_encoder, _tokenizer, _vae

    torch.manual_seed(7)
    tokenizer = _tokenizer(work)
    pipe = diffusers.StableDiffusionPipeline(
        unet=tiny_unet(sd2=True, seed=8), vae=_vae(), text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest / TINY_SD2, safe_serialization=True)
    return {TINY_SD2: {
        "name": TINY_SD2, "baseline": "stable diffusion 2", "type": "diffusers", "inpainting": False,
        "description": "Tiny random-weight SD2 model (tests); draws noise.", "version": "2",
        "style": "generalist", "nsfw": False,
        "config": {"files": _file_specs(dest, [dest / TINY_SD2]), "download": []},
    }}


# --- building -------------------------------------------------------------------------------------------

REFERENCES = ("controlnet.json", "annotators.json", f"{TINY_SD2}.json")


def _is_built(dest: Path, version: str) -> bool:
    marker = dest / ".tiny-controlnet-build"
    return (marker.is_file() and marker.read_text().strip() == version
            and all((dest / name).is_file() for name in REFERENCES))


def build_tiny_controlnets(dest: Path, *, full_size: bool = False) -> dict[str, Path]:
    """Build once into `dest`; returns the reference files: {"controlnet", "annotators", "tiny-sd2"}.
    `full_size`: annotator weights at their real size (dense random tensors, a real-shape segmentation
    network): about 1.5 GB, for benchmarks that time the annotators."""
    dest = Path(dest).resolve()
    paths = {name.removesuffix(".json"): dest / name for name in REFERENCES}
    version = f"{BUILD_VERSION}{'-full-size' if full_size else ''}"
    with _exclusive(dest):
        if _is_built(dest, version):
            return paths
        logger.info("building tiny ControlNets and annotators into %s", dest)
        _save_controlnets(dest, SD1_FILES, sd2=False, seed=100)
        _save_controlnets(dest, SD2_FILES, sd2=True, seed=200)
        _save_annotators(dest, full_size=full_size)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".work-") as work:
            sd2 = _save_sd2(dest, Path(work))
        for name, records in (("controlnet.json", _controlnet_records(dest)),
                              ("annotators.json", _annotator_records(dest)), (f"{TINY_SD2}.json", sd2)):
            tmp = dest / f".{name}.tmp"
            tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
            os.replace(tmp, dest / name)
        (dest / ".tiny-controlnet-build").write_text(version)
        return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlnet.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to build into (reused when already built)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in build_tiny_controlnets(args.dest).values():
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
