"""Tiny LoRAs and textual inversions for the tiny models, in the layouts of the files CivitAI serves.

LoRA: kohya's keys (`lora_unet_<module>` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`), the unet
as diffusers names it for SD 1/2 files and by the original `input_blocks` / `middle_block` / `output_blocks`
numbering for SDXL files; text encoders as `lora_te_text_model_*` (SDXL: `lora_te1_*` and `lora_te2_*`). The
targets are kohya's: every Linear and 1x1 conv inside the unet's transformer blocks, the text encoders'
attention and MLP projections. TI: A1111's `emb_params` (SD 1/2) and SDXL's `clip_l` / `clip_g`.

Only for tests, benchmarks and the demo: nothing in the loading code imports this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _unet_targets(unet: Any) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    targets = []
    for name, module in unet.named_modules():
        if not isinstance(module, Transformer2DModel):
            continue
        for sub, layer in module.named_modules():
            conv_1x1 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1)
            if isinstance(layer, torch.nn.Linear) or conv_1x1:
                targets.append((f"{name}.{sub}", layer))
    return targets


def _text_targets(encoder: Any) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            # Files name the layers as transformers 4 did: under text_model.
            out.append(("text_model." + name.removeprefix("text_model."), module))
    return out


def _pair(layer: torch.nn.Module, rank: int, scale: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    if isinstance(layer, torch.nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, 1, 1, generator=gen)
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, layer.in_features, generator=gen)
        up = torch.randn(layer.out_features, rank, generator=gen)
    return down * scale, up * scale


def kohya_lora(pipe: Any, *, seed: int, rank: int = 4, scale: float = 0.3, alpha: float = 2.0) -> dict:
    """A LoRA for `pipe`'s architecture in kohya's key layout (fp16, as most CivitAI files are)."""
    from models.tiny import _split_prefix, _unet_key_map

    gen = torch.Generator().manual_seed(seed)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    pairs = _unet_key_map(pipe.unet) if sdxl else {}
    state: dict[str, torch.Tensor] = {}

    def put(key: str, layer: torch.nn.Module) -> None:
        down, up = _pair(layer, rank, scale, gen)
        state[key + ".lora_down.weight"] = down.half()
        state[key + ".lora_up.weight"] = up.half()
        state[key + ".alpha"] = torch.tensor(alpha).half()

    for name, layer in _unet_targets(pipe.unet):
        if sdxl:
            _, ldm, rest = _split_prefix(name + ".", pairs)
            name = (ldm + rest).rstrip(".")
        put("lora_unet_" + name.replace(".", "_"), layer)
    encoders = (
        [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
        if sdxl
        else [("lora_te_", pipe.text_encoder)]
    )
    for prefix, encoder in encoders:
        for name, layer in _text_targets(encoder):
            put(prefix + name.replace(".", "_"), layer)
    return state


def a1111_ti(pipe: Any, *, seed: int, vectors: int = 2, scale: float = 1.0) -> dict:
    """A TI for `pipe`'s text encoder(s): `emb_params`, or SDXL's `clip_l` + `clip_g`."""
    gen = torch.Generator().manual_seed(seed)

    def rows(encoder: Any) -> torch.Tensor:
        return torch.randn(vectors, int(encoder.config.hidden_size), generator=gen) * scale

    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"clip_l": rows(pipe.text_encoder), "clip_g": rows(pipe.text_encoder_2)}
    return {"emb_params": rows(pipe.text_encoder)}


# --- a catalogue for the CivitAI stand-in -------------------------------------------------------------


@dataclass(frozen=True)
class TinyItem:
    model_id: int
    version_id: int
    name: str
    kind: str  # "LORA" | "TextualInversion"
    base_model: str
    path: Path
    trained_words: list[str] = field(default_factory=list)
    nsfw: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def save_safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def build_tiny_extras(dest: Path) -> list[TinyItem]:
    """LoRAs and TIs for tiny-sd1 (SD 1.5), the tiny SD2 models (SD 2.1) and a tiny SDXL, written into
    `dest` once (same seeds, same bytes)."""
    from models.tiny import tiny_pipeline

    dest = Path(dest)
    work = dest / "work"
    sd1, sd2, sdxl = (tiny_pipeline(kind, seed=0, work=work) for kind in ("sd1", "depth", "sdxl"))
    specs = [
        (1001, 2001, "Tiny Glow", "LORA", "SD 1.5", sd1, ["glowing", "neon light", "glowstick"], False),
        (1002, 2002, "Tiny Ink", "LORA", "SD 1.5", sd1, ["ink sketch"], False),
        (1003, 2003, "Tiny XL Detail", "LORA", "SDXL 1.0", sdxl, ["xl detail"], False),
        (1004, 2004, "Tiny Depth Style", "LORA", "SD 2.1", sd2, [], False),
        (1005, 2005, "Tiny Spicy", "LORA", "SD 1.5", sd1, ["spicy"], True),
        (1101, 2101, "tinyneg", "TextualInversion", "SD 1.5", sd1, ["tinyneg"], False),
        (1102, 2102, "tinyxlneg", "TextualInversion", "SDXL 1.0", sdxl, ["tinyxlneg"], False),
    ]
    items = []
    for model_id, version_id, name, kind, base, pipe, words, nsfw in specs:
        path = dest / f"{name.replace(' ', '_')}_{version_id}.safetensors"
        if not path.is_file():
            state = kohya_lora(pipe, seed=version_id) if kind == "LORA" else a1111_ti(pipe, seed=version_id)
            save_safetensors(state, path)
        items.append(TinyItem(model_id, version_id, name, kind, base, path, words, nsfw))
    return items


def add_to_standin(civitai: Any, items: list[TinyItem]) -> None:
    """Publish the items on a `local_horde.civitai.CivitaiStandIn`."""
    for item in items:
        civitai.add_model(
            model_id=item.model_id,
            version_id=item.version_id,
            name=item.name,
            kind=item.kind,
            base_model=item.base_model,
            data=item.path.read_bytes(),
            file_name=item.path.name,
            trained_words=item.trained_words,
            nsfw=item.nsfw,
        )
