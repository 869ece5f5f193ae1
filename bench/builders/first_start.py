"""Real-shape random-weight models for bench/first_start.py, built once and cached under .bench-cache/.

    .venv/bin/python -m bench.builders.first_start [--cache-dir .bench-cache/first_start]

Two SD1.5-shaped checkpoints (UNet 860 M, VAE, CLIP-L text encoder; one fp16 single-file .safetensors each, in
the original LDM key layout, as the horde's SD1.5 downloads are) with a reference json beside them; BLIP-large
and CLIP ViT-L/14 in the folders `build_interrogators` reads; and the safety pass's two single-file models,
DeepDanbooru resnet_custom_v3 (9176 tags, the torch pickle `load_deepdanbooru` reads) and the LAION aesthetic
predictor (768-1024-128-64-16-1, the state-dict pickle `load_aesthetic` reads), in `<kind>/<name>/<file>` as
`build_safety` reads them. The two carry bench names, not the reference's: the worker checks the reference's
names against their published sha256, which random weights do not have. Run as a child process by the
benchmark so that building never counts in its memory figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

SD_MODELS = ("first-start-sd15-a", "first-start-sd15-b")
RECIPE = "sd15-fp16-1"
BENCH_AESTHETIC = "bench-aesthetic-predictor-random"
AESTHETIC_RECIPE = "1"
GIB = 1024**3


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build_sd(dest: Path) -> None:
    """One SD1.5-shaped fp16 checkpoint, a copy under the second name, sidecars and reference.json."""
    import torch

    from bench.builders.sd15 import sd15_ldm_state, write_sd15_copies

    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = sd15_ldm_state(torch.float16)
    first = write_sd15_copies(state, dest, SD_MODELS)
    del state
    out(
        f"built {len(SD_MODELS)} SD1.5-shaped fp16 checkpoints of {first.stat().st_size / GIB:.2f} GiB "
        f"in {time.perf_counter() - started:.0f}s"
    )


def sd_reference(root: Path) -> Path:
    return root / "sd" / "reference.json"


def interrogator_dir(root: Path) -> Path:
    return root / "interrogators"


def safety_models() -> dict[str, str]:
    """The `interrogator_models` names of the safety pass's two random-weight files."""
    from bench.alchemy import BENCH_DANBOORU

    return {"danbooru_model": BENCH_DANBOORU, "aesthetic_model": BENCH_AESTHETIC}


def build_aesthetic(models_dir: Path) -> None:
    """The aesthetic predictor at its real shape (3.7 MB: the build is instant, the marker keeps it once)."""
    from interrogators import aesthetic
    from interrogators.reference import AESTHETIC_KIND, model_dir
    from interrogators.tiny import write_aesthetic

    folder = model_dir(models_dir, AESTHETIC_KIND, BENCH_AESTHETIC)
    marker = folder / ".recipe"
    if marker.is_file() and marker.read_text() == AESTHETIC_RECIPE:
        return
    write_aesthetic(folder / aesthetic.FILE_NAME, input_width=aesthetic.EMBEDDING_WIDTH)
    marker.write_text(AESTHETIC_RECIPE)


def is_built(root: Path) -> bool:
    marker = root / "sd" / ".recipe"
    return marker.is_file() and marker.read_text() == RECIPE and sd_reference(root).is_file()


def build(root: Path) -> None:
    import logging

    from bench.alchemy import build_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not is_built(root):
        shutil.rmtree(root / "sd", ignore_errors=True)
        build_sd(root / "sd")
        (root / "sd" / ".recipe").write_text(RECIPE)
    started = time.perf_counter()
    build_models(interrogator_dir(root))  # idempotent: skips folders already built with its recipe
    build_aesthetic(interrogator_dir(root))
    out(f"interrogation models ready in {time.perf_counter() - started:.0f}s")


def ensure_built(root: Path) -> None:
    """Build in a child process (its memory never counts in the benchmark's figures)."""
    import subprocess

    subprocess.run([sys.executable, "-m", "bench.builders.first_start", "--cache-dir", str(root)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache") / "first_start")
    args = parser.parse_args(argv)
    build(args.cache_dir.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
