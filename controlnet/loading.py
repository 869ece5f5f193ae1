"""ControlNet files -> a diffusers ControlNetModel that fits the job's base model.

The three layouts people download are told apart by their keys, never by the file name (the horde's
reference saves kohya-ss's *diff* modules under `control_*_fp16` names):

* full: the original layout, `control_model.*` (lllyasviel's control_sd15_*, webui's control_*-fp16), or the
  same without the prefix (thibaud's SD 2.1 ControlNets);
* diff: the original layout plus a `difference` marker: the weights the ControlNet shares with the UNet's
  encoder (time embedding, conv_in, input blocks, middle block) hold ControlNet minus SD1.5, and become a
  ControlNet only once the base model's own UNet weights are added (kohya-ss/ControlNet-diff-modules, the
  horde's `diff_control_sd*` files): the result belongs to that base model;
* diffusers: a ControlNetModel's own state dict (`controlnet_cond_embedding.*`).

The architecture is the base UNet's encoder (what `ControlNetModel.from_unet` copies), with the hint
encoder's widths read from the file. Modules are built on the meta device and take the file's tensors, so
a 1.4 GB ControlNet is never initialised at random first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FULL, DIFF, DIFFUSERS = "full", "diff", "diffusers"
DIFF_MARKER = "difference"
_LDM_PREFIX = "control_model."
_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class ControlNetLoadError(RuntimeError):
    """A ControlNet file that cannot become a ControlNet for this base model (bad file, other shapes)."""


def read_keys(path: Path) -> list[str]:
    """The tensor names of a weight file (safetensors: from the header only, without reading weights)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(read_state_dict(path))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same fault for the job
        raise ControlNetLoadError(f"{path.name} is not a readable weight file: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ControlNetLoadError(f"{path.name} holds no state dict")
    return state


def file_format(keys: list[str] | dict[str, Any]) -> str:
    names = set(keys)
    if _DIFFUSERS_KEY in names:
        return DIFFUSERS
    if not any(k.startswith(_LDM_PREFIX) or k.startswith("input_hint_block.") for k in names):
        raise ControlNetLoadError("not a ControlNet: no control_model / input_hint_block weights")
    return DIFF if DIFF_MARKER in names else FULL


def estimated_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the ControlNet takes in `dtype` (from the safetensors header; the file size otherwise)."""
    if path.suffix != ".safetensors":
        return path.stat().st_size
    from safetensors import safe_open

    element = torch.tensor([], dtype=dtype).element_size()
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
            if key != DIFF_MARKER:
                shape = handle.get_slice(key).get_shape()
                total += int(torch.Size(shape).numel()) * element
    return total


def build_controlnet(path: Path, unet: Any, dtype: torch.dtype) -> Any:
    """The ControlNet of `path` for the base model whose UNet is `unet` (diff files: materialised against
    it), in RAM, in `dtype`, eval mode."""
    state = read_state_dict(path)
    fmt = file_format(state)
    converted = _to_diffusers(state, unet, fmt)
    if fmt == DIFF:
        _add_base_weights(converted, unet, path)
    model = _empty_controlnet(unet, converted, path)
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0]
        raise ControlNetLoadError(f"{path.name} does not fit this model's UNet: {first}") from exc
    logger.info("controlnet: %s (%s format) built for a %d-channel UNet", path.name, fmt,
                unet.config.block_out_channels[0])
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _to_diffusers(state: dict[str, torch.Tensor], unet: Any, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == DIFFUSERS:
        return dict(state)
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(state, {"layers_per_block": unet.config.layers_per_block})
    missing = sorted(k for k, v in converted.items() if v is None)
    if missing:
        raise ControlNetLoadError(
            f"incomplete ControlNet: {len(missing)} weights missing (e.g. {missing[0]})"
        )
    return converted


@torch.no_grad()
def _add_base_weights(converted: dict[str, torch.Tensor], unet: Any, path: Path) -> None:
    """diff + base = ControlNet, for every weight the ControlNet shares with the UNet's encoder. Summed in
    float32 on the CPU: the sum is what a ControlNet trained on this model would start from."""
    base = unet.state_dict()
    added = 0
    for key, delta in converted.items():
        weight = base.get(key)
        if weight is None:
            continue
        if weight.shape != delta.shape:
            raise ControlNetLoadError(
                f"{path.name}: {key} is {tuple(delta.shape)}, the model's UNet has {tuple(weight.shape)}"
            )
        converted[key] = delta.float() + weight.detach().to("cpu", torch.float32)
        added += 1
    if not added:
        raise ControlNetLoadError(f"{path.name} is a diff ControlNet that shares no weight with this model")


def _empty_controlnet(unet: Any, converted: dict[str, torch.Tensor], path: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    try:
        hint = [converted["controlnet_cond_embedding.conv_in.weight"]]
        blocks = sorted(
            (int(k.split(".")[2]), v) for k, v in converted.items()
            if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")
        )
        hint += [v for i, v in blocks if i % 2 == 1]
        channels = tuple(int(w.shape[0]) for w in hint)
        conditioning = int(hint[0].shape[1])
    except KeyError as exc:
        raise ControlNetLoadError(f"{path.name} has no hint encoder ({exc})") from exc
    with init_empty_weights():
        return ControlNetModel.from_unet(
            unet, load_weights_from_unet=False, conditioning_embedding_out_channels=channels,
            conditioning_channels=conditioning,
        )


def weight_file(files: list[Path]) -> Path:
    """The ControlNet weights among a record's files (the others are ldm yaml configs)."""
    for path in files:
        if path.suffix.lower() in WEIGHT_SUFFIXES:
            return path
    raise ControlNetLoadError("the record lists no weight file")
