"""run_worker.py --demo: the real daemon against a local horde, offline, on sample requests of every kind.

1. Build (once) tiny random-weight models of every kind under `<cache_home>/tiny`. The demo always runs
   these, never the operator's real models: it shows the machinery offline, not image quality.
   Tiny LoRAs/TIs in CivitAI's file layouts beside them.
2. Start the local horde (`local_horde`, with its CivitAI stand-in holding the tiny LoRAs/TIs) on loopback
   and post sample requests as a requester would (one of them with a LoRA, one with a TI).
3. Run the real daemon (the same `build_worker` + `Daemon` as a live worker) until every request is done.
4. Download the results into the output folder and print a table.

The local horde grants this bridge's own name reGen's v1 capabilities so that the demo can show img2img,
inpainting and post-processing; the real horde grants none to a name it does not know.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bridge.config import BridgeConfig, bridge_agent_name
from bridge.daemon import Daemon
from bridge.horde_api import HordeClient
from bridge.journal import Journal
from bridge.stats import Stats
from bridge.worker import CLIENT_AGENT, build_worker, load_reference, lora_support, plan_worker
from interrogators.tiny import TINY_CAPTION, TINY_CLIP, TINY_SAFETY, TINY_SAFETY_PASS

log = logging.getLogger(__name__)

DEMO_TIMEOUT_S = 600.0
# Generated images are checked by a CLIP that finds nothing in any image (random weights would flag noise
# at random): the pass, its models and its metadata are the real ones.
TINY_INTERROGATORS = {
    "caption_model": TINY_CAPTION,
    "clip_model": TINY_CLIP,
    "nsfw_model": TINY_SAFETY,
    **TINY_SAFETY_PASS,
}
# Every interrogator form, two post-processors, the weightless forms and one bridge-v13 upscaler (SPAN).
ALCHEMY_FORMS = ("caption", "interrogation", "nsfw", "aesthetic", "RealESRGAN_x2plus", "strip_background",
                 "vectorize", "palette", "describe", "2xModernSpanimationV1")


@dataclass
class DemoRequest:
    label: str
    kind: str  # "generation" | "alchemy"
    request_id: str


def sample_image(size: int = 64) -> Image.Image:
    """A small picture with a shape on a gradient: something for img2img and the interrogators to read."""
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            pixels[x, y] = (x * 255 // size, y * 255 // size, 128)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(240, 200, 40))
    return image


def _webp(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=90)
    return buffer.getvalue()


def build_demo_models(tiny_dir: Path) -> tuple[list[Path], list[str]]:
    """Tiny models of every kind; returns (their reference files, the SD model names)."""
    from controlnet.tiny import build_tiny_controlnets
    from interrogators.tiny import build_tiny_interrogators
    from models.tiny import TINY_NAMES, build_tiny_models
    from postprocessors.tiny import build_tiny_postprocessors

    reference = build_tiny_models(tiny_dir / "sd")
    build_tiny_postprocessors(tiny_dir, categories=["esrgan", "rembg"])  # the face fixers weigh 650 MB
    build_tiny_interrogators(tiny_dir)
    controlnets = build_tiny_controlnets(tiny_dir / "controlnet")
    return [reference, controlnets["controlnet"], controlnets["annotators"]], list(TINY_NAMES)


def demo_config(config: BridgeConfig, horde_url: str, api_key: str, models: list[str]) -> BridgeConfig:
    """The operator's settings, pointed at the local horde (and its CivitAI stand-in), serving both job
    families, LoRAs and TIs included."""
    forms = list(ALCHEMY_FORMS)
    return config.model_copy(update={
        "horde_url": horde_url, "api_key": api_key, "models_to_load": models, "models_to_skip": [],
        "dreamer": True, "alchemist": True, "force_cpu_generation": True, "forms": forms,
        "max_power": max(config.max_power, 8), "disable_terminal_ui": True, "stats_output_frequency": 0,
        "dynamic_models": False, "custom_model_reference": [], "allow_controlnet": True,
        "allow_private_sources": True,  # the local horde's source URLs are on loopback
        "state_dir": str(Path(config.state_dir) / "demo"),
        "allow_lora": True, "civitai_url": horde_url + "/civitai", "civitai_api_token": None,
        "prefetch_loras": 0,
    })


def post_samples(horde, models: list[str]) -> list[DemoRequest]:
    """One request of each kind the worker serves."""
    source = _webp(sample_image())
    base = {"width": 64, "height": 64, "steps": 2, "sampler_name": "k_euler", "cfg_scale": 5.0}
    sd, depth, inpaint = models[0], "tiny-sd2-depth", "tiny-inpainting"
    generations = [
        ("txt2img", dict(prompt="a lighthouse at dusk###blurry", models=[sd], params={**base, "seed": "42"})),
        ("txt2img n=2 karras", dict(prompt="a red fox", models=[sd],
                                    params={**base, "n": 2, "karras": True})),
        ("img2img", dict(prompt="a sunflower", models=[sd], source_image=source,
                         source_processing="img2img", params={**base, "denoising_strength": 0.6})),
        ("inpainting", dict(prompt="a blue door", models=[inpaint], source_image=source,
                            source_mask=_webp(Image.new("L", (64, 64), 255)), source_processing="inpainting",
                            params=base)),
        ("depth2img", dict(prompt="a stone bridge", models=[depth], source_image=source,
                           source_processing="img2img", params={**base, "denoising_strength": 0.7})),
        ("txt2img + RealESRGAN_x2plus", dict(prompt="a castle", models=[sd],
                                             params={**base, "post_processing": ["RealESRGAN_x2plus"]})),
        ("controlnet canny", dict(prompt="a lighthouse", models=[sd], source_image=source,
                                  params={**base, "control_type": "canny"})),
        ("controlnet hed map", dict(prompt="a lighthouse", models=[sd], source_image=source,
                                    params={**base, "control_type": "hed", "return_control_map": True})),
        ("SDXL txt2img", dict(prompt="a glacier", models=["tiny-sdxl"], params={**base, "clip_skip": 2})),
        ("SDXL outpainting", dict(prompt="a wide valley", models=["tiny-sdxl-inpainting"],
                                  source_image=_webp(sample_image().resize((32, 64))),
                                  source_processing="outpainting", params={**base, "width": 128})),
        ("txt2img + LoRA", dict(prompt="a lighthouse at dusk###blurry", models=[sd], params={
            **base, "seed": "42", "loras": [{"name": "Tiny Glow", "model": 0.8, "inject_trigger": "any"}]})),
        ("txt2img + TI", dict(prompt="a lighthouse at dusk###blurry", models=[sd], params={
            **base, "seed": "42", "tis": [{"name": "tinyneg", "inject_ti": "negprompt"}]})),
    ]
    requests = [DemoRequest(label, "generation", horde.request_generation(**body))
                for label, body in generations]
    url = horde.host_image(source, "demo-source.webp")
    for form in ALCHEMY_FORMS:
        requests.append(DemoRequest(form, "alchemy", horde.request_interrogation(url, [form])))
    return requests


def _save_generation(horde, status: dict[str, Any], folder: Path, label: str) -> list[str]:
    rows = []
    for index, gen in enumerate(status.get("generations", [])):
        name = f"{label.replace(' ', '_').replace('+', 'plus')}_{index}.webp"
        img = gen.get("img")
        if img and str(img).startswith("http"):
            (folder / name).write_bytes(horde.download(img))
        refs = [str(m.get("ref", "")) for m in gen.get("gen_metadata") or []]
        extras = [ref for ref in refs if ref.startswith(("lora ", "ti "))]
        note = f" ({'; '.join(extras)})" if extras else ""
        rows.append(f"{gen.get('state', '?')} seed={gen.get('seed')} -> {name}{note}")
    return rows or [f"faulted ({status.get('faulted')})"]


def _save_alchemy(horde, status: dict[str, Any], folder: Path, label: str) -> list[str]:
    rows = []
    for form in status.get("forms", []):
        result = form.get("result") or {}
        value = result.get(form.get("form"), result)
        if isinstance(value, str) and value.startswith("http"):
            name = f"alchemy_{label}.webp"
            (folder / name).write_bytes(horde.download(value))
            value = name
        text = json.dumps(value)[:90]
        rows.append(f"{form.get('state', '?')} {text}")
    return rows or [str(status.get("state"))]


def run_demo(config: BridgeConfig, *, output_dir: Path) -> int:
    from bridge.lora.tiny import add_to_standin, build_tiny_extras
    from local_horde import DEFAULT_API_KEY, LocalHorde

    tiny_dir = Path(config.cache_home) / "tiny"
    started = time.monotonic()
    log.info("building tiny demo models in %s (once)", tiny_dir)
    references, models = build_demo_models(tiny_dir)
    extras = build_tiny_extras(tiny_dir / "lora-files")
    log.info("models ready in %.1f s", time.monotonic() - started)
    grant = {bridge_agent_name(config): "AI Horde Worker reGen"}
    with LocalHorde(known_models=models, extra_bridges=grant) as horde:
        add_to_standin(horde.civitai, extras)
        settings = demo_config(config, horde.base_url, DEFAULT_API_KEY, models)
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent=CLIENT_AGENT)
        plan = plan_worker(settings, has_gpu=False, client=client,
                           reference=load_reference(settings, references, upstream=False))
        worker = build_worker(settings, plan, weights_dir=tiny_dir, interrogator_models=TINY_INTERROGATORS)
        # The demo's LoRA cache stays beside its tiny models, out of the operator's real one.
        worker.runtime.loras = lora_support(settings, tiny_dir / "demo-cache")
        requests = post_samples(horde, models)
        daemon = Daemon(client=client, runtime=worker.runtime, sources=worker.sources,
                        journal=Journal(Path(settings.state_dir) / "inflight.json"), stats=Stats())
        loop = threading.Thread(target=daemon.run, name="daemon", daemon=True)
        loop.start()
        try:
            statuses = horde.wait_done([r.request_id for r in requests], timeout=DEMO_TIMEOUT_S, poll=0.2)
        finally:
            daemon.request_stop("demo finished")
            loop.join(timeout=60)
        output_dir.mkdir(parents=True, exist_ok=True)
        table = []
        for request in requests:
            status = statuses[request.request_id]
            save = _save_generation if request.kind == "generation" else _save_alchemy
            for row in save(horde, status, output_dir, request.label):
                table.append((request.label, row))
    print(f"\n{'request':<30} result")
    for label, row in table:
        print(f"{label:<30} {row}")
    print(f"\n{daemon.stats.summary_line()}\nresults in {output_dir.resolve()}")
    print("The demo's models are tiny and have random weights: images are noise and captions are random "
          "words. The pipeline, the HTTP exchange and every job kind are the real ones.")
    failed = [label for label, row in table if row.startswith("faulted")]
    return 1 if failed else 0
