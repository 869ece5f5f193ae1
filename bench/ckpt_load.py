"""Reading a real-shape SD1.5 training checkpoint: the restricted unpickler vs an unrestricted torch.load,
and the `.safetensors` twin a first load leaves behind.

    flock /tmp/bench.lock .venv/bin/python -m bench.ckpt_load [--cache-dir .bench-cache/ckpt_load]

Builds once (cached) `sd-v1-4-shaped.ckpt` in the layout of the SD 1.x releases: random weights of the real
shapes (UNet 860 M, VAE, CLIP-L text), their LitEma copies, the DDPM schedule buffers, `global_step` as a
numpy int64 and a pickled Lightning `ModelCheckpoint` callback (zip format, fp32, about 7.7 GB).

Measured side by side, alternating, seven rounds each, page cache warm (the same bytes either way):
1. restricted: `torch.load(..., pickle_module=models.ckpt_pickle, mmap=True)` + reading every weight page;
2. unsafe: `torch.load(..., weights_only=False, mmap=True)` + the same reads (the stock unpickler, given
   stand-in Lightning modules to import, as Lightning is not installed);
3. twin: `safetensors.torch.load_file` of the twin + the same reads (its weights only: no EMA copies).
Then the whole `load_pipeline` once from the `.ckpt` (which writes the twin) and once from the twin.
The last line is `ckpt_load restricted_over_unsafe <ratio> (target <= 1.10)`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CKPT = "sd-v1-4-shaped.ckpt"
ROUNDS = 7


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build(dest: Path) -> None:
    """The training-layout checkpoint and a reference json naming it (sha256 included)."""
    from bench.builders.sd15 import sd15_ldm_state
    from models.downloads import hash_file, write_sidecar
    from models.tiny_checkpoints import save_training_ckpt

    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = sd15_ldm_state()
    path = dest / CKPT
    save_training_ckpt(state, path)
    del state
    digest = hash_file(path)
    write_sidecar(path, digest)
    record = {
        "name": "bench-sd14-training", "baseline": "stable diffusion 1", "type": "ckpt", "inpainting": False,
        "style": "generalist", "nsfw": False,
        "config": {"files": [{"path": CKPT, "sha256sum": digest}], "download": []},
    }  # fmt: skip
    (dest / "reference.json").write_text(json.dumps({record["name"]: record}, indent=1))
    out(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f}s")


def ensure_built(dest: Path) -> Path:
    reference = dest / "reference.json"
    if reference.is_file() and (dest / CKPT).is_file():
        out(f"reusing {dest / CKPT}")
        return reference
    # A child process, so that building (several GB) never counts in this one.
    command = [sys.executable, "-m", "bench.ckpt_load", "--build-only", "--cache-dir", str(dest)]
    subprocess.run(command, check=True)
    return reference


def touch_all(state: dict) -> int:
    """Read one element per 4 KiB page of every tensor (what a load that keeps the weights pays)."""
    import torch

    total = 0
    with torch.no_grad():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel():
                flat = value.reshape(-1)
                flat[:: max(1, 4096 // value.element_size())].sum()
                total += value.numel() * value.element_size()
    return total


def state_of(loaded: object) -> dict:
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    assert isinstance(loaded, dict)
    return loaded


def timed(load: Callable[[], dict]) -> tuple[float, int]:
    gc.collect()
    started = time.perf_counter()
    state = load()
    size = touch_all(state)
    elapsed = time.perf_counter() - started
    del state
    gc.collect()
    return elapsed, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache") / "ckpt_load")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_only:
        build(args.cache_dir)
        return 0
    reference_path = ensure_built(args.cache_dir.resolve())

    from diffusers.utils import logging as diffusers_logging

    from models.twins import twin_path

    diffusers_logging.disable_progress_bar()
    ckpt = reference_path.parent / CKPT
    twin_path(ckpt).unlink(missing_ok=True)
    times = time_unpicklers(ckpt)
    from_ckpt, from_twin = time_pipeline_loads(reference_path, ckpt)
    twin = twin_path(ckpt)
    times["twin"] = time_twin(twin)

    medians = {name: statistics.median(values) for name, values in times.items()}
    out(f"files: .ckpt {ckpt.stat().st_size / 1e9:.2f} GB, twin {twin.stat().st_size / 1e9:.2f} GB")
    out(f"state dict, median of {ROUNDS}: restricted {medians['restricted']:.3f}s, "
        f"unsafe {medians['unsafe']:.3f}s, twin {medians['twin']:.3f}s")
    out(f"load_pipeline: from the .ckpt (first load, writes the twin) {from_ckpt:.1f}s, "
        f"from the twin {from_twin:.1f}s")
    out(f"ckpt_load restricted_over_unsafe {medians['restricted'] / medians['unsafe']:.3f} (target <= 1.10)")
    return 0


def time_unpicklers(ckpt: Path) -> dict[str, list[float]]:
    """The restricted unpickler and the stock one, alternating which goes first each round."""
    import torch

    from models import ckpt_pickle
    from models.tiny_checkpoints import lightning_classes

    def unsafe_load() -> dict:
        # Lightning is not installed: the stock unpickler imports stand-in classes of the same names.
        with lightning_classes():
            return state_of(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True))

    methods: dict[str, Callable[[], dict]] = {
        "restricted": lambda: state_of(
            torch.load(ckpt, map_location="cpu", weights_only=False, pickle_module=ckpt_pickle, mmap=True)
        ),
        "unsafe": unsafe_load,
    }
    touch_all(methods["unsafe"]())  # warm the page cache: both sides read the same bytes from RAM
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(ROUNDS):
        order = list(methods) if round_ % 2 == 0 else list(reversed(methods))
        for name in order:
            elapsed, size = timed(methods[name])
            times[name].append(elapsed)
            out(f"round {round_ + 1} {name}: {elapsed:.3f}s ({size / 1e9:.2f} GB read)")
    return times


def time_pipeline_loads(reference_path: Path, ckpt: Path) -> tuple[float, float]:
    """Seconds for `load_pipeline` from the .ckpt (the first load writes the twin), then from the twin."""
    from models.device import DevicePolicy
    from models.loading import load_pipeline, plan_load
    from models.reference import ModelReference

    reference = ModelReference.load(cache_dir=reference_path.parent / "ref-cache", upstream=None,
                                    extra_files=[reference_path])
    record = reference.get("bench-sd14-training")
    device = DevicePolicy.cpu()
    started = time.perf_counter()
    pipe = load_pipeline(record, record.base_dir, device)
    from_ckpt = time.perf_counter() - started
    del pipe
    gc.collect()
    plan = plan_load(record, record.base_dir)
    assert plan.source == ckpt, "the first load did not leave a twin"
    started = time.perf_counter()
    pipe = load_pipeline(record, record.base_dir, device, plan=plan)
    from_twin = time.perf_counter() - started
    del pipe
    gc.collect()
    return from_ckpt, from_twin


def time_twin(twin: Path) -> list[float]:
    from safetensors.torch import load_file

    times = []
    for round_ in range(ROUNDS):
        elapsed, size = timed(lambda: load_file(str(twin)))
        times.append(elapsed)
        out(f"round {round_ + 1} twin: {elapsed:.3f}s ({size / 1e9:.2f} GB read)")
    return times


if __name__ == "__main__":
    raise SystemExit(main())
