"""bench/safety: the safety pass plus the aesthetic score of one generated image against one bare CLIP
ViT-L/14 image forward on the same image, on this machine's CPU.

    flock /tmp/bench.lock .venv/bin/python -m bench.safety [--repeats 9] [--threads N]

Real-shape models with random weights, built once under .bench-cache/safety: CLIP ViT-L/14 (bench.alchemy's
recipe), DeepDanbooru resnet_custom_v3 (9176 tags, ~614 MiB) and the aesthetic predictor (768-1024-128-64-16
-1).
The pass is the worker's own (`SafetyPass.check` on the 512x512 image: preprocessing, one CLIP forward, the
similarities with the cached concept table, the decision, the aesthetic head); the bare side is
`get_image_features` on pixels preprocessed once outside the timing. The image memo is cleared before each
timed pass, so every pass pays its CLIP forward.

Random weights put an image on any branch of the decision by chance, so the concept table is written
relative to the image's embedding (as the tests do) to put it on the common branch: a photo, where
DeepDanbooru does not run. A branch's cost does not depend on the values. The anime branch (DeepDanbooru at
512x512 on top) is a side figure, as are the concept table's cold embedding and the models' sizes.
Last line: `safety pass_over_clip_forward <ratio> (target <= 1.10)`.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.alchemy import build_clip
from interrogators import ClipEmbedder, SafetyPass, WeightsFile
from interrogators.deepdanbooru import load_deepdanbooru, rate
from interrogators.tiny import deepdanbooru_shapes, write_aesthetic, write_deepdanbooru
from models.cache import MIB, ModelCache, object_bytes
from models.device import DevicePolicy

logger = logging.getLogger("bench.safety")

RECIPE = "1"
TARGET = 1.10
CACHE = Path(".bench-cache") / "safety"
REAL_TAGS = ("rating:safe", "rating:questionable", "rating:explicit", "realistic", "bikini")


def _once(path: Path, build: Callable[[Path], Any]) -> Path:
    marker = path.parent / f".{path.name}.recipe"
    if marker.is_file() and marker.read_text() == RECIPE:
        return path
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    build(path)
    marker.write_text(RECIPE)
    logger.info("built %s in %.0fs", path.name, time.perf_counter() - started)
    return path


def _build_clip(folder: Path) -> None:
    folder.mkdir(parents=True)
    build_clip(folder)


def build_danbooru(path: Path) -> None:
    tags = (*REAL_TAGS, *(f"tag{i}" for i in range(9176 - len(REAL_TAGS))))
    assert deepdanbooru_shapes(1, len(tags))[178] == (9176, 4096, 1)
    write_deepdanbooru(path, {"rating:safe": 1.0, "rating:explicit": -1.0}, divisor=1, tags=tags)


def build(root: Path) -> tuple[Path, Path, Path]:
    clip = _once(root / "clip-vit-large-patch14", _build_clip)
    danbooru = _once(root / "model-resnet_custom_v3.pt", build_danbooru)
    head = _once(root / "sac+logos+ava1-l14-linearMSE.pth", lambda p: write_aesthetic(p, input_width=768))
    return clip, danbooru, head


def place(safety: SafetyPass, image: Image.Image, similarities: Mapping[str, float]) -> None:
    """Write the concept table so that each concept has the given cosine with this image (others 0)."""
    e = safety.embedder.image_embedding(image)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for text in safety.terms.terms:
        cosine = similarities.get(text, 0.0)
        away = torch.randn(e.numel(), generator=generator)
        away = torch.nn.functional.normalize(away - (away @ e) * e, dim=0)
        rows.append(cosine * e + math.sqrt(1 - cosine * cosine) * away)
    safety.embedder.store.save(safety.embedder.model_id, safety.terms, torch.stack(rows))
    safety.embedder.forget_terms()
    safety.embedder.forget_images()


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum seconds of each, alternating runs after one warm-up each: on a shared CPU other processes
    only ever add time, so the fastest run is the closest estimate of each one's own cost."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        logger.info("%s runs: %s", name, " ".join(f"{v:.3f}" for v in values))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.safety", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("transformers", "diffusers", "httpx", "models.cache"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    clip_dir, danbooru_path, head_path = build(CACHE / "models")
    embedder, safety = warmed_pass(clip_dir, danbooru_path, head_path)
    image = Image.effect_mandelbrot((512, 512), (-2.0, -1.3, 0.7, 1.3), 120).convert("RGB")
    photo = time_photo_branch(embedder, safety, image, args.repeats)
    time_anime_branch(embedder, safety, image, danbooru_path, photo["bare"], args.repeats)
    time_nsfw_form_after_pass(embedder, safety, image)
    print(f"safety pass_over_clip_forward {photo['pass'] / photo['bare']:.3f} (target <= {TARGET})")


def warmed_pass(clip_dir: Path, danbooru_path: Path, head_path: Path) -> tuple[ClipEmbedder, SafetyPass]:
    """The pass, loaded and its concept table embedded (a cold start); prints what that cost."""
    cache = ModelCache(DevicePolicy.cpu(), ram_budget_bytes=8 << 30)
    embeddings = CACHE / "embeddings"
    shutil.rmtree(embeddings, ignore_errors=True)
    embedder = ClipEmbedder(clip_dir, cache=cache, embeddings_dir=embeddings)
    safety = SafetyPass(
        embedder, cache=cache, danbooru=WeightsFile(danbooru_path), aesthetic=WeightsFile(head_path)
    )
    started = time.perf_counter()
    safety.warm()  # loads, and embeds the concept table with the real text tower (a cold start)
    cold = time.perf_counter() - started - safety.load_seconds
    embedder.forget_terms()
    started = time.perf_counter()
    embedder.term_embeddings(safety.terms)
    from_disk = time.perf_counter() - started
    with embedder.loaded() as bundle:
        clip_mib = object_bytes(bundle) / MIB
    print(f"torch threads {torch.get_num_threads()}; CLIP ViT-L/14 {clip_mib:.0f} MiB, models loaded in "
          f"{safety.load_seconds:.1f}s; {len(safety.terms.terms)} concepts embedded cold in {cold:.1f}s, "
          f"read from disk in {from_disk * 1000:.0f} ms")
    return embedder, safety


def time_photo_branch(embedder: ClipEmbedder, safety: SafetyPass, image: Image.Image,
                      repeats: int) -> dict[str, float]:
    """The common branch (a photo, nothing found) against one bare CLIP image forward."""
    with embedder.loaded() as bundle:
        pixels = bundle.processor(images=image, return_tensors="pt")["pixel_values"]

    def bare() -> None:
        with embedder.loaded() as b, torch.inference_mode():
            b.model.get_image_features(pixel_values=pixels)

    results: list[Any] = []

    def safety_pass() -> None:
        embedder.forget_images()
        results[:] = safety.check([image], "blurry, lowres", aesthetic=True)

    place(safety, image, {})
    photo = best_of({"bare": bare, "pass": safety_pass}, repeats)
    [result] = results
    assert not result.verdict.is_anime and result.aesthetic is not None, result
    overhead_ms = 1000 * (photo["pass"] - photo["bare"])
    print(f"bare CLIP image forward {photo['bare']:.3f}s; safety pass + aesthetic {photo['pass']:.3f}s "
          f"(photo branch; aesthetic {result.aesthetic:.3f}); overhead {overhead_ms:.0f} ms")
    return photo


def time_anime_branch(embedder: ClipEmbedder, safety: SafetyPass, image: Image.Image, danbooru_path: Path,
                      bare: float, repeats: int) -> None:
    """DeepDanbooru rates an image CLIP takes for anime, at 512x512 too."""
    results: list[Any] = []

    def safety_pass() -> None:
        embedder.forget_images()
        results[:] = safety.check([image], "blurry, lowres", aesthetic=True)

    place(safety, image, {"anime": 0.25})
    anime = best_of({"pass": safety_pass}, max(2, repeats // 2))
    assert results[0].verdict.is_anime
    danbooru = load_deepdanbooru(danbooru_path)
    alone = best_of({"rate": lambda: rate(danbooru, image)}, 2)
    print(f"anime branch {anime['pass']:.3f}s ({anime['pass'] / bare:.2f}x the bare forward): "
          f"DeepDanbooru alone {alone['rate']:.3f}s at 512x512, {object_bytes(danbooru) / MIB:.0f} MiB")


def time_nsfw_form_after_pass(embedder: ClipEmbedder, safety: SafetyPass, image: Image.Image) -> None:
    """The nsfw form on an image the pass just checked reuses its embedding: no second forward."""
    place(safety, image, {})
    safety.check([image])
    forwards = embedder.image_forwards
    started = time.perf_counter()
    safety.is_nsfw(image)
    memo_ms = 1000 * (time.perf_counter() - started)
    assert embedder.image_forwards == forwards
    print(f"the nsfw form on an image just checked (its embedding kept): {memo_ms:.1f} ms, no CLIP forward")


if __name__ == "__main__":
    main()
