"""Benchmark: tiled x4 upscaling overhead, and the memory bound of a 2048² x4 upscale.

1. Throughput: RealESRGAN_x4plus's real shape (64 filters, 23 RRDB blocks, random weights, saved as .pth and
   loaded through the registry) upscales a picture with the default tile size. Ratio = time of the bare
   network's forward passes over exactly the padded tiles the tiler feeds it ÷ time of the whole
   `process()` call (PIL in, tiling, uint8 assembly, PIL out). Best of `--reps` interleaved runs each.
2. Peak RSS of a 2048² -> 8192² upscale in a fresh child process, with the same tiling and a 1-block RRDBNet
   (64 filters, so the activations at 4x resolution, which set the peak, are the real ones; the 23-block
   trunk would take ~20 minutes on a 2-core CPU and adds only 1x-resolution activations).

Run: flock /tmp/heavy.lock .venv/bin/python bench/postprocess.py
Last line: `postprocess throughput_ratio <v> (target >= 0.95)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.cache import ModelCache  # noqa: E402
from models.device import DevicePolicy  # noqa: E402
from postprocessors import PostProcessorRegistry  # noqa: E402
from postprocessors.base import module_device_dtype, pil_to_tensor  # noqa: E402
from postprocessors.tiling import padded_input, plan_tiles  # noqa: E402
from postprocessors.tiny import realesrgan_state_dict  # noqa: E402
from postprocessors.upscalers import TILE_PAD, default_tile  # noqa: E402

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.95
# Peak RSS bound of a 2048² x4 upscale on CPU with the default tile (whole process, torch included).
RSS_BOUND_MIB = 2560


def _picture(side: int) -> Image.Image:
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([(x * 3) % 256, (y * 5) % 256, ((x ^ y) * 7) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _registry(weights_dir: Path, tile: int) -> tuple[PostProcessorRegistry, ModelCache]:
    device = DevicePolicy.cpu()
    cache = ModelCache(device, ram_budget_bytes=4 << 30)
    return PostProcessorRegistry(weights_dir=weights_dir, cache=cache, device=device, tile=tile), cache


def _write_weights(weights_dir: Path, num_blocks: int) -> None:
    (weights_dir / "esrgan").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = realesrgan_state_dict(num_filters=64, num_blocks=num_blocks)
    torch.save(state, weights_dir / "esrgan" / "RealESRGAN_x4plus.pth")


def throughput(weights_dir: Path, side: int, tile: int, reps: int) -> float:
    registry, cache = _registry(weights_dir, tile)
    upscaler = registry.get("RealESRGAN_x4plus")
    image = _picture(side)
    upscaler.process(_picture(16))  # load into the cache and warm the kernels
    with cache.use(upscaler.cache_key, upscaler._load) as model:
        device, dtype = module_device_dtype(model.module)
        tensor = pil_to_tensor(image, device, dtype)
        tiles = [padded_input(tensor, t).contiguous() for t in plan_tiles(side, side, tile, TILE_PAD)]
        bare, tiled = [], []
        for rep in range(reps):
            started = time.perf_counter()
            for part in tiles:
                model.descriptor(part)
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = upscaler.process(image)
            tiled.append(time.perf_counter() - started)
            assert result.image.size == (side * 4, side * 4)
            print(f"  rep {rep + 1}: bare {bare[-1]:.2f}s  tiled process() {tiled[-1]:.2f}s", flush=True)
    print(f"throughput: {side}² -> {side * 4}², {len(tiles)} tiles of {tile}px (+{TILE_PAD} px context)")
    rate = side * side / min(tiled) / 1e3
    print(f"  {rate:.2f} kpx/s input; best bare {min(bare):.2f}s, best tiled {min(tiled):.2f}s")
    return min(bare) / min(tiled)


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(weights_dir: Path, side: int, tile: int) -> None:
    """In a fresh process: load, warm up, then one side² x4 upscale; prints a json line."""
    registry, _ = _registry(weights_dir, tile)
    upscaler = registry.get("RealESRGAN_x4plus")
    upscaler.process(_picture(16))
    image = _picture(side)
    baseline = _vm_rss_mib()
    started = time.perf_counter()
    result = upscaler.process(image)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"size": result.image.size, "seconds": seconds, "baseline_mib": baseline, "peak_mib": peak}
        )
    )


def measure_rss(weights_dir: Path, side: int, tile: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--rss-child",
        str(weights_dir),
        "--rss-size",
        str(side),
        "--tile",
        str(tile),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="throughput image side (px)")
    parser.add_argument("--rss-size", type=int, default=2048, help="memory-bound image side (px)")
    parser.add_argument("--tile", type=int, default=default_tile(DevicePolicy.cpu()))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_size, args.tile)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tile {args.tile}, pad {TILE_PAD}")
    with tempfile.TemporaryDirectory(prefix="bench-postprocess-") as tmp:
        full, light = Path(tmp) / "full", Path(tmp) / "light"
        _write_weights(full, num_blocks=23)
        _write_weights(light, num_blocks=1)
        if not args.skip_rss:
            rss = measure_rss(light, args.rss_size, args.tile)
            verdict = "within" if rss["peak_mib"] <= RSS_BOUND_MIB else "OVER"
            print(
                f"memory: {args.rss_size}² -> {rss['size'][0]}x{rss['size'][1]} in {rss['seconds']:.0f}s "
                f"(1-block RRDBNet, 64 filters): peak RSS {rss['peak_mib']:.0f} MiB "
                f"(after load {rss['baseline_mib']:.0f} MiB), {verdict} the bound of {RSS_BOUND_MIB} MiB"
            )
        ratio = throughput(full, args.size, args.tile, args.reps)
    print(f"postprocess throughput_ratio {ratio:.3f} (target >= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
