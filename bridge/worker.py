"""Assembling a worker from its config: device, model cache, models, processors, interrogators, sources.

1. `plan_worker`: which families run on this machine, the model reference (the horde's files plus the
   bridge's own entries), the resolved model list.
2. `download_weights`: fetch and verify what the plan needs (checkpoints, post-processor and interrogator
   weights) before anything is advertised.
3. `build_worker`: the runtime and the job sources. The offline demo and the benchmarks call it with tiny
   models; `run_worker` with the operator's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bridge import horde_names
from bridge.config import (
    BRIDGE_NAME,
    BRIDGE_URL,
    BRIDGE_VERSION,
    BridgeConfig,
    api_base,
    configured_forms,
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

if TYPE_CHECKING:
    from models.device import DevicePolicy
    from models.reference import ModelReference

log = logging.getLogger(__name__)

CLIENT_AGENT = f"{BRIDGE_NAME}:{BRIDGE_VERSION}:{BRIDGE_URL}"
STRIP_BACKGROUND_REFERENCE = Path(__file__).resolve().parents[1] / "postprocessors" / "strip_background.json"
# The eight post-processors the horde added at bridge v13: not in the horde's reference files yet.
V13_POSTPROCESSORS_REFERENCE = STRIP_BACKGROUND_REFERENCE.with_name("horde_v13.json")


@dataclass
class WorkerPlan:
    dreamer: bool
    alchemist: bool
    reference: ModelReference
    models: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Worker:
    runtime: Runtime
    sources: list[JobSource]
    dreamer: bool
    alchemist: bool
    notes: list[str] = field(default_factory=list)
    reference: ModelReference | None = None


def choose_modes(config: BridgeConfig, has_gpu: bool) -> tuple[bool, bool, list[str]]:
    """(dreamer, alchemist, notes): generation on a CPU only when explicitly forced."""
    dream, alchemy = modes(config, has_gpu=has_gpu)
    notes = []
    if dream and not has_gpu and not config.force_cpu_generation:
        notes.append("no CUDA GPU found: image generation is off (minutes per image on a CPU). "
                     "Set force_cpu_generation: true to generate anyway.")
        dream = False
    return dream, alchemy, notes


def load_reference(config: BridgeConfig, reference_files: Sequence[Path] = (), upstream: bool = True):
    """The horde's reference plus the bridge's own entries (interrogation models, strip_background, the
    bridge-v13 post-processors, the ControlNet annotators) and the operator's custom files."""
    from controlnet import ANNOTATOR_REFERENCE
    from interrogators.reference import REFERENCE_PATH as INTERROGATOR_REFERENCE
    from models.reference import ModelReference

    extra = [INTERROGATOR_REFERENCE, STRIP_BACKGROUND_REFERENCE, V13_POSTPROCESSORS_REFERENCE,
             ANNOTATOR_REFERENCE]
    extra += [Path(p) for p in config.custom_model_reference] + list(reference_files)
    source: dict = {"upstream": None} if not upstream else {}
    if upstream and config.model_reference:
        source = {"upstream": config.model_reference}  # a mirror or a local copy, instead of the internet
    return ModelReference.load(cache_dir=Path(config.cache_home) / "reference", extra_files=extra, **source)


def plan_worker(config: BridgeConfig, *, has_gpu: bool, client: HordeClient | None = None,
                reference=None) -> WorkerPlan:
    dream, alchemy, notes = choose_modes(config, has_gpu)
    reference = reference if reference is not None else load_reference(config)
    models: list[str] = []
    if dream:
        stats = client.model_stats if client is not None else None
        resolved = reference.resolve(config.models_to_load, config.models_to_skip, model_stats=stats,
                                     max_models=config.max_models_to_download)
        notes += [f"models: {warning}" for warning in resolved.warnings]
        models = list(resolved.names)
        if config.only_models_on_disk:
            models, absent = on_disk(config, reference, models)
            if absent:
                notes.append(f"only_models_on_disk: not serving {len(absent)} model(s) whose files are not "
                             f"all on disk ({', '.join(absent)})")
    return WorkerPlan(dream, alchemy, reference, models, notes)


def on_disk(config: BridgeConfig, reference, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(models whose files are present and verified, the others): only_models_on_disk downloads nothing."""
    from models.downloads import is_ready, model_dir

    present, absent = [], []
    for name in names:
        record = reference.get(name)
        (present if is_ready(record, model_dir(Path(config.cache_home), record)) else absent).append(name)
    return present, absent


def weight_records(config: BridgeConfig, plan: WorkerPlan) -> list:
    """Reference records of everything the plan runs on: checkpoints, post-processors, interrogators."""
    from interrogators.reference import AESTHETIC, CAPTION_LARGE, CLIP_L14, DEEPDANBOORU, SAFETY_CHECKER
    from postprocessors import ORDER as POSTPROCESSORS

    wanted = list(plan.models)
    if plan.dreamer:
        wanted += [config.clip_model or CLIP_L14, DEEPDANBOORU]  # the safety pass over every generated image
        if config.send_aesthetic_score:
            wanted.append(AESTHETIC)
        if config.sd_safety_checker:
            wanted.append(config.nsfw_model or SAFETY_CHECKER)
        if config.allow_post_processing:
            wanted += list(POSTPROCESSORS)
    if plan.alchemist:
        clip = config.clip_model or CLIP_L14
        by_form = {"caption": [config.caption_model or CAPTION_LARGE], "interrogation": [clip],
                   "nsfw": [clip, DEEPDANBOORU], "aesthetic": [clip, AESTHETIC]}  # fmt: skip
        weightless = set(horde_names.WEIGHTLESS_FORMS)
        for form in configured_forms(config):
            if form not in weightless:
                wanted += by_form.get(form, [form])
    if any(name in wanted for name in horde_names.FACE_FIXERS):
        wanted.append("GFPGAN")  # the horde lists the face detector and parser under GFPGAN
    records = []
    for name in dict.fromkeys(wanted):
        try:
            records.append(plan.reference.get(name))
        except KeyError:
            log.warning("no reference entry for %s: its weights cannot be downloaded", name)
    return records + controlnet_records(config, plan)


def controlnet_records(config: BridgeConfig, plan: WorkerPlan) -> list:
    """allow_controlnet: the ControlNets and annotators of every type the served models' baselines take."""
    if not (plan.dreamer and config.allow_controlnet):
        return []
    from controlnet import ControlNets, can_control
    from models.cache import ModelCache
    from models.device import DevicePolicy

    baselines = []
    for name in plan.models:
        record = plan.reference.get(name)
        if can_control(record):
            baselines.append(record.baseline)
    probe = ControlNets(reference=plan.reference, cache=ModelCache(DevicePolicy.cpu(), ram_budget_bytes=0),
                        device=DevicePolicy.cpu(), cache_home=Path(config.cache_home))
    return probe.wanted_records(baselines)


def download_weights(config: BridgeConfig, plan: WorkerPlan) -> dict[str, bool]:
    """Fetch and verify what the plan needs (missing files only); name -> ready."""
    from models.downloads import Downloader

    ready = {}
    downloader = Downloader(Path(config.cache_home), rate_limit_kbps=config.download_rate_limit_kbps)
    outcomes = downloader.ensure_all(weight_records(config, plan))
    for name, outcome in outcomes.items():
        if not outcome.ok:
            log.error("%s is not ready: %s", name, outcome.reason)
        ready[name] = outcome.ok
    return ready


def build_worker(
    config: BridgeConfig,
    plan: WorkerPlan,
    *,
    device: DevicePolicy | None = None,
    weights_dir: Path | None = None,
    interrogator_models: Mapping[str, str] | None = None,
) -> Worker:
    """The runtime and sources. `weights_dir` (default cache_home) holds post-processor and interrogator
    weights; `interrogator_models` names other interrogator models than the defaults (caption_model,
    clip_model, danbooru_model, aesthetic_model; safety_clip_model for the generation safety pass when it
    is not clip_model; nsfw_model for the SD safety checker)."""
    from bridge.admission import Admission
    from models.cache import ModelCache
    from models.device import DevicePolicy
    from models.working_memory import TABLE_FILE, WorkingMemoryTable

    device = device or DevicePolicy.detect()
    apply_cpu_thread_policy(config, device)
    # Soft budgets, read from the machine whenever room is made: never a ceiling on what a job may load.
    cache = ModelCache(device, ram_to_leave_free=config.ram_to_leave_free,
                       vram_to_leave_free=config.vram_to_leave_free)
    log_memory(config, cache)
    weights = weights_dir or Path(config.cache_home)
    names = {key: value for key in ("caption_model", "clip_model", "nsfw_model")
             if (value := getattr(config, key)) is not None}
    names.update(interrogator_models or {})
    runtime = Runtime(config=config, device=device,
                      fetcher=SourceFetcher(allow_private=config.allow_private_sources))
    runtime.cache = cache
    runtime.postprocessors = _postprocessors(weights, cache, device)
    table = WorkingMemoryTable(device, Path(config.cache_home) / TABLE_FILE)
    runtime.admission = Admission(cache=cache, device=device, table=table)
    sources: list[JobSource] = []
    if plan.alchemist:
        # Before the dreamer's models: interrogators warm (and embed their term lists) before the first pop.
        _add_interrogators(runtime, weights, names)
    if plan.dreamer:
        sources.append(_add_dreamer(runtime, plan, weights, names))
    if plan.alchemist:
        sources.append(_alchemy_source(runtime))
    return Worker(runtime, sources, plan.dreamer, plan.alchemist, list(plan.notes), plan.reference)


def _add_interrogators(runtime: Runtime, weights: Path, names: Mapping[str, str]) -> None:
    from interrogators import build_interrogators

    # nsfw_model names the generation pass's SD checker, safety_clip_model its CLIP: not the forms' models.
    form_models = {key: value for key, value in names.items()
                   if key not in ("safety_clip_model", "nsfw_model")}
    runtime.interrogators = build_interrogators(models_dir=weights, cache=runtime.cache,
                                                device=runtime.device, forms=runtime.config.forms,
                                                **form_models)
    # First loads and the term embeddings take minutes on a CPU for real models: pay them before the
    # first pop, not inside a form's 3-minute ttl.
    warm_interrogators(runtime.interrogators, runtime.admission)


def _add_dreamer(runtime: Runtime, plan: WorkerPlan, weights: Path, names: Mapping[str, str]) -> JobSource:
    """The generation side: its models, its safety pass, LoRAs and ControlNets."""
    from bridge.jobs.generation import GenerationSource
    from models.manager import ModelManager

    config, cache, device = runtime.config, runtime.cache, runtime.device
    _quiet_diffusers()
    runtime.models = ModelManager(reference=plan.reference, cache=cache, device=device,
                                  cache_home=Path(config.cache_home), models=plan.models)
    runtime.admission.models = runtime.models
    _build_generation_safety(runtime, weights, cache, names.get("aesthetic_model"),
                             clip_model=names.get("safety_clip_model", names.get("clip_model")),
                             danbooru_model=names.get("danbooru_model"),
                             sd_checker=names.get("nsfw_model"))
    runtime.loras = lora_support(config)
    if config.allow_controlnet:
        from controlnet import ControlNets

        runtime.controlnets = ControlNets(reference=plan.reference, cache=cache, device=device,
                                          cache_home=Path(config.cache_home))
    return GenerationSource()


def _alchemy_source(runtime: Runtime) -> JobSource:
    from bridge.jobs.alchemy import FORM_TTL, AlchemySource
    from bridge.jobs.tiles import TileBudget, calibrate

    config = runtime.config
    tiles = TileBudget(ttl=FORM_TTL, queue_size=config.queue_size, max_threads=config.max_threads)
    calibrate(tiles, runtime.postprocessors, config.forms)
    return AlchemySource(tiles=tiles)


def warm_interrogators(interrogators, admission) -> None:
    """Load each interrogator once (and embed the term lists). One whose model this machine cannot hold
    (by its files' size, or failing to load) is dropped from the set, so its forms are never offered; the
    others are served."""
    from bridge.admission import INTERROGATOR_HOLDERS, MEMORY_ERRORS, free_device_memory, interrogator_sizes

    sizes = interrogator_sizes(interrogators, admission.table, admission.device.dtype)
    ready = interrogators.ready_forms()
    for holder in dict.fromkeys(INTERROGATOR_HOLDERS.values()):
        forms = [form for form in ready if INTERROGATOR_HOLDERS[form] == holder]
        if not forms:
            continue
        failed = None
        measured = [form for form in forms if form in sizes]
        if measured and not admission.form_fits(measured[0], *sizes[measured[0]]):
            failed = f"{sizes[measured[0]][0] / 1024**3:.1f} GiB of weights, {admission.where} too small"
        else:
            try:
                getattr(interrogators, holder).warm()
            except MEMORY_ERRORS as exc:
                failed = f"{type(exc).__name__}: {exc}"
        if failed:
            free_device_memory(admission.device)
            log.error("the model of the %s form(s) does not fit this machine (%s): not serving it",
                      ", ".join(forms), failed)
            setattr(interrogators, holder, None)


def log_memory(config: BridgeConfig, cache) -> None:
    """What the volunteer's two memory keys mean on this machine, in one line each."""
    from models.cache import Tier

    gib = 1024**3
    ram_free, ram_total = cache.device.ram_bytes()
    log.info("memory: %.1f GiB RAM, %.1f GiB free; models stay cached between jobs up to %.1f GiB "
             "(ram_to_leave_free %s); a job may use up to %.1f GiB", ram_total / gib, ram_free / gib,
             cache.budget(Tier.RAM) / gib, config.ram_to_leave_free, cache.capacity(Tier.RAM) / gib)
    if cache.device.has_vram:
        free, total = cache.device.vram_bytes()
        log.info("memory: %.1f GiB GPU, %.1f GiB free; models stay on it between jobs up to %.1f GiB "
                 "(vram_to_leave_free %s); a job may use up to %.1f GiB", total / gib, free / gib,
                 cache.budget(Tier.VRAM) / gib, config.vram_to_leave_free, cache.capacity(Tier.VRAM) / gib)


def _build_generation_safety(
    runtime: Runtime, weights: Path, cache, aesthetic_model: str | None, *,
    clip_model: str | None, danbooru_model: str | None, sd_checker: str | None,
) -> None:  # fmt: skip
    """The safety pass every generated image goes through (sharing the alchemy forms' CLIP when it is the
    same model), warmed now: without it the worker pops no generation (GenerationSource.ready)."""
    from interrogators import build_safety, build_sd_safety_checker
    from interrogators.reference import AESTHETIC, CLIP_L14, DEEPDANBOORU, SAFETY_CHECKER

    config, clip_model = runtime.config, clip_model or CLIP_L14
    embedder = _shared_embedder(runtime.interrogators, clip_model)
    aesthetic = (aesthetic_model or AESTHETIC) if config.send_aesthetic_score else None
    safety = build_safety(models_dir=weights, cache=cache, clip_model=clip_model, embedder=embedder,
                          danbooru_model=danbooru_model or DEEPDANBOORU, aesthetic_model=aesthetic)
    try:
        if safety is not None and safety.can_decide:
            safety.warm()  # loads, and embeds the concept lists once (cached on disk for the next start)
            runtime.safety = safety
    except Exception as err:  # a corrupt or mismatched file: say so, serve no generation
        log.error("the safety pass could not start: %s", err)
    if runtime.safety is None:
        log.error("no safety pass (CLIP %s and DeepDanbooru are needed): image generation is off", clip_model)
    if config.sd_safety_checker:
        runtime.sd_safety_checker = build_sd_safety_checker(
            models_dir=weights, cache=cache, device=runtime.device, name=sd_checker or SAFETY_CHECKER)


def _shared_embedder(interrogators, clip_model: str):
    """The alchemy forms' CLIP, when the generation pass reads the same model (one copy, one memo)."""
    for user in (getattr(interrogators, "interrogation", None), getattr(interrogators, "safety", None)):
        embedder = getattr(user, "embedder", None)
        if embedder is not None and embedder.folder.name == clip_model.replace("/", "-"):
            return embedder
    return None


def lora_support(config: BridgeConfig, cache_home: Path | None = None):
    """LoRA/TI support (bridge.lora) when allow_lora is on; None otherwise (such jobs are then not popped)."""
    if not config.allow_lora:
        return None
    from bridge.lora.service import LoraSupport

    return LoraSupport.from_config(config, Path(cache_home or config.cache_home))


def served_baselines(worker: Worker) -> set[str]:
    """The baselines of the generation models this worker serves (which LoRAs are worth prefetching)."""
    models = worker.runtime.models
    if models is None:
        return set()
    return {(models.record(name).baseline or "stable diffusion 1").lower() for name in models.models}


def cpu_torch_threads(cores: int, max_threads: int) -> int:
    """Intra-op threads per running job on a CPU: one core is left to the loop's pops, uploads and submits.
    Measured on 2 cores: torch's OpenMP threads spin-wait at every op barrier, so a second torch thread
    competing with the loop's own threads made each job slower (0.244 s vs 0.213 s a job) than one."""
    return max(1, (cores - 1) // max(1, max_threads))


def apply_cpu_thread_policy(config: BridgeConfig, device) -> None:
    if device.is_cuda:
        return
    import os

    import torch

    threads = cpu_torch_threads(os.cpu_count() or 1, config.max_threads)
    torch.set_num_threads(threads)
    log.info("CPU: %d torch thread(s) per job (%d cores, max_threads %d)", threads, os.cpu_count() or 1,
             config.max_threads)


def _quiet_diffusers() -> None:
    """from_single_file prints per-load progress bars that would interleave with the log."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _postprocessors(weights: Path, cache, device):
    from postprocessors.registry import PostProcessorRegistry

    return PostProcessorRegistry(weights_dir=weights, cache=cache, device=device)


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
    if worker.runtime.loras is not None:  # never blocks: serving starts now, files arrive in the background
        worker.runtime.loras.start_background(config.prefetch_loras, served_baselines(worker))
    try:
        with StatsReporter(stats, config.stats_output_frequency), follow_queue(worker, client, config), \
                live_status(stats, enabled=not config.disable_terminal_ui):
            code = daemon.run()
    finally:
        restore()
        if worker.runtime.loras is not None:
            worker.runtime.loras.stop()
    if daemon.stop_reason:
        log.error("stopped: %s", daemon.stop_reason)
    return code


def follow_queue(worker: Worker, client: HordeClient, config: BridgeConfig):
    """dynamic_models: a background refresher, or nothing."""
    from contextlib import nullcontext

    if not (config.dynamic_models and config.number_of_dynamic_models > 0 and worker.runtime.models):
        return nullcontext()
    from bridge.dynamic_models import DynamicModels
    from models.downloads import Downloader

    downloader = Downloader(Path(config.cache_home), rate_limit_kbps=config.download_rate_limit_kbps)
    return DynamicModels(client=client, manager=worker.runtime.models, reference=worker.reference,
                         downloader=downloader, cache_home=Path(config.cache_home),
                         number=config.number_of_dynamic_models)


def _has_gpu() -> bool:
    from models.device import DevicePolicy

    return DevicePolicy.detect().is_cuda


def run_worker(config: BridgeConfig) -> int:
    client = make_client(config)
    try:
        plan = plan_worker(config, has_gpu=_has_gpu(), client=client)
    except HordeError as err:  # TOP n needs the horde's stats
        log.error("could not resolve models_to_load: %s", err)
        return 2 if isinstance(err, WorkerStopError) else 1
    for note in plan.notes:
        log.warning(note)
    if not (plan.dreamer or plan.alchemist):
        log.error("nothing to serve: generation needs a GPU (or force_cpu_generation) and alchemy is off "
                  "(set alchemist: true and choose forms)")
        return 1
    if not ready_to_start(config, plan):
        return 1
    download_weights(config, plan)
    worker = build_worker(config, plan)
    try:
        greet(client, config, worker)
    except WorkerStopError as err:
        log.error("the horde refused this worker: %s", err)
        return 2
    except HordeError as err:
        log.warning("could not reach the horde at start (%s): serving anyway, pops will retry", err)
    return serve(worker, client, config)


def ready_to_start(config: BridgeConfig, plan: WorkerPlan) -> bool:
    """The checks that stop a start with one clear line: a template worker name on the real horde, a
    download plan the disk cannot hold. The plan is printed either way."""
    from bridge.startup import download_plan, is_real_horde, template_name_problems

    problems = template_name_problems(config, dreamer=plan.dreamer, alchemist=plan.alchemist)
    if problems and is_real_horde(config):
        for line in problems:
            log.error("not starting: %s", line)
        return False
    downloads = download_plan(Path(config.cache_home), weight_records(config, plan))
    for line in downloads.lines():
        log.info("download plan: %s", line)
    if (shortage := downloads.shortage()) is not None:
        log.error("not starting: %s", shortage)
        return False
    return True


def download_models(config: BridgeConfig) -> int:
    """--download-models: fetch and verify everything the configured families need, say what is ready."""
    plan = plan_worker(config, has_gpu=_has_gpu(), client=make_client(config))
    from bridge.startup import download_plan

    downloads = download_plan(Path(config.cache_home), weight_records(config, plan))
    for line in downloads.lines():
        log.info("download plan: %s", line)
    if (shortage := downloads.shortage()) is not None:
        log.error("%s", shortage)
        return 1
    ready = download_weights(config, plan)
    for name, ok in ready.items():
        log.info("%s: %s", name, "ready" if ok else "NOT ready (see above)")
    support = lora_support(config) if plan.dreamer else None
    if support is not None and config.prefetch_loras and support.probe():
        baselines = {(plan.reference.get(n).baseline or "stable diffusion 1").lower() for n in plan.models}
        support.prefetch(config.prefetch_loras, baselines)
    return 0 if ready and all(ready.values()) else 1
