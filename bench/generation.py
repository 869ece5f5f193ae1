"""The worker's generation step against a bare diffusers call for the same job.

CPU (always): a mid-size random-weight UNet (block channels 128/256/512) saved to disk and served by the
real ModelManager, 256x256, 4 steps, k_euler, cfg 7.5. The worker step is `run_generation` (manager
pipeline variant, per-image scheduler, CPU generator, PIL output); the bare call is the same loaded
pipeline called directly with the same scheduler and seed. Both run in one process, alternating, after a
warm-up, with the worker's CPU thread policy (one torch thread per job on 2 cores); the two images must be
byte-identical (same work, not less). The headline is the median of per-round ratios (each round runs both,
back to back), which holds up on a machine shared with other work; the ratio of medians and of the fastest
runs are printed too. The safety pass is not in either side: the job runs it after `run_generation`
(bench/safety.py measures it).

GPU (only with CUDA): SD1.5-shaped random weights (UNet 320/640/1280/1280, CLIP-L text encoder, SD VAE),
fp16, 512x512, 30 steps; the worker's it/s must be >= 0.98x the bare call's. On CPU it prints
"skipped: no CUDA".

    flock /tmp/bench.lock .venv/bin/python -m bench.generation [--repeats 5]

Last line: `generation step_over_bare <ratio> (target <= 1.03)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bridge.api_models import GenerationPayload  # noqa: E402
from bridge.config import BridgeConfig  # noqa: E402
from bridge.generation.masks import SourceImages  # noqa: E402
from bridge.generation.request import SourceKind, WorkerLimits, build_request  # noqa: E402
from bridge.generation.runner import run_generation  # noqa: E402
from bridge.images import encode_webp  # noqa: E402
from bridge.runtime import Runtime  # noqa: E402
from bridge.sources import SourceFetcher  # noqa: E402
from bridge.worker import cpu_torch_threads  # noqa: E402
from models.cache import ModelCache  # noqa: E402
from models.device import DevicePolicy  # noqa: E402
from models.manager import ModelManager  # noqa: E402
from models.reference import ModelReference  # noqa: E402

CACHE = REPO / ".bench-cache" / "generation"
TARGET_CPU = 1.03
TARGET_GPU_ITS = 0.98
PROMPT = "a lighthouse on a cliff at dusk ### blurry"


def _unet(channels: tuple[int, ...], cross_dim: int, layers: int, heads: Any) -> Any:
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,
    )


def _sd15_components() -> dict[str, Any]:
    """SD1.5 shapes with random weights (the real configs, no download)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, vocab_size=49408))  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    return {"unet": _unet((320, 640, 1280, 1280), 768, 2, 8), "text_encoder": text, "vae": vae}


def build_model(dest: Path, name: str, *, sd15: bool) -> Path:
    """A diffusers folder with random weights + a reference json listing it; built once."""
    reference = dest / f"{name}.json"
    if reference.is_file():
        return reference
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from models.tiny import tiny_pipeline

    torch.manual_seed(0)
    base = tiny_pipeline("sd1", seed=0, work=dest / "work")  # tokenizer (+ small text encoder and VAE)
    parts = _sd15_components() if sd15 else {"unet": _unet((128, 256, 512), 32, 1, 8)}
    components = {**base.components, **parts}
    components["scheduler"] = EulerDiscreteScheduler.from_config(base.scheduler.config)
    folder = dest / name
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    files = [
        {"path": p.relative_to(dest).as_posix(), "sha256sum": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    record = {"name": name, "baseline": "stable diffusion 1", "type": "diffusers", "inpainting": False,
              "style": "generalist", "nsfw": False, "config": {"files": files, "download": []}}  # fmt: skip
    reference.write_text(json.dumps({name: record}), encoding="utf-8")
    return reference


def make_runtime(reference: Path, name: str, device: DevicePolicy) -> Runtime:
    refs = ModelReference.load(
        cache_dir=reference.parent / "ref-cache", upstream=None, extra_files=[reference]
    )
    cache = ModelCache(
        device, ram_budget_bytes=16 * 2**30, vram_budget_bytes=60 * 2**30 if device.is_cuda else 0
    )
    manager = ModelManager(reference=refs, cache=cache, device=device, cache_home=reference.parent / "home",
                           models=[name])  # fmt: skip
    if manager.ready_models() != [name]:
        raise SystemExit(f"benchmark model {name} is not ready: {manager.broken_models()}")
    config = BridgeConfig(max_power=64)
    return Runtime(config=config, device=device, fetcher=SourceFetcher(), models=manager)


def step_pair(runtime: Runtime, name: str, size: int, steps: int) -> tuple[Callable, Callable]:
    """(worker step, bare call) for one job; each returns the image's webp bytes."""
    payload = GenerationPayload(prompt=PROMPT, ddim_steps=steps, width=size, height=size, seed=1234,
                                sampler_name="k_euler", cfg_scale=7.5)  # fmt: skip
    record = runtime.models.record(name)
    request, subs = build_request(payload, record, SourceKind(), WorkerLimits.from_config(runtime.config))
    assert not subs, subs
    # The bare call borrows the same loaded modules once, outside the timing, with the same scheduler.
    with runtime.models.pipeline(name) as bare:
        pass
    bare.scheduler = request.sampler.build(bare.scheduler.config, request.seed)

    def worker() -> Any:
        return run_generation(runtime, request, SourceImages()).images[0].image

    def plain() -> Any:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        kwargs = {
            "num_inference_steps": steps,
            "guidance_scale": request.cfg_scale,
            "width": size,
            "height": size,
        }
        return bare(
            request.prompt, negative_prompt=request.negative_prompt, generator=generator, **kwargs
        ).images[0]

    return worker, plain


def timed(fn: Callable, sync: bool) -> tuple[float, Any]:
    if sync:
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def compare(worker: Callable, plain: Callable, repeats: int, *, sync: bool = False) -> tuple[float, float]:
    """Medians of (worker, bare) seconds: one warm-up each, then alternating repeats (order flipped every
    round so neither side always runs second)."""
    first_worker, first_plain = worker(), plain()
    if encode_webp(first_worker) != encode_webp(first_plain):
        # On CPU the two are bit-identical; CUDA kernels may round differently from call to call.
        if not sync:
            raise SystemExit("the worker's image differs from the bare pipeline's: not the same job")
        print("warning: worker and bare images differ (CUDA kernel nondeterminism?)")
    w_times, p_times = [], []
    for round_ in range(repeats):
        order = [(worker, w_times), (plain, p_times)]
        for fn, times in order if round_ % 2 == 0 else reversed(order):
            times.append(timed(fn, sync)[0])
    print(
        "seconds: worker "
        + " ".join(f"{t:.3f}" for t in w_times)
        + " | bare "
        + " ".join(f"{t:.3f}" for t in p_times)
    )
    return statistics.median(w_times), statistics.median(p_times)


def paired(worker: Any, plain: Any, repeats: int) -> tuple[float, float, float]:
    """(median of the per-round worker/bare ratios, fastest worker, fastest bare): each round runs both back
    to back (order flipped every round), so a burst of load from other processes mostly hits one round."""
    ratios, w_times, p_times = [], [], []
    for round_ in range(repeats):
        order = [(worker, w_times), (plain, p_times)]
        for fn, times in order if round_ % 2 == 0 else reversed(order):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        ratios.append(w_times[-1] / p_times[-1])
    print("paired ratios: " + " ".join(f"{r:.3f}" for r in ratios))
    return statistics.median(ratios), min(w_times), min(p_times)


def gpu_bench(repeats: int) -> None:
    if not torch.cuda.is_available():
        print("generation gpu: skipped: no CUDA")
        return
    device = DevicePolicy.detect()
    reference = build_model(CACHE, "bench-sd15-shape", sd15=True)
    runtime = make_runtime(reference, "bench-sd15-shape", device)
    worker, plain = step_pair(runtime, "bench-sd15-shape", 512, 30)
    w, p = compare(worker, plain, repeats, sync=True)
    print(f"generation gpu worker {30 / w:.2f} it/s, bare {30 / p:.2f} it/s ({torch.cuda.get_device_name()})")
    print(f"generation gpu its_ratio {p / w:.3f} (target >= {TARGET_GPU_ITS})")


def cpu_bench(repeats: int) -> float:
    """The median of per-round worker/bare ratios (bench/controlnet.py's measure), at the worker's own CPU
    thread policy (bridge.worker.cpu_torch_threads: one torch thread per job on 2 cores) on both sides."""
    torch.set_num_threads(cpu_torch_threads(os.cpu_count() or 1, 1))
    reference = build_model(CACHE, "bench-mid-unet", sd15=False)
    runtime = make_runtime(reference, "bench-mid-unet", DevicePolicy.cpu())
    worker, plain = step_pair(runtime, "bench-mid-unet", 256, 4)
    w, p = compare(worker, plain, repeats)  # also checks that the two images are byte-identical
    ratio, w_min, p_min = paired(worker, plain, repeats)
    print(f"generation cpu worker {w:.3f} s, bare {p:.3f} s (medians of {repeats}, 256x256, 4 steps, images "
          f"byte-identical; {torch.get_num_threads()} torch thread)")
    print(f"generation fastest worker {w_min:.3f} s, bare {p_min:.3f} s: ratio {w_min / p_min:.3f}; "
          f"ratio of medians {w / p:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    gpu_bench(args.repeats)
    ratio = cpu_bench(args.repeats)
    print(f"generation step_over_bare {ratio:.3f} (target <= {TARGET_CPU})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
