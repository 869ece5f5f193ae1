"""Model switching: a RAM-resident SD1.5-shaped model vs its cold load, and three such models under a
two-model RAM budget.

    flock /tmp/heavy.lock .venv/bin/python -m bench.model_swap [--cache-dir .bench-cache]

Builds (once, cached under ./.bench-cache/model_swap) an SD1.5-shaped checkpoint with random weights
(UNet 860 M, VAE, CLIP-L text; fp32 single-file .safetensors in the original layout) and two copies of it,
then loads them through the real ModelManager / ModelCache / loaders with the shipped sd1 configs.
Cold loads drop the files from the page cache first (posix_fadvise DONTNEED) and include reading every
weight page. The last line is `model_swap switch_over_cold <ratio> (target <= 0.02)`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODELS = ("bench-sd15-a", "bench-sd15-b", "bench-sd15-c")
GIB = 1024**3
logger = logging.getLogger("bench.model_swap")


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- building the models (in a child process, so its memory never counts) -----------------------------


def build(dest: Path) -> None:
    """Write one SD1.5-shaped checkpoint with random weights, two copies and a reference json."""
    from bench.builders.sd15 import sd15_ldm_state, write_sd15_copies

    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = sd15_ldm_state()
    out(f"built SD1.5-shaped weights in {time.perf_counter() - started:.1f}s")
    first = write_sd15_copies(state, dest, MODELS)
    del state
    out(f"wrote 3 x {first.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - started:.1f}s")


def ensure_built(dest: Path) -> Path:
    reference = dest / "reference.json"
    if reference.is_file() and all((dest / f"{n}.safetensors").is_file() for n in MODELS):
        out(f"reusing {dest}")
        return reference
    subprocess.run(
        [sys.executable, "-m", "bench.model_swap", "--build-only", "--cache-dir", str(dest)], check=True
    )
    return reference


# --- measuring ----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident set size over a block, sampled every 5 ms (/proc/self/statm)."""

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache(paths: list[Path]) -> bool:
    ok = True
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def touch(pipe) -> float:
    """Read every weight (the cold load must not hide lazily mapped pages); returns seconds."""
    import torch

    from models.cache import torch_modules

    started = time.perf_counter()
    with torch.no_grad():
        for module in torch_modules(pipe).values():
            for t in module.parameters():
                t.sum()
    return time.perf_counter() - started


def check_weights(pipe, checkpoint: Path) -> None:
    """The shipped sd1 configs really loaded the file's weights (not a fresh random init)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as fh:
        for key, got in [
            ("model.diffusion_model.input_blocks.0.0.weight", pipe.unet.conv_in.weight),
            (
                "first_stage_model.decoder.mid.attn_1.q.weight",
                pipe.vae.decoder.mid_block.attentions[0].to_q.weight,
            ),
        ]:
            want = fh.get_tensor(key).reshape(got.shape).to(got.dtype)
            assert torch.equal(got.detach().cpu(), want), key


def make_manager(reference_path: Path, budget: int, device):
    from models.cache import ModelCache
    from models.manager import ModelManager
    from models.reference import ModelReference

    reference = ModelReference.load(
        cache_dir=reference_path.parent / "ref-cache", upstream=None, extra_files=[reference_path]
    )
    cache = ModelCache(device, ram_budget_bytes=budget)
    manager = ModelManager(
        reference=reference, cache=cache, device=device, cache_home=reference_path.parent, models=MODELS
    )
    return manager, cache


def phase_switch(reference_path: Path, device) -> float:
    """Cold load two models, then switch between them while both are resident."""
    dest = reference_path.parent
    manager, cache = make_manager(reference_path, 64 * GIB, device)
    assert manager.ready_models() == list(MODELS), manager.ready_models()
    dropped = drop_page_cache([dest / f"{n}.safetensors" for n in MODELS])
    out(f"page cache dropped (posix_fadvise DONTNEED): {'yes' if dropped else 'NO (cold loads may be warm)'}")
    colds = []
    for name in MODELS[:2]:
        started = time.perf_counter()
        with manager.pipeline(name) as pipe:
            touched = touch(pipe)
        colds.append(time.perf_counter() - started)
        check_weights(pipe, dest / f"{name}.safetensors")
        out(f"cold load {name}: {colds[-1]:.2f}s (of which touching every weight after load {touched:.2f}s)")
    switches, touches = [], []
    for i in range(6):
        name = MODELS[i % 2]
        started = time.perf_counter()
        with manager.pipeline(name) as pipe:
            switches.append(time.perf_counter() - started)
            touches.append(touch(pipe))
    # The faster cold load is the conservative denominator (the first one also pays one-time imports).
    switch, cold = statistics.median(switches), min(colds)
    out(f"switch to a RAM-resident model: median {switch * 1000:.1f} ms over {len(switches)} switches")
    out(f"  (reading all its weights after the switch: median {statistics.median(touches):.2f}s, RAM speed)")
    assert not cache.evictions, "no eviction expected in the switch phase"
    del manager, cache, pipe
    gc.collect()
    return switch / cold


def phase_budget(reference_path: Path, device) -> tuple[bool, bool]:
    """Three models in turn under a budget that holds two."""
    from models.cache import object_bytes

    manager, cache = make_manager(reference_path, 64 * GIB, device)
    with manager.pipeline(MODELS[0]) as pipe:
        model_bytes = object_bytes(pipe)
    del pipe
    cache.drop(MODELS[0])
    del manager, cache
    gc.collect()
    budget = 2 * model_bytes
    manager, cache = make_manager(reference_path, budget, device)
    baseline = rss_bytes()
    order = [MODELS[0], MODELS[1], MODELS[2], MODELS[0], MODELS[1], MODELS[2]]
    with PeakRss() as peak:
        for name in order:
            started = time.perf_counter()
            with manager.pipeline(name) as pipe:
                touch(pipe)
            resident = ", ".join(cache.resident())
            out(
                f"  {name}: {time.perf_counter() - started:.2f}s; resident [{resident}]; "
                f"rss {rss_bytes() / GIB:.2f} GiB"
            )
        del pipe
    evictions = [key for key, _ in cache.evictions]
    out(
        f"model {model_bytes / GIB:.2f} GiB; budget {budget / GIB:.2f} GiB (two models); "
        f"evictions {evictions}"
    )
    # The budget bounds what the cache holds; the interpreter with torch/diffusers imported (the baseline,
    # ~0.8 GiB) is not a model. Both figures are printed.
    models_peak = peak.peak - baseline
    within = models_peak <= 1.10 * budget
    out(
        f"peak RSS above the {baseline / GIB:.2f} GiB process baseline {models_peak / GIB:.2f} GiB = "
        f"{models_peak / budget:.3f} x budget (target <= 1.10): {'ok' if within else 'OVER'}; "
        f"whole process peak {peak.peak / GIB:.2f} GiB = {peak.peak / budget:.3f} x budget"
    )
    return within, len(evictions) >= len(order) - 2


def phase_gpu(reference_path: Path, device) -> None:
    """RAM -> VRAM throughput of the cache's pinned, non-blocking move vs a plain pinned copy."""
    import torch

    from models.cache import object_bytes

    if not device.is_cuda:
        out("gpu ram->vram move: skipped (no CUDA device)")
        return
    manager, cache = make_manager(reference_path, 64 * GIB, device)
    with manager.pipeline(MODELS[0]) as pipe:
        size = object_bytes(pipe)
    del pipe
    assert cache.offload(MODELS[0]), "the model should have been on the device"
    torch.cuda.synchronize()
    started = time.perf_counter()
    with manager.pipeline(MODELS[0]):
        torch.cuda.synchronize()
        move = time.perf_counter() - started
    plain = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    plain.to(device.device, non_blocking=True)
    torch.cuda.synchronize()
    copy = time.perf_counter() - started
    ratio = (size / move) / (size / copy)
    out(
        f"gpu ram->vram: cache move {size / move / 1e9:.1f} GB/s, "
        f"plain pinned copy {size / copy / 1e9:.1f} GB/s, ratio {ratio:.2f} (target >= 0.7)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache") / "model_swap")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_only:
        build(args.cache_dir)
        return 0
    reference_path = ensure_built(args.cache_dir.resolve())

    from diffusers.utils import logging as diffusers_logging

    from models.device import DevicePolicy

    diffusers_logging.disable_progress_bar()
    device = DevicePolicy.detect()
    out(f"device {device.device} {device.dtype}")
    ratio = phase_switch(reference_path, device)
    budget_ok, evicted = phase_budget(reference_path, device)
    out(f"budget held (models): {budget_ok}; eviction observed: {evicted}")
    phase_gpu(reference_path, device)
    out(f"model_swap switch_over_cold {ratio:.4f} (target <= 0.02)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
