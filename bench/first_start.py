"""A volunteer's first start: the committed bridgeData.yaml on two injected machines, real-shape models.

    flock /tmp/bench.lock .venv/bin/python -m bench.first_start [--size 512] [--steps 1]

Models (random weights, real shapes; built once and cached under .bench-cache/first_start by
bench/builders/first_start.py): two SD1.5 checkpoints (UNet, VAE, CLIP-L text encoder in one fp16 single-file
.safetensors each), BLIP-large, CLIP ViT-L/14, DeepDanbooru resnet_custom_v3 and the LAION aesthetic
predictor (the last three make the safety pass every generated image goes through; CLIP and DeepDanbooru also
serve the nsfw form). Each scenario runs in a fresh process, the worker built by the real `build_worker` from
the committed bridgeData.yaml (only the horde's address, the key, the paths, allow_private_sources for the
local horde's loopback image host, the two model names, the alchemist's forms and the bench names of the two
random-weight safety files are set on top of it), the machine injected through the device policy, jobs served
by the real daemon from a local horde over HTTP:

(a) a 16 GB RAM desktop (4 GB used by other programs) with an 8 GB card (0.5 GB used by the desktop): 4
    txt2img jobs of the two SD1.5 models alternately, each image through the safety pass and the aesthetic
    score (send_aesthetic_score is on by default) before it is submitted. The card is simulated (its memory
    is the cache's bookkeeping, the jobs compute on this CPU in float32, so the weights it accounts are
    twice a real card's float16 ones); the horde's job ttl is stretched to what this CPU needs, since speed
    is not measured here.
(b) a 16 GB CPU-only alchemist (4 GB used by other programs): caption, interrogation and nsfw on 3 images.

The RAM the injected machines see as used by the worker is this process's real resident set. Printed: what
each start offered (models, max_pixels, forms), every submit, the peak RSS against the injected RAM, and last
`first_start served_fraction <ok submits / jobs> (target >= 1.0)`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.builders.first_start import SD_MODELS, ensure_built, interrogator_dir, safety_models, sd_reference

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
FORMS = ["caption", "interrogation", "nsfw"]
RESULT = "RESULT "


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def committed_config(horde, run_dir: Path, **overrides):
    from bridge.config import load_config

    # The local horde hosts the source images on loopback: a real worker refuses private addresses.
    settings = {"horde_url": horde.base_url, "api_key": horde.api_key, "cache_home": str(run_dir / "home"),
                "state_dir": str(run_dir / "state"), "allow_private_sources": True, **overrides}  # fmt: skip
    return load_config(REPO / "bridgeData.yaml", environ={}, overrides=settings).config


def serve(horde, worker, config, run_dir: Path, expected: int, timeout: float) -> None:
    from bridge.daemon import Daemon, LoopTimings
    from bridge.horde_api import HordeClient
    from bridge.journal import Journal
    from bridge.stats import Stats
    from bridge.worker import CLIENT_AGENT

    done = threading.Event()

    class Counting(Stats):
        def job_finished(self, kind, description, timings) -> None:
            super().job_finished(kind, description, timings)
            out(f"  finished {description}: load {timings.model_load:.1f}s, inference "
                f"{timings.inference:.1f}s, safety pass {timings.safety:.1f}s, "
                f"rss {rss() / GIB:.2f} GiB")  # fmt: skip
            if self.jobs_done >= expected:
                done.set()

    client = HordeClient(horde.base_url, horde.api_key, client_agent=CLIENT_AGENT)
    journal = Journal(run_dir / "state" / "inflight.json")
    daemon = Daemon(client=client, runtime=worker.runtime, sources=worker.sources, stats=Counting(),
                    journal=journal, timings=LoopTimings(idle_poll_s=0.2))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    finished = done.wait(timeout)
    daemon.request_stop("benchmark done")
    if not finished:
        out(f"  TIMEOUT after {timeout:.0f}s: {daemon.stats.jobs_done}/{expected} jobs done")
        daemon.request_stop("benchmark timeout")
    thread.join(timeout=120)


def ok_submits(horde) -> tuple[int, list[str]]:
    states = [s["state"] for i in horde.accounting().handed_out for s in horde.submits(i)]
    return states.count("ok"), states


def checked_submits(horde) -> int:
    """Submits carrying the aesthetic score: the safety pass looked at the image before it was sent."""
    bodies = [s for i in horde.accounting().handed_out for s in horde.submits(i)]
    return sum(any(m.get("type") == "aesthetic_score" for m in b.get("gen_metadata") or []) for b in bodies)


def legacy_budget_line(label: str, reading) -> str:
    """What the same machine got before soft budgets: the key's legacy value "80%" read once as a hard
    ceiling, min(available, total) - 80% of the total; every model larger than it was refused."""
    from models.cache import memory_budget

    budget = memory_budget("80%", total_bytes=reading.total, available_bytes=reading.available)
    return f"  side figure: the old hard {label} budget from \"80%\" on this machine: {budget / GIB:.2f} GiB"


def safety_line(runtime) -> str:
    """Whether the generation safety pass started (without it no generation is popped), and its load time."""
    safety = runtime.safety
    if safety is None:
        return "  safety pass: NOT STARTED (image generation is off)"
    return (f"  safety pass: decides {safety.can_decide}, aesthetic score {safety.scores_aesthetics}; "
            f"models loaded in {safety.load_seconds:.1f}s; rss {rss() / GIB:.2f} GiB")  # fmt: skip


def rss() -> int:
    from models.machine import process_rss

    return process_rss()


def scenario_generation(root: Path, size: int, steps: int) -> dict:
    from bench.model_swap import PeakRss
    from bridge.worker import build_worker, load_reference, plan_worker
    from local_horde import LocalHorde
    from models.device import DevicePolicy
    from models.machine import InjectedMachine

    machine = InjectedMachine.gib(16, 8, ram_others=4, vram_others=0.5, ram_from_rss=True)
    device = DevicePolicy.cpu(memory=machine)
    run_dir = root / "run-generation"
    with LocalHorde(known_models=list(SD_MODELS), job_ttl=3600) as horde, PeakRss() as peak:
        config = committed_config(horde, run_dir, models_to_load=list(SD_MODELS))
        reference = load_reference(config, [sd_reference(root)], upstream=False)
        plan = plan_worker(config, has_gpu=device.has_vram, reference=reference)
        out(legacy_budget_line("RAM", machine.ram()))
        out(legacy_budget_line("card", machine.vram()))
        worker = build_worker(config, plan, device=device, weights_dir=interrogator_dir(root),
                              interrogator_models=safety_models())  # fmt: skip
        out(safety_line(worker.runtime))
        admission = worker.runtime.admission
        offer = admission.offer(worker.runtime.models.ready_models(), 64 * 64 * 8 * config.max_power)
        out(f"(a) {machine.name()}: offered {offer.models}, max_pixels {offer.max_pixels}; "
            f"sizes {[round(admission.model_bytes(m) / GIB, 2) for m in offer.models]} GiB")  # fmt: skip
        params = {"width": size, "height": size, "steps": steps, "sampler_name": "k_euler", "seed": "7"}
        for index in range(4):
            horde.request_generation(params, models=[SD_MODELS[index % 2]], prompt=f"a lighthouse {index}")
        serve(horde, worker, config, run_dir, expected=4, timeout=1800)
        ok, states = ok_submits(horde)
        cache = admission.cache
        out(f"  submits {states}, {checked_submits(horde)} with the safety pass's aesthetic_score; "
            f"cache evictions {[k for k, _ in cache.evictions]}; resident {cache.resident()}")  # fmt: skip
    return {"jobs": 4, "ok": ok, "peak_rss": peak.peak, "ram": machine.ram_total, "free": machine.ram_total
            - machine.ram_others}  # fmt: skip


def scenario_alchemy(root: Path) -> dict:
    from PIL import Image

    from bench.model_swap import PeakRss
    from bridge.worker import build_worker, load_reference, plan_worker
    from local_horde import LocalHorde
    from models.device import DevicePolicy
    from models.machine import InjectedMachine

    machine = InjectedMachine.gib(16, ram_others=4, ram_from_rss=True)
    device = DevicePolicy.cpu(memory=machine)
    run_dir = root / "run-alchemy"
    with LocalHorde() as horde, PeakRss() as peak:
        config = committed_config(horde, run_dir, forms=FORMS)
        plan = plan_worker(config, has_gpu=device.has_vram, reference=load_reference(config, upstream=False))
        out(legacy_budget_line("RAM", machine.ram()))
        started = time.perf_counter()
        worker = build_worker(config, plan, device=device, weights_dir=interrogator_dir(root),
                              interrogator_models=safety_models())  # fmt: skip
        cache = worker.runtime.admission.cache
        [source] = worker.sources
        out(f"(b) {machine.name()}: warmed in {time.perf_counter() - started:.0f}s; "
            f"resident {cache.resident()}; offering {source.ready_forms(worker.runtime)}; "
            f"rss {rss() / GIB:.2f} GiB")  # fmt: skip
        ids = []
        for index, seed in enumerate((1.0, 2.0, 3.0)):
            image = Image.effect_mandelbrot((512, 512), (-2.0, -1.3, 0.7, 1.3 * seed), 60 + 20 * index)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="WEBP")
            ids.append(horde.request_interrogation(horde.host_image(buffer.getvalue()), FORMS))
        serve(horde, worker, config, run_dir, expected=3 * len(FORMS), timeout=1500)
        ok, states = ok_submits(horde)
        out(f"  submits {states}; cache evictions {[k for k, _ in cache.evictions]}; "
            f"resident {cache.resident()}")  # fmt: skip
    return {"jobs": 3 * len(FORMS), "ok": ok, "peak_rss": peak.peak, "ram": machine.ram_total,
            "free": machine.ram_total - machine.ram_others}  # fmt: skip


def run_scenario(name: str, args: argparse.Namespace) -> dict:
    """One scenario in a fresh process: a fresh 'machine' whose RAM use starts at an interpreter's."""
    command = [sys.executable, "-m", "bench.first_start", "--scenario", name, "--size", str(args.size),
               "--steps", str(args.steps), "--cache-dir", str(args.cache_dir)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            out(line)
    if result is None:
        out(f"scenario {name} ended with exit code {proc.returncode} and no result")
        return {"jobs": 4 if name == "generation" else 9, "ok": 0, "peak_rss": 0, "ram": 16 * GIB, "free": 0}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench-cache" / "first_start")
    parser.add_argument("--size", type=int, default=512, help="txt2img width and height (default 512)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per image (default 1)")
    parser.add_argument("--scenario", choices=["generation", "alchemy"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = args.cache_dir.resolve()
    if args.scenario:
        logging.basicConfig(level=logging.INFO, format="  %(asctime)s %(name)s %(message)s",
                            stream=sys.stdout)  # fmt: skip
        for noisy in ("transformers", "diffusers", "httpx", "urllib3", "local_horde", "models.downloads"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.scenario == "generation":
            result = scenario_generation(root, args.size, args.steps)
        else:
            result = scenario_alchemy(root)
        out(RESULT + json.dumps(result))
        return 0
    ensure_built(root)
    results = {name: run_scenario(name, args) for name in ("generation", "alchemy")}
    for name, r in results.items():
        out(f"{name}: {r['ok']}/{r['jobs']} ok; peak RSS {r['peak_rss'] / GIB:.2f} GiB of the injected "
            f"{r['ram'] / GIB:.0f} GiB ({r['free'] / GIB:.0f} GiB not used by other programs): "
            f"{'within' if r['peak_rss'] <= r['free'] else 'OVER'}")  # fmt: skip
    jobs = sum(r["jobs"] for r in results.values())
    ok = sum(r["ok"] for r in results.values())
    out(f"first_start served_fraction {ok / jobs:.3f} (target >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
