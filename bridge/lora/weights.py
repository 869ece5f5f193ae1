"""Reading LoRA files and textual-inversion embeddings into tensors a model can take.

LoRA: the file's keys are mapped onto the model's module names by diffusers' own converters
(`lora_state_dict`, which knows kohya's `lora_unet_*` / `lora_te_*` / `lora_te1_*` / `lora_te2_*` keys, SDXL's
`input_blocks` numbering and diffusers' own layouts, then `convert_*_state_dict_to_peft`). Each module's alpha
is folded into its `up` matrix first (kohya: delta = up @ down * alpha / rank), so the result is plain
(up, down) pairs per module of `unet`, `text_encoder` and `text_encoder_2`.

TI: A1111 files (`emb_params` in a .safetensors, `string_to_param` in a .pt), diffusers' `{token: vector}` and
SDXL's `clip_l` / `clip_g` pairs. Vectors are matched to a text encoder by width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_PAIR_NAMES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
_UNSUPPORTED_MARKERS = ("hada_", "lokr_", ".oft_", "lora_mid")  # LyCORIS LoHa / LoKr / OFT / Tucker


class LoraFormatError(ValueError):
    """The file holds no LoRA weights this worker can apply (unknown or unsupported layout, corrupt)."""


@dataclass(frozen=True)
class LoraPair:
    """Kept in float32 and flattened to 2-D when read, so merging is one matmul-add per weight."""

    up: torch.Tensor  # [out, rank], alpha / rank already folded in
    down: torch.Tensor  # [rank, in * kh * kw]

    @property
    def numel(self) -> int:
        return self.up.shape[0] * self.down.shape[1]

    def delta(self) -> torch.Tensor:
        """up @ down, [out, in * kh * kw]."""
        return self.up @ self.down


@dataclass
class LoraWeights:
    """One LoRA file: (component, module name) -> its low-rank pair."""

    pairs: dict[tuple[str, str], LoraPair] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(
            p.up.numel() * p.up.element_size() + p.down.numel() * p.down.element_size()
            for p in self.pairs.values()
        )

    def components(self) -> set[str]:
        return {component for component, _ in self.pairs}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a .pt/.bin unpickled as tensors only (a pickle carrying code is refused)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise LoraFormatError(f"{path.name} is not a readable .safetensors file: {exc}") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
        raise LoraFormatError(f"{path.name} is not a plain tensor file: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, dict):
        raise LoraFormatError(f"{path.name} holds a {type(loaded).__name__}, not a dict of tensors")
    return loaded


def _fold_alphas(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Multiply each module's up matrix by alpha / rank and drop the alpha keys."""
    out = {k: v for k, v in raw.items() if not k.endswith(".alpha")}
    for key in raw:
        if not key.endswith(".alpha"):
            continue
        base = key[: -len(".alpha")]
        for down_name, up_name in _PAIR_NAMES:
            down, up = out.get(base + down_name), out.get(base + up_name)
            if down is not None and up is not None:
                alpha = float(raw[key].float().reshape(-1)[0])
                out[base + up_name] = up.float() * (alpha / down.shape[0])
                break
    return out


def _pipeline_class(sdxl: bool) -> type:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def parse_lora(path: Path, *, sdxl: bool, unet_config: object | None = None) -> LoraWeights:
    """The file's (up, down) pairs keyed by the diffusers module names of unet / text_encoder(s)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    raw = read_tensors(path)
    unsupported = sorted({m for m in _UNSUPPORTED_MARKERS for k in raw if m in k})
    if unsupported:
        kinds = ", ".join(unsupported)
        raise LoraFormatError(f"{path.name} is a LyCORIS variant ({kinds}) this worker cannot apply")
    raw = {k: v for k, v in raw.items() if "dora_scale" not in k and isinstance(v, torch.Tensor)}
    try:
        converted, _ = _pipeline_class(sdxl).lora_state_dict(_fold_alphas(raw), unet_config=unet_config)
    except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/KeyError/IndexError on odd layouts
        raise LoraFormatError(f"{path.name}: diffusers cannot read this LoRA layout: {exc}") from exc
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        prefix, _, rest = key.partition(".")
        if prefix not in COMPONENTS:  # diffusers' oldest layout: bare unet keys
            prefix, rest = "unet", key
        groups.setdefault(prefix, {})[rest] = value
    weights = LoraWeights()
    for component, state in groups.items():
        if component == "unet":
            peft = convert_unet_state_dict_to_peft(state)
        else:
            peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        for key, down in peft.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            up = peft.get(module + ".lora_B.weight")
            if up is not None and up.shape[1] == down.shape[0]:
                pair = LoraPair(
                    up=up.float().flatten(1).contiguous(), down=down.float().flatten(1).contiguous()
                )
                weights.pairs[(component, module)] = pair
    if not weights.pairs:
        raise LoraFormatError(f"{path.name} holds no LoRA weights in a layout this worker knows")
    return weights


# --- textual inversion ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TiEmbedding:
    """A TI's vectors, one [n, width] tensor per text-encoder width it was trained for."""

    by_width: dict[int, torch.Tensor]

    def vectors_for(self, width: int) -> torch.Tensor | None:
        return self.by_width.get(width)

    @property
    def count(self) -> int:
        return max(v.shape[0] for v in self.by_width.values())


def parse_ti(path: Path) -> TiEmbedding:
    raw = read_tensors(path)
    candidates: list[torch.Tensor] = []
    params = raw.get("string_to_param")
    if isinstance(params, dict):  # A1111 .pt
        candidates += [v for v in params.values() if isinstance(v, torch.Tensor)]
    else:
        candidates += [v for v in raw.values() if isinstance(v, torch.Tensor)]
    by_width: dict[int, torch.Tensor] = {}
    for tensor in candidates:
        vectors = tensor.detach().float()
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not vectors.shape[0] or vectors.shape[0] > 75:
            continue
        by_width.setdefault(int(vectors.shape[1]), vectors)
    if not by_width:
        raise LoraFormatError(f"{path.name} holds no textual-inversion vectors")
    return TiEmbedding(by_width)
