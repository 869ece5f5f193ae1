"""Tiny random-weight Stable Diffusion models (real diffusers classes, ~1-5 MB each) and a reference file
listing them, so that tests, the demo and benchmarks exercise the real loading code without any download.

    python -m models.tiny DEST        # builds once into DEST, prints DEST/reference.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REFERENCE_NAME = "reference.json"
TINY_NAMES = (
    "tiny-sd1",
    "tiny-sd1-diffusers",
    "tiny-sd2-depth",
    "tiny-inpainting",
    "tiny-sdxl",
    "tiny-sdxl-inpainting",
)
# Bump when what is built changes: an older build in DEST is then rebuilt.
BUILD_VERSION = 2
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


# --- components -----------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: each byte as a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _tokenizer_files(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary small enough to write by hand: every byte, every byte + </w>,
    a few merges and the two special tokens (the real one has 49408 entries)."""
    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "r")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    body = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(body, encoding="utf-8")


def _tokenizer(work: Path) -> Any:
    from transformers import CLIPTokenizer

    _tokenizer_files(work / "tiny-tokenizer")
    return CLIPTokenizer(
        vocab=str(work / "tiny-tokenizer" / "vocab.json"),
        merges=str(work / "tiny-tokenizer" / "merges.txt"),
        model_max_length=77,
    )


def _text_encoder(tokenizer: Any, *, with_projection: bool = False, hidden_size: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _unet(in_channels: int, *, sd2: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=8,
    ).eval()


def _sdxl_unet(in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    # Cross-attention 96 = both text encoders' hidden sizes (32 + 64); the added-condition input is the
    # second encoder's 32-wide pooled projection plus six 8-wide time ids.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=96,
        norm_num_groups=8,
    ).eval()


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four blocks keep Stable Diffusion's x8 latent factor, so 64x64 images have 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def _scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _depth_estimator() -> tuple[Any, Any]:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(16, 16, 32, 32),
        fusion_hidden_size=16,
        is_hybrid=False,
        head_in_index=-1,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_pad=False)
    return DPTForDepthEstimation(config).eval(), processor


def tiny_pipeline(kind: str, seed: int, work: Path) -> Any:
    """A tiny random-weight pipeline: kind is "sd1", "sd2", "inpainting", "depth", "sdxl" or
    "sdxl-inpainting"."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer = _tokenizer(work)
    common = {
        "vae": _vae(),
        "text_encoder": _text_encoder(tokenizer),
        "tokenizer": tokenizer,
    }
    if kind in ("sdxl", "sdxl-inpainting"):
        inpainting = kind == "sdxl-inpainting"
        cls = diffusers.StableDiffusionXLPipeline
        if inpainting:
            cls = diffusers.StableDiffusionXLInpaintPipeline
        extra = {"requires_aesthetics_score": False} if inpainting else {}
        return cls(
            unet=_sdxl_unet(9 if inpainting else 4),
            scheduler=diffusers.EulerDiscreteScheduler.from_config(_scheduler().config),
            # diffusers tells SDXL's two encoders apart by width, as the real ones (768, 1280) differ.
            text_encoder_2=_text_encoder(tokenizer, with_projection=True, hidden_size=64),
            tokenizer_2=tokenizer,
            **common,
            **extra,
        )
    if kind == "depth":
        estimator, processor = _depth_estimator()
        return diffusers.StableDiffusionDepth2ImgPipeline(
            unet=_unet(5, sd2=True),
            scheduler=_scheduler(),
            depth_estimator=estimator,
            feature_extractor=processor,
            **common,
        )
    cls = (
        diffusers.StableDiffusionInpaintPipeline
        if kind == "inpainting"
        else diffusers.StableDiffusionPipeline
    )
    return cls(
        unet=_unet(9 if kind == "inpainting" else 4, sd2=kind == "sd2"),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **common,
    )


# --- diffusers -> original LDM key layout -------------------------------------------------------------


def _unet_key_map(unet: Any) -> dict[str, str]:
    """diffusers UNet prefix -> LDM prefix, for any number of blocks and layers per block."""
    cfg = unet.config
    layers = cfg.layers_per_block
    blocks = len(cfg.block_out_channels)
    pairs = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for i in range(blocks):
        for j in range(layers):
            pairs[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.0."
            pairs[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.1."
        pairs[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        up_has_attention = "CrossAttn" in cfg.up_block_types[i]
        for j in range(layers + 1):
            pairs[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (layers + 1) + j}.0."
            pairs[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (layers + 1) + j}.1."
        upsampler = f"output_blocks.{i * (layers + 1) + layers}.{2 if up_has_attention else 1}."
        pairs[f"up_blocks.{i}.upsamplers.0."] = upsampler
    return pairs


_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _split_prefix(key: str, pairs: dict[str, str]) -> tuple[str, str, str]:
    """(hf prefix, its ldm prefix, rest of the key); the longest matching prefix wins."""
    for hf in sorted(pairs, key=len, reverse=True):
        if key.startswith(hf):
            return hf, pairs[hf], key[len(hf) :]
    return "", "", key


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    pairs = _unet_key_map(unet)
    out = {}
    for key, value in unet.state_dict().items():
        hf, sd, rest = _split_prefix(key, pairs)
        if "resnets." in hf:
            _, part, tail = _split_prefix(rest, _RESNET_PARTS)
            rest = part + tail
        out["model.diffusion_model." + sd + rest] = value
    return out


def _vae_key_map(vae: Any) -> dict[str, str]:
    blocks = len(vae.config.block_out_channels)
    pairs = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for side in ("encoder", "decoder"):
        pairs[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for k in range(2):
            pairs[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
    for i in range(blocks):
        for j in range(vae.config.layers_per_block + 1):
            pairs[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            pairs[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
        pairs[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        pairs[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."
    return pairs


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    pairs = _vae_key_map(vae)
    out = {}
    for key, value in vae.state_dict().items():
        hf, sd, rest = _split_prefix(key, pairs)
        if "resnets." in hf:
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        elif "attentions." in hf:
            _, part, tail = _split_prefix(rest, _VAE_ATTENTION_PARTS)
            rest = part + tail
            if value.ndim == 2:  # the original VAE attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + sd + rest] = value
    return out


def text_encoder_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level that original checkpoints keep.
        inner = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + inner] = value
    return out


_OPEN_CLIP_PARTS = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def text_encoder_to_open_clip(
    text_encoder: Any, prefix: str = "cond_stage_model.model."
) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in the OpenCLIP layout of SD 2.x (and SDXL's second encoder, with its
    projection) checkpoints, q/k/v fused into `in_proj`."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    for i in range(text_encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(layer)]:
            _, part, tail = _split_prefix(key[len(layer) :], _OPEN_CLIP_PARTS)
            out[block + part + tail] = state.pop(key)
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T
    return out


def pipeline_to_ldm(pipe: Any, *, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """A Stable Diffusion pipeline's weights in the original single-file (LDM) key layout; `open_clip`
    writes the text encoder as SD 2.x checkpoints do."""
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP ViT-L and OpenCLIP bigG
        first = "conditioner.embedders.0.transformer."
        for key, value in text_encoder_to_ldm(pipe.text_encoder).items():
            state[first + key.removeprefix("cond_stage_model.transformer.")] = value
        state.update(text_encoder_to_open_clip(pipe.text_encoder_2, prefix="conditioner.embedders.1.model."))
    elif open_clip:
        state.update(text_encoder_to_open_clip(pipe.text_encoder))
    else:
        state.update(text_encoder_to_ldm(pipe.text_encoder))
    return {k: v.detach().contiguous() for k, v in state.items()}


# --- building -------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save_config_folder(pipe: Any, folder: Path, work: Path) -> None:
    """Component configs and tokenizer, no weights: what `from_single_file(config=)` reads."""
    full = work / f"{folder.name}-full"
    pipe.save_pretrained(full, safe_serialization=True)
    for src in full.rglob("*"):
        if src.is_file() and src.suffix not in _WEIGHT_SUFFIXES:
            target = folder / src.relative_to(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _file_specs(dest: Path, paths: list[Path]) -> list[dict[str, str]]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    # Verification writes `.sha256` sidecars next to files; they are not part of the model.
    return [
        {"path": f.relative_to(dest).as_posix(), "sha256sum": _sha256(f)}
        for f in files
        if not f.name.endswith(".sha256")
    ]


def _record(name: str, dest: Path, paths: list[Path], **fields: Any) -> dict[str, Any]:
    files = _file_specs(dest, paths)
    record = {
        "name": name,
        "baseline": "stable diffusion 1",
        "type": "ckpt",
        "inpainting": False,
        "description": f"Tiny random-weight test model ({name}); draws noise.",
        "version": "1",
        "style": "generalist",
        "nsfw": False,
        "download_all": False,
        "config": {"files": files, "download": []},
        "size_on_disk_bytes": sum((dest / f["path"]).stat().st_size for f in files),
    }
    record.update(fields)
    return record


def _build_all(dest: Path, work: Path) -> dict[str, dict[str, Any]]:
    from safetensors.torch import save_file

    records: dict[str, dict[str, Any]] = {}

    sd1 = tiny_pipeline("sd1", seed=1, work=work)
    save_file(pipeline_to_ldm(sd1), str(dest / "tiny-sd1.safetensors"))
    _save_config_folder(sd1, dest / "tiny-sd1-config", work)
    paths = [dest / "tiny-sd1.safetensors", dest / "tiny-sd1-config"]
    records["tiny-sd1"] = _record("tiny-sd1", dest, paths, diffusers_config="tiny-sd1-config")

    folder = tiny_pipeline("sd1", seed=2, work=work)
    folder.save_pretrained(dest / "tiny-sd1-diffusers", safe_serialization=True)
    paths = [dest / "tiny-sd1-diffusers"]
    records["tiny-sd1-diffusers"] = _record("tiny-sd1-diffusers", dest, paths, type="diffusers")

    depth = tiny_pipeline("depth", seed=3, work=work)
    depth.save_pretrained(dest / "tiny-sd2-depth", safe_serialization=True)
    records["tiny-sd2-depth"] = _record(
        "tiny-sd2-depth",
        dest,
        [dest / "tiny-sd2-depth"],
        type="diffusers",
        baseline="stable diffusion 2",
        style="depth2img",
        version="2",
    )

    inpainting = tiny_pipeline("inpainting", seed=4, work=work)
    # A .ckpt (zip pickle of tensors only) exercises the weights_only loading path.
    torch.save({"state_dict": pipeline_to_ldm(inpainting)}, dest / "tiny-inpainting.ckpt")
    _save_config_folder(inpainting, dest / "tiny-inpainting-config", work)
    records["tiny-inpainting"] = _record(
        "tiny-inpainting",
        dest,
        [dest / "tiny-inpainting.ckpt", dest / "tiny-inpainting-config"],
        inpainting=True,
        diffusers_config="tiny-inpainting-config",
    )

    # SDXL single files (both text encoders in the checkpoint, `conditioner.embedders.*`), as the horde's
    # 49 SDXL models are; the inpainting one has SDXL inpainting 1.0's 9-channel UNet.
    for name, kind, seed in (("tiny-sdxl", "sdxl", 5), ("tiny-sdxl-inpainting", "sdxl-inpainting", 6)):
        xl = tiny_pipeline(kind, seed=seed, work=work)
        save_file(pipeline_to_ldm(xl), str(dest / f"{name}.safetensors"))
        _save_config_folder(xl, dest / f"{name}-config", work)
        records[name] = _record(
            name,
            dest,
            [dest / f"{name}.safetensors", dest / f"{name}-config"],
            baseline="stable_diffusion_xl",
            inpainting=kind == "sdxl-inpainting",
            version="1.0",
            diffusers_config=f"{name}-config",
        )
    return records


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    # Several test processes may build into one shared folder at once: one builds, the others wait.
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / ".build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_built(dest: Path) -> bool:
    marker, reference = dest / ".tiny-build", dest / REFERENCE_NAME
    if not (marker.is_file() and reference.is_file()):
        return False
    if marker.read_text().strip() != str(BUILD_VERSION):
        return False
    records = json.loads(reference.read_text(encoding="utf-8"))
    return set(TINY_NAMES) <= set(records) and all(
        (dest / f["path"]).is_file() for r in records.values() for f in r["config"]["files"]
    )


def build_tiny_models(dest: Path) -> Path:
    """Build the tiny models into `dest` once and return the path of the reference json listing them
    (stable_diffusion.json shape; `files[].path` relative to the json's folder, real sha256)."""
    dest = Path(dest).resolve()
    with _exclusive(dest):
        if _is_built(dest):
            return dest / REFERENCE_NAME
        logger.info("building tiny models into %s", dest)
        for name in [
            *TINY_NAMES,
            "tiny-sd1.safetensors",
            "tiny-inpainting.ckpt",
            "tiny-sd1-config",
            "tiny-inpainting-config",
            *(f"{xl}{suffix}" for xl in ("tiny-sdxl", "tiny-sdxl-inpainting")
              for suffix in (".safetensors", "-config")),
        ]:  # fmt: skip
            target = dest / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        with tempfile.TemporaryDirectory(dir=dest, prefix=".work-") as work:
            records = _build_all(dest, Path(work))
        tmp = dest / f".{REFERENCE_NAME}.tmp"
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        os.replace(tmp, dest / REFERENCE_NAME)
        (dest / ".tiny-build").write_text(str(BUILD_VERSION))
        return dest / REFERENCE_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to build into (reused when already built)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.write(f"{build_tiny_models(args.dest)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
