"""The real-shape SD1.5 weights the benchmarks build: random values in the original LDM key layout.

One builder for every benchmark that needs an SD1.5 checkpoint as people download it (bench.model_swap,
bench.first_start_models, bench.ckpt_load); each writes it in its own file layout.
"""

from __future__ import annotations

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
