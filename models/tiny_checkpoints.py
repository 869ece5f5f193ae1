"""Single-file checkpoints in the exact layouts of the files volunteers download, with tiny random weights.

Each builder writes what the real file holds, at reduced size where shape does not matter:
- SD 1.x training `.ckpt` (CompVis/Stability era): `epoch`, `global_step` as a numpy int64, the Lightning
  version, a `callbacks` dict keyed by the pickled `ModelCheckpoint` class, and a `state_dict` holding the
  weights, their EMA copies (`model_ema.<name without dots>`, `model_ema.decay`, `model_ema.num_updates`)
  and the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...);
- SD 2.x 768-v `.ckpt`: OpenCLIP text encoder (`cond_stage_model.model.*`), v-prediction, its
  `v2-inference-v.yaml` listed beside it as the horde's reference lists it;
- SD 1.x inpainting `.ckpt`: 9-channel UNet;
- CivitAI-style fp16 `.safetensors`, with and without the `model_ema` keys;
- SDXL single-file `.safetensors` (`conditioner.embedders.0/1`);
- the pre-zip legacy pickle format (`torch.save(..., _use_new_zipfile_serialization=False)`).
Each comes with its own component-config folder whose pipeline class and scheduler are those of the
shipped family (`models/configs/<family>`), so the config a loaded pipeline ends up with is the family's.

Lightning is never installed: its classes are pickled from stand-in modules that exist only while writing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.tiny import _file_specs, _save_config_folder, pipeline_to_ldm, tiny_pipeline

LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


@contextlib.contextmanager
def lightning_classes() -> Iterator[type]:
    """A stand-in `ModelCheckpoint` importable by its Lightning name only while the pickle is written."""
    parts = LIGHTNING_CALLBACK.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts))]
    added = [n for n in names if n not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    cls = type(parts[-1], (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls  # type: ignore[attr-defined]
    try:
        yield cls
    finally:
        for name in added:
            sys.modules.pop(name, None)


def ema_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LitEma's buffers: each UNet weight under `model_ema.` with the dots of its name removed."""
    out = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000)}
    for key, value in state.items():
        if key.startswith("model.diffusion_model."):
            out["model_ema." + key.removeprefix("model.").replace(".", "")] = value.clone()
    return out


def schedule_buffers() -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    values = {"betas": betas, "alphas_cumprod": alphas}
    return {name: values.get(name, alphas).float() for name in _SCHEDULE_BUFFERS}


def save_training_ckpt(state: dict[str, torch.Tensor], path: Path, *, legacy: bool = False) -> None:
    """A Lightning training checkpoint as the SD 1.x releases ship it."""
    with lightning_classes() as checkpoint_cls:
        body = {
            "epoch": 6,
            "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "state_dict": {**state, **ema_copies(state), **schedule_buffers()},
            "callbacks": {
                checkpoint_cls: {
                    "monitor": None,
                    "best_model_score": None,
                    "best_model_path": "",
                    "current_score": None,
                    "dirpath": "/fsx/stable-diffusion/logs/checkpoints",
                }
            },
        }
        torch.save(body, path, _use_new_zipfile_serialization=not legacy)


def _config_folder(pipe: Any, folder: Path, work: Path, family: str) -> None:
    """The tiny pipeline's component configs, with the shipped family's pipeline class and scheduler."""
    from models.loading import CONFIGS_DIR

    _save_config_folder(pipe, folder, work)
    shipped = CONFIGS_DIR / family
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    shipped_index = json.loads((shipped / "model_index.json").read_text(encoding="utf-8"))
    index["_class_name"] = shipped_index["_class_name"]
    index["scheduler"] = shipped_index["scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    shutil.rmtree(folder / "scheduler")
    shutil.copytree(shipped / "scheduler", folder / "scheduler")


def _fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def build_checkpoint_fixtures(dest: Path) -> Path:
    """Write every fixture into `dest` and a reference file (stable_diffusion.json shape) listing them."""
    from safetensors.torch import save_file

    dest = Path(dest)
    work = dest / ".work"
    work.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}

    def record(name: str, files: list[Path], config: str, **fields: Any) -> None:
        records[name] = {
            "name": name, "type": "ckpt", "baseline": "stable diffusion 1", "inpainting": False,
            "style": "generalist", "nsfw": False, "version": "1",
            "config": {"files": _file_specs(dest, files), "download": []}, "diffusers_config": config,
            **fields,
        }  # fmt: skip

    sd1 = tiny_pipeline("sd1", seed=11, work=work)
    _config_folder(sd1, dest / "sd1-config", work, "sd1")
    save_training_ckpt(pipeline_to_ldm(sd1), dest / "sd-v1-4.ckpt")
    record("training-sd1", [dest / "sd-v1-4.ckpt", dest / "sd1-config"], "sd1-config")
    save_training_ckpt(pipeline_to_ldm(sd1), dest / "legacy-sd1.ckpt", legacy=True)
    record("legacy-sd1", [dest / "legacy-sd1.ckpt"], "sd1-config")
    save_file(_fp16(pipeline_to_ldm(sd1)), str(dest / "civitai-fp16.safetensors"), metadata={"format": "pt"})
    record("civitai-fp16", [dest / "civitai-fp16.safetensors"], "sd1-config", type="safetensors")
    with_ema = {**pipeline_to_ldm(sd1), **ema_copies(pipeline_to_ldm(sd1))}
    save_file(_fp16(with_ema), str(dest / "civitai-fp16-ema.safetensors"), metadata={"format": "pt"})
    record("civitai-fp16-ema", [dest / "civitai-fp16-ema.safetensors"], "sd1-config", type="safetensors")

    sd2 = tiny_pipeline("sd2", seed=12, work=work)
    _config_folder(sd2, dest / "sd2-v-config", work, "sd2-v")
    torch.save(
        {"global_step": 110000, "state_dict": {**pipeline_to_ldm(sd2, open_clip=True), **schedule_buffers()}},
        dest / "768-v-ema.ckpt",
    )
    (dest / "v2-inference-v.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    record("sd2-768-v", [dest / "768-v-ema.ckpt", dest / "v2-inference-v.yaml"], "sd2-v-config",
           baseline="stable diffusion 2", version="2.1")

    inpainting = tiny_pipeline("inpainting", seed=13, work=work)
    _config_folder(inpainting, dest / "sd1-inpainting-config", work, "sd1-inpainting")
    body = {"global_step": 440000, "state_dict": pipeline_to_ldm(inpainting)}
    torch.save(body, dest / "sd-v1-5-inpainting.ckpt")
    record("inpainting-sd1", [dest / "sd-v1-5-inpainting.ckpt"], "sd1-inpainting-config", inpainting=True,
           style="inpainting")

    sdxl = tiny_pipeline("sdxl", seed=14, work=work)
    _config_folder(sdxl, dest / "sdxl-config", work, "sdxl")
    xl_file = dest / "sd_xl_base_1.0.safetensors"
    save_file(_fp16(pipeline_to_ldm(sdxl)), str(xl_file), metadata={"format": "pt"})
    record("sdxl-single", [dest / "sd_xl_base_1.0.safetensors"], "sdxl-config", type="safetensors",
           baseline="stable_diffusion_xl")

    shutil.rmtree(work)
    reference = dest / "stable_diffusion.json"
    reference.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return reference
