"""Assembling a worker from its config: device, model cache, models, processors, interrogators, sources.

`build_worker` is shared by the real daemon (`run_worker`) and the offline demo, which only differs in where
the horde is and which reference files describe the models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.config import (
    BRIDGE_NAME,
    BRIDGE_URL,
    BRIDGE_VERSION,
    BridgeConfig,
    api_base,
    dreamer_name,
    modes,
)
from bridge.daemon import Daemon, install_signal_handlers
from bridge.errors import HordeError, WorkerStopError
from bridge.horde_api import HordeClient
from bridge.jobs.base import JobSource
from bridge.journal import Journal
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from bridge.stats import Stats
from bridge.status_ui import StatsReporter, live_status

log = logging.getLogger(__name__)

CLIENT_AGENT = f"{BRIDGE_NAME}:{BRIDGE_VERSION}:{BRIDGE_URL}"


@dataclass
class Worker:
    runtime: Runtime
    sources: list[JobSource]
    dreamer: bool
    alchemist: bool
    notes: list[str] = field(default_factory=list)


def choose_modes(config: BridgeConfig, has_gpu: bool) -> tuple[bool, bool, list[str]]:
    """(dreamer, alchemist, notes): generation on a CPU only when explicitly forced."""
    dream, alchemy = modes(config, has_gpu=has_gpu)
    notes = []
    if dream and not has_gpu and not config.force_cpu_generation:
        notes.append("no CUDA GPU found: image generation is off (minutes per image on a CPU). "
                     "Set force_cpu_generation: true to generate anyway.")
        dream = False
    return dream, alchemy, notes


def build_worker(
    config: BridgeConfig,
    *,
    device=None,
    client: HordeClient | None = None,
    reference_files: Sequence[Path] = (),
    weights_dir: Path | None = None,
    upstream_reference: bool = True,
    interrogator_models: Mapping[str, str] | None = None,
) -> Worker:
    """Everything but the loop. `weights_dir` (default cache_home) is where post-processor and
    interrogator weights live; `reference_files` add local model reference files; `interrogator_models`
    names other interrogator models than the defaults (caption_model, clip_model, nsfw_model)."""
    from models.cache import ModelCache, ram_budget, vram_budget
    from models.device import DevicePolicy

    device = device or DevicePolicy.detect(force_cpu=False)
    dream, alchemy, notes = choose_modes(config, device.is_cuda)
    cache = ModelCache(device, ram_budget_bytes=ram_budget(config.ram_to_leave_free),
                       vram_budget_bytes=vram_budget(config.vram_to_leave_free, device))
    cache_home = Path(config.cache_home)
    weights = weights_dir or cache_home
    runtime = Runtime(config=config, device=device, fetcher=SourceFetcher())
    sources: list[JobSource] = []
    if dream or alchemy:
        runtime.postprocessors = _postprocessors(weights, cache, device)
    names = dict(interrogator_models or {})
    if dream:
        _quiet_diffusers()
        runtime.models = _model_manager(config, cache, device, reference_files, client, upstream_reference)
        runtime.models.download_missing()
        runtime.safety = _safety_checker(weights, cache, device, names)
        from bridge.jobs.generation import GenerationSource

        sources.append(GenerationSource())
    if alchemy:
        from interrogators import build_interrogators

        runtime.interrogators = build_interrogators(models_dir=weights, cache=cache, device=device,
                                                    forms=config.forms, **names)
        from bridge.jobs.alchemy import AlchemySource

        sources.append(AlchemySource())
    return Worker(runtime, sources, dream, alchemy, notes)


def _quiet_diffusers() -> None:
    """from_single_file prints per-load progress bars that would interleave with the log."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _postprocessors(weights: Path, cache, device):
    from postprocessors.registry import PostProcessorRegistry

    return PostProcessorRegistry(weights_dir=weights, cache=cache, device=device)


def _safety_checker(weights: Path, cache, device, names: Mapping[str, str]):
    """The NSFW checker generation censors with (requests may ask for it whatever the worker's settings)."""
    from interrogators import NSFW_FORM, build_interrogators

    return build_interrogators(models_dir=weights, cache=cache, device=device, forms=[NSFW_FORM],
                               **names).nsfw


def _model_manager(config: BridgeConfig, cache, device, reference_files, client, upstream: bool):
    from models.downloads import Downloader
    from models.manager import ModelManager
    from models.reference import ModelReference

    cache_home = Path(config.cache_home)
    extra = [Path(p) for p in config.custom_model_reference] + list(reference_files)
    reference = ModelReference.load(cache_dir=cache_home / "reference", extra_files=extra,
                                    **({} if upstream else {"upstream": None}))
    stats = client.model_stats if client is not None else None
    resolved = reference.resolve(config.models_to_load, config.models_to_skip, model_stats=stats,
                                 max_models=config.max_models_to_download)
    for warning in resolved.warnings:
        log.warning("models: %s", warning)
    return ModelManager(reference=reference, cache=cache, device=device, cache_home=cache_home,
                        models=resolved.names, downloader=Downloader(cache_home))


def make_client(config: BridgeConfig) -> HordeClient:
    return HordeClient(api_base(config), config.api_key.get_secret_value(), client_agent=CLIENT_AGENT)


def greet(client: HordeClient, config: BridgeConfig, worker: Worker) -> None:
    """find_user at start: the operator sees who they serve as, or why they can't."""
    user = client.find_user()
    names = [dreamer_name(config)] if worker.dreamer else []
    names += [config.alchemist_name] if worker.alchemist else []
    log.info("serving as %s (kudos %s) with worker(s) %s", user.get("username", "?"), user.get("kudos", "?"),
             ", ".join(repr(n) for n in names))
    if config.remove_maintenance_on_init:
        leave_maintenance(client, user, names)


def leave_maintenance(client: HordeClient, user: dict, names: list[str]) -> None:
    """remove_maintenance_on_init: PUT /workers/{id} {"maintenance": false} for our workers in it."""
    for worker_id in user.get("worker_ids") or []:
        try:
            details = client.get_worker(worker_id)
            if details.get("name") in names and details.get("maintenance_mode"):
                client.set_maintenance(worker_id, False)
                log.info("worker %r left maintenance mode", details.get("name"))
        except HordeError as err:
            log.warning("could not clear maintenance of worker %s: %s", worker_id, err)


def serve(worker: Worker, client: HordeClient, config: BridgeConfig) -> int:
    """Run the daemon until stopped; signals give warm then cold shutdown."""
    journal = Journal(Path(config.state_dir) / "inflight.json")
    stats = Stats()
    daemon = Daemon(client=client, runtime=worker.runtime, sources=worker.sources, journal=journal,
                    stats=stats)
    restore = install_signal_handlers(daemon)
    try:
        with StatsReporter(stats, config.stats_output_frequency), \
                live_status(stats, enabled=not config.disable_terminal_ui):
            code = daemon.run()
    finally:
        restore()
    if daemon.stop_reason:
        log.error("stopped: %s", daemon.stop_reason)
    return code


def run_worker(config: BridgeConfig) -> int:
    client = make_client(config)
    try:
        worker = build_worker(config, client=client)
        for note in worker.notes:
            log.warning(note)
        if not worker.sources:
            log.error("nothing to serve: generation needs a GPU (or force_cpu_generation) and alchemy is off "
                      "(set alchemist: true and choose forms)")
            return 1
        greet(client, config, worker)
    except WorkerStopError as err:
        log.error("the horde refused this worker: %s", err)
        return 2
    except HordeError as err:
        log.warning("could not reach the horde at start (%s): serving anyway, pops will retry", err)
    return serve(worker, client, config)


def download_models(config: BridgeConfig) -> int:
    """--download-models: fetch and verify the configured models, say what is ready."""
    from models.device import DevicePolicy

    client = make_client(config)
    worker_device = DevicePolicy.cpu()
    from models.cache import ModelCache

    cache = ModelCache(worker_device, ram_budget_bytes=1)
    manager = _model_manager(config, cache, worker_device, (), client, True)
    ready = manager.download_missing()
    for name, ok in ready.items():
        log.info("%s: %s", name, "ready" if ok else "NOT ready (see above)")
    return 0 if ready and all(ready.values()) else 1
