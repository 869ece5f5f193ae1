"""bench/hostile: 500 jobs through the local horde, 30% of them hostile, and not one popped id lost.

The real worker (daemon, both job families, tiny random-weight models) against the local horde playing an
attacker: crafted payloads (every kind of wrong JSON type), sources on private addresses and redirecting
into them, sources trickling their headers, odd image modes, corrupt images and bombs, more jobs than asked
for, presigned uploads answering 5xx or never, forms the worker does not serve; on top of that, the transport
faults that already existed (5xx, 408, a CDN's HTML 403, 429, redirects and malformed bodies on pops, lost
answers and refusals echoing the api key on submits) and moderator messages full of control characters.

The local horde (127.0.0.1) stands for the internet, so the worker's fetcher treats that address as public and
keeps the real rule for every other one: a RecordingHost on 127.0.0.2 plays the volunteer's LAN and must see
no request at all. Everything else is the default configuration (10 s source deadline, retry policy).

    flock /tmp/bench.lock .venv/bin/python -m bench.hostile [--jobs 500] [--hostile 0.3]

Prints jobs served, faulted by reason, dropped, LAN requests, peak RSS; last line:
`hostile lost_ids <popped ids with no submit and no logged drop> (target <= 0)`.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import random
import re
import resource
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bridge.config import BRIDGE_NAME, build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.demo import TINY_INTERROGATORS, build_demo_models
from bridge.horde_api import HordeClient
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.sources import SourceFetcher, is_public_address
from bridge.stats import Stats
from bridge.worker import build_worker, load_reference, plan_worker
from local_horde import CORRUPT_IMAGE_BYTES, LocalHorde, RecordingHost, huge_image_bytes

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench-cache"
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "k_euler", "cfg_scale": 5.0}
DROP_LINE = re.compile(r"(?:dropped \S+|could not fault|dropped the saved result of) ([0-9a-f]{8})")

# Generation hostility: (kind, share of the hostile generations).
GEN_KINDS = {"wrong_type": 0.34, "private_source": 0.12, "trickle_source": 0.05, "odd_mode": 0.12,
             "corrupt_source": 0.07, "over_delivery": 0.1, "r2_5xx": 0.12, "r2_stall": 0.04,
             "bomb_source": 0.04}  # fmt: skip
FORM_KINDS = {"payload_type": 0.2, "form_name": 0.14, "private_source": 0.14, "redirect_private": 0.14,
              "trickle_source": 0.04, "odd_mode": 0.14, "corrupt_source": 0.1, "unservable": 0.1}  # fmt: skip
WRONG_FIELDS = [
    ("ddim_steps", "many"), ("post_processing", "GFPGAN"), ("loras", {"name": "x"}), ("seed", [1]),
    ("cfg_scale", True), ("width", "wide"), ("karras", "yes"), ("n_iter", 2.5), ("special", []),
    ("tis", "x"), ("prompt", {"text": "x"}), ("clip_skip", "2"), ("denoising_strength", "half"),
]  # fmt: skip
TOP_WRONG = [("ttl", "soon"), ("r2_uploads", "nope"), ("extra_source_images", 5), ("model", ["x"]),
             ("payload", [1, 2]), ("source_image", {"url": "x"})]


def image_bytes(mode: str, fmt: str, color: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (48, 48), color).save(buffer, format=fmt)
    return buffer.getvalue()


def premultiplied_la_tiff() -> bytes:
    data = image_bytes("LA", "TIFF", (100, 128))
    extra_samples = b"\x52\x01\x03\x00\x01\x00\x00\x00"  # tag 338, SHORT, count 1
    return data.replace(extra_samples + b"\x02", extra_samples + b"\x01")  # associated: PIL decodes "La"


ODD_MODES = [
    premultiplied_la_tiff(), image_bytes("I;16", "PNG", 40000), image_bytes("CMYK", "JPEG", (0, 90, 0, 0)),
    image_bytes("LAB", "TIFF", (128, 100, 150)), image_bytes("F", "TIFF", 0.5),
    image_bytes("PA", "TIFF", (3, 120)), image_bytes("1", "BMP", 1),
]


class DropLog(logging.Handler):
    """The worker's own record of what it dropped: an id with a logged drop is not lost."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped: set[str] = set()
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        match = DROP_LINE.search(record.getMessage())
        if match:
            self.dropped.add(match.group(1))


# ---- the attacker -------------------------------------------------------------------------------------


class Attacker:
    """Marks hostile requests (prompt / form payload) and edits the pops that carry them."""

    def __init__(self, horde: LocalHorde, lan: RecordingHost, rng: random.Random) -> None:
        self.horde, self.lan, self.rng = horde, lan, rng
        self.trickle_url = horde.host_image(image_bytes("RGB", "PNG", "red"), "trickle.png")
        horde.faults.trickle("/r2/hosted/trickle.png", seconds=60, interval_s=0.2, count=None)
        self.redirect_url = horde.host_image(image_bytes("RGB", "PNG", "green"), "jump.png")
        horde.faults.redirect("/r2/hosted/jump.png", lan.url("/router.png"), status=302, method="GET",
                              count=None)
        horde.faults.http_error("/r2/broken/*", 503, method="PUT", count=None)
        horde.faults.hang("/r2/stall/*", 60, method="PUT", count=None)
        horde.faults.rewrite("*/generate/pop", self.edit_generation, count=None)
        horde.faults.rewrite("*/interrogate/pop", self.edit_forms, count=None)

    def edit_generation(self, body: Any) -> Any:
        prompt = str(body.get("payload", {}).get("prompt", "")) if body.get("ids") else ""
        match = re.match(r"HOSTILE (\w+) (\d+)", prompt)
        if not match:
            return None
        kind, index = match.group(1), int(match.group(2))
        if kind == "wrong_type":
            fields = WRONG_FIELDS + TOP_WRONG
            field, value = fields[index % len(fields)]
            if (field, value) in TOP_WRONG:
                body[field] = value
            else:
                body["payload"][field] = value
        elif kind == "private_source":
            body["source_image"] = self.lan.url(f"/camera-{index}.png")
            body["source_processing"] = "img2img"
        elif kind == "trickle_source":
            body["source_image"] = self.trickle_url
        elif kind in ("r2_5xx", "r2_stall"):
            folder = "broken" if kind == "r2_5xx" else "stall"
            body["r2_uploads"] = [u.replace("/r2/generations/", f"/r2/{folder}/") for u in body["r2_uploads"]]
            body["r2_upload"] = body["r2_uploads"][0]
        else:
            return None
        return body

    def edit_forms(self, body: Any) -> Any:
        forms = body.get("forms") if isinstance(body, dict) else None
        edited = False
        for form in forms or []:
            kind = (form.get("payload") or {}).get("hostile")
            if kind == "payload_type":
                form["payload"], edited = ["not", "a", "dict"], True
            elif kind == "form_name":
                form["form"], edited = 7, True
            elif kind == "unservable":
                form["form"], edited = "GFPGAN", True
        return body if edited else None


def post_requests(horde: LocalHorde, attacker: Attacker, jobs: int, hostile: float, rng: random.Random,
                  model: str) -> collections.Counter:
    """Half generations, half alchemy forms; `hostile` of each hostile, by the kinds' shares."""
    kinds: collections.Counter = collections.Counter()
    generations, forms = jobs // 2, jobs - jobs // 2
    good = horde.host_image(image_bytes("RGB", "WEBP", "purple"), "good.webp")
    for family, count, table in (("generation", generations, GEN_KINDS), ("alchemy", forms, FORM_KINDS)):
        plan = [k for k, share in table.items() for _ in range(round(share * count * hostile))]
        plan += ["normal"] * (count - len(plan))
        rng.shuffle(plan)
        for index, kind in enumerate(plan):
            kinds[f"{family}:{kind}"] += 1
            if family == "generation":
                post_generation(horde, attacker, kind, index, model)
            else:
                post_form(horde, attacker, kind, index, good)
    return kinds


def post_generation(horde: LocalHorde, attacker: Attacker, kind: str, index: int, model: str) -> None:
    params, extra = dict(SMALL), {}
    if kind == "odd_mode":
        extra = {"source_image": ODD_MODES[index % len(ODD_MODES)], "source_processing": "img2img"}
        params["denoising_strength"] = 0.6
    elif kind in ("corrupt_source", "bomb_source"):
        data = CORRUPT_IMAGE_BYTES if kind == "corrupt_source" else huge_image_bytes(9000, 9000)
        extra = {"source_image": data, "source_processing": "img2img"}
    elif kind == "over_delivery":
        params["n"] = 3
    prompt = f"HOSTILE {kind} {index}" if kind != "normal" else f"a lighthouse, take {index}"
    horde.request_generation(params, models=[model], prompt=prompt, **extra)


def post_form(horde: LocalHorde, attacker: Attacker, kind: str, index: int, good: str) -> None:
    source = {
        "private_source": attacker.lan.url(f"/lan-{index}.png"), "redirect_private": attacker.redirect_url,
        "trickle_source": attacker.trickle_url,
    }.get(kind, good)  # fmt: skip
    if kind == "odd_mode":
        source = horde.host_image(ODD_MODES[index % len(ODD_MODES)])
    elif kind == "corrupt_source":
        source = horde.host_image(CORRUPT_IMAGE_BYTES if index % 2 else huge_image_bytes())
    name = "caption" if index % 2 else "nsfw"
    form = {"name": name, "payload": {"hostile": kind}} if kind != "normal" else {"name": name}
    horde.request_interrogation(source, [form])


def transport_faults(horde: LocalHorde, lan: RecordingHost) -> None:
    """The fault injection that already existed, plus the hostile answers any horde or proxy may give."""
    f = horde.faults
    f.http_error("*/pop", 503, probability=0.02, count=None)
    f.http_error("*/pop", 408, probability=0.01, count=None)
    f.http_error("*/pop", 403, html=True, probability=0.01, count=None)
    f.rate_limit("*/pop", retry_after=0.05, probability=0.01, count=None)
    f.redirect("*/pop", lan.url("/api/v2/pop"), probability=0.01, count=None)
    f.malformed("*/pop", probability=0.01, count=None)
    f.over_deliver("*/generate/pop", extra=2, probability=1.0, count=None)  # bites only n>1 requests
    f.over_deliver("*/interrogate/pop", extra=2, probability=0.05, count=None)
    f.http_error("*/submit", 503, probability=0.03, count=None)
    f.drop("*/submit", after=True, probability=0.02, count=None)
    f.http_error("*/generate/submit", 400, rc="BadRequest", message="refused for key {apikey}",
                 probability=0.01, count=None)
    f.messages("read this\n2026-01-01 00:00:00 ERROR bridge: forged line\x1b[2J\x07", count=None)
    f.messages("read this too\x1b]0;owned\x07", pattern="*/interrogate/pop", count=None)


# ---- the worker -----------------------------------------------------------------------------------------


def make_worker(horde: LocalHorde, models: list[str], references: list[Path]):
    settings = {
        "horde_url": horde.base_url, "api_key": horde.api_key, "models_to_load": models[:1],
        "dreamer": True, "alchemist": True, "force_cpu_generation": True, "forms": ["caption", "nsfw"],
        "max_threads": 2, "queue_size": 2, "cache_home": str(CACHE / "cache"),
        "state_dir": str(CACHE / "state"), "allow_post_processing": False, "disable_terminal_ui": True,
    }
    config = build_config(settings, environ={}).config
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, references, upstream=False))
    worker = build_worker(config, plan, weights_dir=CACHE / "tiny", interrogator_models=TINY_INTERROGATORS)
    # The default fetcher (10 s deadline, public addresses only), with 127.0.0.1 standing for the internet.
    worker.runtime.fetcher = SourceFetcher(
        address_allowed=lambda a: str(a) == "127.0.0.1" or is_public_address(a))
    client = HordeClient(horde.base_url, horde.api_key, client_agent="bench:1:hostile",
                         retry=RetryPolicy(base_delay=0.05, max_delay=0.5), upload_timeout=2.0)
    return config, client, worker


def fault_text(submit: dict, lines: dict[str, str]) -> str:
    text = " ".join(m.get("ref", "") + " " + m.get("value", "") for m in submit.get("gen_metadata", []))
    return text or lines.get(submit["id"][:8], "")


def fault_reason(submit: dict, lines: dict[str, str]) -> str:
    text = fault_text(submit, lines)
    for reason, words in (("unreadable field", ("wrong type", "parse_failed: payload")),
                          ("over-delivered", ("over-delivered",)), ("not served here", ("not served",)),
                          ("source unusable", ("download_failed", "parse_failed", "source image")),
                          ("submit refused", ("submit refused",)), ("ttl ran out", ("ttl ran out",)),
                          ("worker stopped", ("shut down",))):
        if any(word in text for word in words):
            return reason
    return "other"


class FaultLines(logging.Handler):
    """id prefix -> why the worker faulted it (alchemy submits carry no gen_metadata)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = re.search(r"alchemy \S+ ([0-9a-f]{8}) faulted: (.*)", message)
        if match:
            self.lines[match.group(1)] = match.group(2)


def wait_finished(horde: LocalHorde, timeout: float) -> None:
    """Until every request is done or given up by the horde (read in-process: no polling over HTTP that
    would load the server the worker talks to)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with horde.registry.lock:
            gens = [horde.generations.status(r, with_generations=False) for r in horde.generations.requests]
            forms = [horde.alchemy.status(r)["state"] for r in horde.alchemy.requests]
        if all(g["done"] or g["faulted"] for g in gens) and all(f in ("done", "faulted", "partial")
                                                              for f in forms):
            return
        time.sleep(1.0)
    raise TimeoutError(f"requests not finished after {timeout} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--hostile", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)  # the console shows errors; the handlers below read the rest
    drops, faults = DropLog(), FaultLines()
    for handler in (drops, faults):
        logging.getLogger("bridge").addHandler(handler)
    logging.getLogger("bridge").setLevel(logging.INFO)
    rng = random.Random(args.seed)
    references, models = build_demo_models(CACHE / "tiny")
    lan = RecordingHost()
    # Short ttls: an id the worker drops (a faulted submit refused) comes back to the queue after its ttl; the
    # horde's own 150 s / 180 s would only make the run wait.
    horde = LocalHorde(known_models=models, fault_seed=args.seed, job_ttl=60, form_ttl=60,
                       extra_bridges={BRIDGE_NAME: "AI Horde Worker reGen"})
    with lan, horde:
        config, client, worker = make_worker(horde, models, references)
        attacker = Attacker(horde, lan, rng)
        kinds = post_requests(horde, attacker, args.jobs, args.hostile, rng, models[0])
        transport_faults(horde, lan)
        stats = Stats()
        daemon = Daemon(client=client, runtime=worker.runtime, sources=worker.sources, stats=stats,
                        journal=Journal(CACHE / "state" / f"hostile-{time.time_ns()}.json"),
                        timings=LoopTimings(idle_poll_s=0.05, error_poll_s=0.2))
        thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
        started = time.monotonic()
        thread.start()
        wait_finished(horde, timeout=1800)
        daemon.request_stop("benchmark done")
        thread.join(timeout=300)
        wall = time.monotonic() - started
        books = horde.accounting()
    report(args, kinds, books, drops, faults, lan, stats, wall, daemon.stop_reason)


def report(args, kinds, books, drops: DropLog, faults: FaultLines, lan: RecordingHost, stats: Stats,
           wall: float, stop_reason: str | None) -> None:
    handed_out = books.handed_out
    submitted = {i for i in handed_out if books.submits.get(i)}
    lost = [i for i in handed_out if i not in submitted and i[:8] not in drops.dropped]
    first = {i: books.submits[i][0] for i in submitted}
    served = sum(s.get("state", "ok") != "faulted" for s in first.values())
    reasons = collections.Counter(fault_reason(s, faults.lines) for s in first.values()
                                  if s.get("state") == "faulted")
    hostile_jobs = sum(v for k, v in kinds.items() if not k.endswith(":normal"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"requests {sum(kinds.values())} ({hostile_jobs} hostile: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()) if not k.endswith(":normal")) + ")")
    print(f"ids handed out {len(handed_out)} (requeues included), submitted {len(submitted)}, "
          f"dropped with a log line {len(drops.dropped)}, worker stop reason {stop_reason}")
    print(f"jobs served {served}, faulted {sum(reasons.values())}: "
          + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    others = [fault_text(s, faults.lines)[:120] or "(no reason recorded)" for s in first.values()
              if s.get("state") == "faulted" and fault_reason(s, faults.lines) == "other"]
    if others:
        print("other faults: " + " | ".join(others[:3]))
    print(f"requests to the LAN host {len(lan.seen)}, wall {wall:.1f} s, peak RSS {peak_mb:.0f} MB "
          f"(machine shared), stats: {stats.summary_line()}")
    print(f"hostile lost_ids {len(lost)} (target <= 0)")


if __name__ == "__main__":
    main()
