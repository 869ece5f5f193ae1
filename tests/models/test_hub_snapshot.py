"""Diffusers-shape records (hf_path): listed on a hub stand-in, downloaded, verified, loaded."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from models.device import DevicePolicy
from models.downloads import Downloader, is_ready, model_dir
from models.hub_snapshot import select_files
from models.loading import load_pipeline
from models.records import parse_reference
from tests.models.test_downloads import server  # noqa: F401 - the Range-capable file server fixture

REVISION = "0123abcd"
REPO = "tiny/depth"


def test_select_files_keeps_one_torch_pipeline():
    names = [
        "model_index.json", "README.md", "512-depth-ema.ckpt", "v2-depth.png",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
        "onnx/unet/model.onnx", "unet/diffusion_flax_model.msgpack",
    ]  # fmt: skip
    listing = {"sha": REVISION, "siblings": [{"rfilename": n} for n in names]}
    listing["siblings"][5]["lfs"] = {"sha256": "ab" * 32}
    chosen = {f.path: f for f in select_files(REPO, listing, endpoint="http://hub")}
    assert set(chosen) == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "scheduler/scheduler_config.json",
    }  # fmt: skip
    weights = chosen["unet/diffusion_pytorch_model.safetensors"]
    assert weights.sha256 == "ab" * 32
    assert weights.url == f"http://hub/{REPO}/resolve/{REVISION}/unet/diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="model_index.json"):
        select_files(REPO, {"siblings": [{"rfilename": "unet/config.json"}]})


def _publish(folder: Path, served: Path, *, corrupt: str | None = None) -> None:
    """Lay a diffusers folder out as the hub serves it: the API listing and resolve/<revision>/ files."""
    siblings = [{"rfilename": "README.md"}]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".sha256")):
        rel = path.relative_to(folder).as_posix()
        target = served / REPO / "resolve" / REVISION / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        entry = {"rfilename": rel}
        if path.suffix == ".safetensors":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["lfs"] = {"sha256": "0" * 64 if rel == corrupt else digest, "size": path.stat().st_size}
        siblings.append(entry)
    listing = served / "api" / "models" / REPO
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps({"sha": REVISION, "siblings": siblings}))


def _depth_record():
    entry = {"name": "Tiny Depth", "baseline": "stable diffusion 2", "type": "diffusers", "version": "2",
             "style": "depth2img", "hf_path": REPO, "available": False}
    return parse_reference({"Tiny Depth": entry}, category="diffusers")["Tiny Depth"]


def test_hf_path_record_downloads_verifies_and_loads(tmp_path, tiny_models, server, monkeypatch):  # noqa: F811
    _publish(tiny_models.parent / "tiny-sd2-depth", server.root)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    record = _depth_record()
    dest = model_dir(tmp_path / "cache", record)
    assert not is_ready(record, dest)
    outcome = Downloader(tmp_path / "cache", progress=False).ensure(record, dest)
    assert outcome.ok, outcome.reason
    assert is_ready(record, dest)
    assert not (dest / "README.md").exists()
    pipe = load_pipeline(record, dest, DevicePolicy.cpu())
    assert type(pipe).__name__ == "StableDiffusionDepth2ImgPipeline"


def test_hf_path_record_with_a_bad_hash_is_not_ready(tmp_path, tiny_models, server, monkeypatch):  # noqa: F811
    _publish(tiny_models.parent / "tiny-sd2-depth", server.root,
             corrupt="unet/diffusion_pytorch_model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    record = _depth_record()
    dest = model_dir(tmp_path / "cache", record)
    outcome = Downloader(tmp_path / "cache", progress=False, sleep=lambda s: None).ensure(record, dest)
    assert not outcome.ok and "sha256" in outcome.reason
    assert not is_ready(record, dest)


def test_hub_unreachable_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    record = _depth_record()
    outcome = Downloader(tmp_path, progress=False, timeout=2).ensure(record, model_dir(tmp_path, record))
    assert not outcome.ok and "could not list tiny/depth" in outcome.reason
