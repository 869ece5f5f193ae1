"""The worker's ControlNet job against the bare diffusers ControlNet pipeline, and each annotator's time.

CPU: bench/generation.py's mid-size random-weight model (UNet 128/256/512, served by the real ModelManager)
with a mid-size random ControlNet of its shape, saved as the horde's `control_canny` (a kohya-ss diff file,
fp16), 256x256, 4 steps, k_euler, cfg 7.5. The worker step is `run_generation` on a canny ControlNet job
(annotator, the model's pipeline variant, the diff ControlNet materialised against the model and taken from
the cache, the ControlNet pipeline composed per call, per-image scheduler and generator); the bare call is
`StableDiffusionControlNetPipeline` built once on the same loaded modules and called with the same control
map, scheduler and seed. Alternating repeats after a warm-up, medians compared; the two images must be
byte-identical. The headline is the median of per-round ratios (each round runs both, back to back), which
holds up on a machine shared with other work; the ratio of medians and of the fastest runs are printed too.
Both sides run with the worker's CPU thread policy (one torch thread per job on 2 cores).

Then each control type's annotator on a 512x512 image, through the worker's annotator path, with weight
files at the real networks' shapes and sizes (random weights; OpenPose's are zero, so its keypoint search
finds no one and that part of its time is not measured).

    flock /tmp/bench.lock .venv/bin/python -m bench.controlnet [--repeats 9]

Last line: `controlnet step_over_bare <ratio> (target <= 1.03)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.generation import CACHE as GENERATION_CACHE  # noqa: E402
from bench.generation import build_model, compare, paired  # noqa: E402
from bridge.api_models import GenerationPayload  # noqa: E402
from bridge.config import BridgeConfig  # noqa: E402
from bridge.generation.masks import SourceImages, prepare_sources  # noqa: E402
from bridge.generation.request import WorkerLimits, build_request  # noqa: E402
from bridge.generation.runner import run_generation  # noqa: E402
from bridge.runtime import Runtime  # noqa: E402
from bridge.sources import SourceFetcher  # noqa: E402
from bridge.worker import cpu_torch_threads  # noqa: E402
from controlnet import CONTROL_TYPES, ControlNets, control_type  # noqa: E402
from models.cache import ModelCache  # noqa: E402
from models.device import DevicePolicy  # noqa: E402
from models.manager import ModelManager  # noqa: E402
from models.reference import ModelReference  # noqa: E402

CACHE = REPO / ".bench-cache" / "controlnet"
MODEL = "bench-mid-unet"
TARGET = 1.03
SIZE, STEPS = 256, 4
PROMPT = "a lighthouse on a cliff at dusk ### blurry"
CONTROLNET_FILE = "diff_control_sd15_canny_fp16.safetensors"


def build_controlnet(dest: Path, model_folder: Path) -> Path:
    """A random ControlNet of the benchmark UNet's shape, as the horde's control_canny (diff format)."""
    reference = dest / "controlnet.json"
    if reference.is_file():
        return reference
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from controlnet.tiny import diff_file, random_controlnet
    from models.tiny import _file_specs

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    torch.manual_seed(11)
    sd15 = UNet2DConditionModel.from_config(unet.config)  # the "SD1.5" the diff was extracted against
    state = diff_file(random_controlnet(sd15, seed=12), sd15)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16) for k, v in state.items()}, str(dest / CONTROLNET_FILE))
    record = {"name": "control_canny", "type": "control_canny", "style": "control_canny", "version": "0.1.0",
              "config": {"files": _file_specs(dest, [dest / CONTROLNET_FILE]), "download": []}}
    reference.write_text(json.dumps({"control_canny": record}), encoding="utf-8")
    return reference


def make_runtime() -> Runtime:
    from controlnet.tiny import build_tiny_controlnets

    model_reference = build_model(GENERATION_CACHE, MODEL, sd15=False)
    controlnet_reference = build_controlnet(CACHE, GENERATION_CACHE / MODEL)
    annotators = build_tiny_controlnets(CACHE / "annotators", full_size=True)["annotators"]
    refs = ModelReference.load(cache_dir=CACHE / "ref-cache", upstream=None,
                               extra_files=[model_reference, controlnet_reference, annotators])
    device = DevicePolicy.cpu()
    cache = ModelCache(device, ram_budget_bytes=16 * 2**30, vram_budget_bytes=0)
    manager = ModelManager(reference=refs, cache=cache, device=device, cache_home=CACHE / "home",
                           models=[MODEL])
    if manager.ready_models() != [MODEL]:
        raise SystemExit(f"benchmark model {MODEL} is not ready: {manager.broken_models()}")
    controlnets = ControlNets(reference=refs, cache=cache, device=device, cache_home=CACHE / "home")
    config = BridgeConfig(max_power=64, allow_controlnet=True)
    return Runtime(config=config, device=device, fetcher=SourceFetcher(), models=manager,
                   controlnets=controlnets)


def source_image(size: int) -> Image.Image:
    """Shapes with edges for canny, lines for M-LSD, dark strokes for scribble."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 6, size // 2, size // 2), fill=(30, 30, 30))
    draw.ellipse((size // 2, size // 2, 7 * size // 8, 7 * size // 8), fill=(220, 180, 40))
    draw.line((0, size - 1, size - 1, size // 3), fill=(10, 10, 10), width=max(1, size // 64))
    return image


def step_pair(runtime: Runtime) -> tuple[Any, Any]:
    """(worker control job, bare ControlNet pipeline call) for the same job; each returns a PIL image."""
    from diffusers import StableDiffusionControlNetPipeline

    payload = GenerationPayload(prompt=PROMPT, ddim_steps=STEPS, width=SIZE, height=SIZE, seed=1234,
                                sampler_name="k_euler", cfg_scale=7.5, control_type="canny")
    sources, kind, _ = prepare_sources(source_image(SIZE), None, "img2img")
    request, subs = build_request(payload, runtime.models.record(MODEL), kind,
                                  WorkerLimits.from_config(runtime.config))
    assert not subs, subs
    canny = control_type("canny")
    control_map = runtime.controlnets.annotate(canny, sources.image)
    # The bare pipeline borrows the same loaded modules once, outside the timing, with the same scheduler.
    with runtime.models.pipeline(MODEL) as base, \
            runtime.controlnets.controlnet(canny, MODEL, request.baseline, base.unet) as net:
        bare = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=net, dtype=torch.float32)
    bare.set_progress_bar_config(disable=True)
    bare.scheduler = request.sampler.build(bare.scheduler.config, request.seed)

    def worker() -> Image.Image:
        return run_generation(runtime, request, SourceImages(sources.image)).images[0].image

    def plain() -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        return bare(request.prompt, negative_prompt=request.negative_prompt, image=control_map,
                    num_inference_steps=STEPS, guidance_scale=request.cfg_scale, width=SIZE, height=SIZE,
                    controlnet_conditioning_scale=1.0, generator=generator).images[0]

    return worker, plain


def annotator_times(runtime: Runtime, size: int = 512, repeats: int = 3) -> None:
    image = source_image(size)
    for kind in CONTROL_TYPES:
        started = time.perf_counter()
        runtime.controlnets.annotate(kind, image)  # loads the weights (first use)
        first = time.perf_counter() - started
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.controlnets.annotate(kind, image)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"annotator {kind.name:<13} ({kind.annotator}) {median:.3f} s at {size}x{size} "
              f"(first call, with loading: {first:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlnet", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The worker's own CPU policy (bridge.worker.cpu_torch_threads): one torch thread per job on 2 cores.
    torch.set_num_threads(cpu_torch_threads(os.cpu_count() or 1, 1))
    runtime = make_runtime()
    annotator_times(runtime)
    worker, plain = step_pair(runtime)
    w, p = compare(worker, plain, args.repeats)  # also checks that the two images are byte-identical
    ratio, w_min, p_min = paired(worker, plain, args.repeats)
    print(f"controlnet cpu worker {w:.3f} s, bare {p:.3f} s (medians of {args.repeats}, {SIZE}x{SIZE}, "
          f"{STEPS} steps, images byte-identical; {torch.get_num_threads()} torch thread)")
    print(f"controlnet fastest worker {w_min:.3f} s, bare {p_min:.3f} s: ratio {w_min / p_min:.3f}; "
          f"ratio of medians {w / p:.3f}")
    print(f"controlnet step_over_bare {ratio:.3f} (target <= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
