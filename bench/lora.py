"""A job with two LoRAs against the same job without, on the mid-size CPU benchmark model.

The model is bench.generation's (a random-weight UNet with block channels 128/256/512, saved to disk and
served by the real ModelManager), 256x256, 4 steps, k_euler, same seed. Two LoRAs in kohya's layout (rank 16,
every attention/projection layer of the unet's transformer blocks and of the text encoder) are already in the
cache (placed by hand: no CivitAI involved). Everything goes through the worker's real generation step
(`run_generation` with the job's LoRAs, the runner's LoRA step merging them into the shared model).

After a warm-up, rounds of three jobs: a plain job right after a LoRA job (it pays the undo), a plain job
after a plain one (the clean baseline), then the LoRA job (it pays merging both LoRAs). The headline is the
median over the rounds of (LoRA job / the clean plain job of the same round). Also printed: the apply and
undo times, the same LoRA job twice in a row (the second reuses the merged state), and the checks that
matter: the LoRAs change the image, and a plain job after the undo is byte-identical to the first plain job.

    flock /tmp/bench.lock .venv/bin/python -m bench.lora [--repeats 7]

Last line: `lora job_over_plain <ratio> (target <= 1.15)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.generation import CACHE, PROMPT, build_model, make_runtime  # noqa: E402
from bridge.api_models import GenerationPayload  # noqa: E402
from bridge.generation.masks import SourceImages  # noqa: E402
from bridge.generation.request import GenerationRequest, SourceKind, WorkerLimits, build_request  # noqa: E402
from bridge.generation.runner import run_generation  # noqa: E402
from bridge.images import encode_webp  # noqa: E402
from bridge.lora.civitai import CivitaiClient  # noqa: E402
from bridge.lora.plan import JobExtras, PlannedLora  # noqa: E402
from bridge.lora.service import LoraSupport  # noqa: E402
from bridge.lora.store import LoraStore  # noqa: E402
from models.device import DevicePolicy  # noqa: E402

MODEL = "bench-mid-unet"
TARGET = 1.15
RANK = 16


def build_loras(runtime: Any, folder: Path) -> list[Path]:
    """Two rank-16 kohya LoRAs for the benchmark model, written once."""
    from bridge.lora.tiny import kohya_lora, save_safetensors

    paths = [folder / f"bench-lora-{seed}.safetensors" for seed in (1, 2)]
    if all(p.is_file() for p in paths):
        return paths
    with runtime.models.pipeline(MODEL) as pipe:
        for seed, path in zip((1, 2), paths, strict=True):
            save_safetensors(kohya_lora(pipe, seed=seed, rank=RANK, scale=0.05, alpha=RANK), path)
    return paths


def requests_for(runtime: Any, paths: list[Path]) -> tuple[GenerationRequest, GenerationRequest]:
    payload = GenerationPayload(
        prompt=PROMPT, ddim_steps=4, width=256, height=256, seed=1234, sampler_name="k_euler", cfg_scale=7.5
    )
    request, _ = build_request(payload, runtime.models.record(MODEL), SourceKind(), WorkerLimits(512 * 512))
    planned = [PlannedLora(p.stem, p.stem, p, str(p), 0.8, 1.0) for p in paths]
    with_loras = dataclasses.replace(request, extras=JobExtras(loras=planned, prompt=PROMPT))
    return request, with_loras


def run(runtime: Any, request: GenerationRequest) -> tuple[float, bytes, Any]:
    started = time.perf_counter()
    result = run_generation(runtime, request, SourceImages())
    elapsed = time.perf_counter() - started
    report = request.extras.patch if request.extras is not None else None
    return elapsed, encode_webp(result.images[0].image), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    reference = build_model(CACHE, MODEL, sd15=False)
    runtime = make_runtime(reference, MODEL, DevicePolicy.cpu())
    root = CACHE / "lora"
    paths = build_loras(runtime, root / "loras")
    civitai = CivitaiClient("http://127.0.0.1:9", root / "civitai")  # never asked: the files are local
    runtime.loras = LoraSupport(enabled=True, civitai=civitai, store=LoraStore(root, 2**30, civitai))
    plain, with_loras = requests_for(runtime, paths)

    _, first_plain, _ = run(runtime, plain)  # warm-up: first loads and first calls
    _, lora_image, _ = run(runtime, with_loras)
    if lora_image == first_plain:
        raise SystemExit("the LoRAs did not change the image")
    plain_times, lora_times, apply_s, undo_s = [], [], [], []
    identical = True
    for _ in range(args.repeats):
        _, image, undo = run(runtime, dataclasses.replace(plain, extras=JobExtras(prompt=PROMPT)))
        undo_s.append(undo.undo_s)
        identical &= image == first_plain
        elapsed, image, _ = run(runtime, plain)
        plain_times.append(elapsed)
        identical &= image == first_plain
        elapsed, image, report = run(runtime, with_loras)
        lora_times.append(elapsed)
        apply_s.append(report.apply_s)
        if image != lora_image:
            raise SystemExit("the same LoRA job gave another image")
    again, image, report = run(runtime, with_loras)  # the same LoRA job twice in a row
    if not identical:
        raise SystemExit("a plain job after the undo differs from the first plain job: the LoRA leaked")
    median_plain, median_lora = statistics.median(plain_times), statistics.median(lora_times)
    # Each round's LoRA job over the clean plain job just before it: robust to the machine's load drifting.
    ratio = statistics.median(lo / pl for lo, pl in zip(lora_times, plain_times, strict=True))
    print("seconds: plain " + " ".join(f"{t:.3f}" for t in plain_times))
    print("seconds: lora  " + " ".join(f"{t:.3f}" for t in lora_times))
    print(
        f"lora apply (2 LoRAs, rank {RANK}, {report.changed} weights) median "
        f"{statistics.median(apply_s) * 1000:.1f} ms, undo median {statistics.median(undo_s) * 1000:.2f} ms"
    )
    print(
        f"lora same job twice: {again:.3f} s the second time (merged state reused: {report.reused}; "
        f"median with merging {median_lora:.3f} s)"
    )
    print("lora image changed: yes; plain job after undo byte-identical to the first: yes")
    print(
        f"lora plain {median_plain:.3f} s, with 2 LoRAs {median_lora:.3f} s "
        f"(median of {args.repeats}, 256x256, 4 steps)"
    )
    print(
        f"lora ratio of the medians {median_lora / median_plain:.3f}; "
        f"median of the per-round ratios {ratio:.3f}"
    )
    print(f"lora job_over_plain {ratio:.3f} (target <= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
