"""The real-shape SD1.5 weights the benchmarks build: random values in the original LDM key layout.

One builder for every benchmark that needs an SD1.5 checkpoint as people download it (bench.model_swap,
bench.builders.first_start, bench.ckpt_load); each writes it in its own file layout.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch


def sd15_ldm_state(dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP-L text encoder at SD1.5's shapes (seed 0), keyed as in an LDM single file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.loading import CONFIGS_DIR
    from models.tiny import pipeline_to_ldm

    config = CONFIGS_DIR / "sd1"
    torch.manual_seed(0)
    with torch.no_grad():
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        )
        state = pipeline_to_ldm(pipe)
    if dtype is not None:
        state = {key: value.to(dtype).contiguous() for key, value in state.items()}
    return state


def write_sd15_copies(state: dict[str, torch.Tensor], dest: Path, names: Sequence[str]) -> Path:
    """`state` as `<name>.safetensors` under each name (one write, then copies; sha256 sidecars, so the
    worker does not rehash) and the `reference.json` listing them as SD1.5 checkpoints. Returns the first."""
    from safetensors.torch import save_file

    from models.downloads import hash_file, write_sidecar

    dest.mkdir(parents=True, exist_ok=True)
    first = dest / f"{names[0]}.safetensors"
    save_file(state, str(first))
    digest = hash_file(first)
    write_sidecar(first, digest)
    for name in names[1:]:
        shutil.copyfile(first, dest / f"{name}.safetensors")
        write_sidecar(dest / f"{name}.safetensors", digest)
    records = {
        name: {
            "name": name,
            "baseline": "stable diffusion 1",
            "type": "ckpt",
            "inpainting": False,
            "style": "generalist",
            "nsfw": False,
            "config": {"files": [{"path": f"{name}.safetensors", "sha256sum": digest}], "download": []},
        }
        for name in names
    }
    (dest / "reference.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    return first
