"""run_worker.py --demo end to end: dreamer and alchemist in one daemon, every job kind, real bytes out."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bridge.config import build_config
from bridge.demo import run_demo

REPO = Path(__file__).resolve().parents[2]


def test_demo_serves_every_kind_and_writes_real_images(tmp_path, capsys):
    config = build_config(
        {"cache_home": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")}, environ={}
    ).config
    output = tmp_path / "demo-output"
    assert run_demo(config, output_dir=output) == 0
    printed = capsys.readouterr().out
    for label in (
        "txt2img",
        "img2img",
        "inpainting",
        "depth2img",
        "RealESRGAN_x2plus",
        "caption",
        "interrogation",
        "nsfw",
        "strip_background",
        "controlnet canny",
        "controlnet hed map",
        "SDXL txt2img",
        "SDXL outpainting",
        "vectorize",
        "palette",
        "describe",
        "2xModernSpanimationV1",
        "txt2img + LoRA",
        "txt2img + TI",
    ):
        assert label in printed
    # The LoRA and TI jobs really applied them (the demo's CivitAI stand-in served the files).
    assert "lora Tiny Glow: applied at model 0.8" in printed
    assert "ti tinyneg: 2 vector(s) in the negative prompt" in printed
    assert "faulted" not in printed.split("stats:")[0]
    images = sorted(output.glob("*.webp"))
    assert len(images) >= 9
    sizes = {}
    for path in images:
        with Image.open(path) as image:
            image.load()
            sizes[path.name] = image.size
    assert sizes["txt2img_0.webp"] == (64, 64)
    assert sizes["controlnet_canny_0.webp"] == sizes["controlnet_hed_map_0.webp"] == (64, 64)
    assert sizes["txt2img_plus_RealESRGAN_x2plus_0.webp"] == (128, 128)
    assert sizes["alchemy_RealESRGAN_x2plus.webp"] == (128, 128)
    with Image.open(output / "alchemy_strip_background.webp") as stripped:
        assert stripped.mode == "RGBA"
