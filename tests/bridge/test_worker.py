"""Worker assembly: modes on a CPU-only machine, where downloaded weights land, leaving maintenance."""

from __future__ import annotations

from pathlib import Path

from bridge.api_models import InterrogationPopRequest
from bridge.config import build_config
from bridge.horde_api import HordeClient
from bridge.worker import (
    build_worker,
    choose_modes,
    leave_maintenance,
    load_reference,
    plan_worker,
    weight_records,
)
from interrogators.reference import model_dir as interrogator_dir
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.device import DevicePolicy
from models.downloads import model_dir
from models.machine import InjectedMachine
from models.reference import ModelReference
from postprocessors.registry import PostProcessorRegistry

REPO = Path(__file__).resolve().parents[2]


def test_cpu_only_machine_serves_alchemy_and_refuses_generation_unless_forced():
    config = build_config({}, environ={}).config
    dream, alchemy, notes = choose_modes(config, has_gpu=False)
    assert (dream, alchemy) == (False, True)
    assert notes == []
    asked = build_config({"dreamer": True}, environ={}).config
    dream, _, notes = choose_modes(asked, has_gpu=False)
    assert dream is False and "force_cpu_generation" in notes[0]
    forced = build_config({"dreamer": True, "force_cpu_generation": True}, environ={}).config
    assert choose_modes(forced, has_gpu=False)[0] is True
    assert choose_modes(config, has_gpu=True)[:2] == (True, False)


def test_remove_maintenance_on_init_clears_our_worker():
    with LocalHorde() as horde:
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="t:1:n")
        client.pop_interrogation(InterrogationPopRequest(name="maint-alchemist", forms=["caption"]))
        worker_id = horde.worker_details("maint-alchemist")["id"]
        client.set_maintenance(worker_id, True)
        assert horde.worker_details("maint-alchemist")["maintenance_mode"] is True
        leave_maintenance(client, client.find_user(), ["maint-alchemist"])
        assert horde.worker_details("maint-alchemist")["maintenance_mode"] is False


def test_weights_land_where_the_processors_and_interrogators_read_them(tmp_path):
    config = build_config({"cache_home": str(tmp_path), "alchemist": True, "dreamer": True,
                           "force_cpu_generation": True, "models_to_load": ["Deliberate"],
                           "forms": ["caption", "interrogation", "nsfw", "RealESRGAN_x2plus",
                                     "strip_background", "CodeFormers"]}, environ={}).config
    alchemist_only = build_config({"alchemist": True, "dreamer": False, "forms": ["CodeFormers"]},
                                  environ={}).config
    reference = load_reference(config, upstream=False)
    assert isinstance(reference, ModelReference)
    plan = plan_worker(config, has_gpu=False, reference=reference)
    assert plan.dreamer and plan.alchemist and plan.models == ["Deliberate"]
    records = {r.name: r for r in weight_records(config, plan)}
    assert {"Deliberate", "blip-image-captioning-large", "clip-vit-large-patch14", "RealESRGAN_x2plus",
            "strip_background", "CodeFormers", "GFPGAN", "deepdanbooru-resnet-custom-v3",
            "laion-aesthetic-predictor-l14"} <= set(records)
    # Stable Diffusion's own checker is the operator's opt-in second opinion only.
    assert "stable-diffusion-safety-checker" not in records
    strict = config.model_copy(update={"sd_safety_checker": True, "send_aesthetic_score": False})
    strict_names = {r.name for r in weight_records(strict, plan)}
    assert "stable-diffusion-safety-checker" in strict_names
    assert "laion-aesthetic-predictor-l14" not in strict_names  # no score sent, no alchemy aesthetic form
    placed = {model_dir(tmp_path, r) / f.path for r in records.values() for f in r.files}
    for path in placed:  # as if every download had finished
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    registry = PostProcessorRegistry(weights_dir=tmp_path, cache=None, device=DevicePolicy.cpu())
    for name in ("RealESRGAN_x2plus", "strip_background", "CodeFormers", "GFPGAN"):
        assert set(registry.get(name).files()) <= placed, name
    # CodeFormers alone still gets the face detector and parser, which the horde lists under GFPGAN.
    alone = plan_worker(alchemist_only, has_gpu=False, reference=reference)
    assert {r.name for r in weight_records(alchemist_only, alone)} == {"CodeFormers", "GFPGAN"}
    blip = records["blip-image-captioning-large"]
    folder = interrogator_dir(tmp_path, "blip", "blip-image-captioning-large")
    assert folder / "config.json" in {model_dir(tmp_path, blip) / f.path for f in blip.files}


def test_download_plan_names_each_model_and_stops_when_the_disk_lacks_room(tmp_path):
    from bridge.startup import download_plan

    config = build_config({"cache_home": str(tmp_path), "dreamer": True, "force_cpu_generation": True,
                           "alchemist": False, "allow_post_processing": False,
                           "models_to_load": ["Deliberate", "stable_diffusion"]}, environ={}).config
    reference = load_reference(config, upstream=False)
    plan = plan_worker(config, has_gpu=False, reference=reference)
    records = weight_records(config, plan)
    roomy = download_plan(tmp_path, records, disk_free=lambda _: 10**12)
    sizes = dict(roomy.items)
    assert sizes["Deliberate"] == reference.get("Deliberate").size_on_disk_bytes > 10**9
    assert roomy.shortage() is None and roomy.lines()[-2].startswith("total: ")
    full = download_plan(tmp_path, records, disk_free=lambda _: 10**9)
    assert "not enough disk space for the download plan" in full.shortage()


def test_only_models_on_disk_serves_what_is_there_and_downloads_nothing(tmp_path):
    from models.tiny import build_tiny_models

    tiny = build_tiny_models(tmp_path / "tiny")
    config = build_config({"cache_home": str(tmp_path), "dreamer": True, "force_cpu_generation": True,
                           "only_models_on_disk": True, "models_to_load": ["tiny-sd1", "Deliberate"]},
                          environ={}).config
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, [tiny], upstream=False))
    assert plan.models == ["tiny-sd1"]
    assert any("only_models_on_disk" in note and "Deliberate" in note for note in plan.notes)


def test_a_template_worker_name_stops_a_start_against_the_real_horde(tmp_path, caplog):
    from bridge.worker import ready_to_start

    settings = {"cache_home": str(tmp_path), "alchemist": True, "forms": ["nsfw"]}
    config = build_config(settings, environ={}).config
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, upstream=False))
    assert not ready_to_start(config, plan)
    assert "not starting: alchemist_name is 'An Awesome Alchemist'" in caplog.text
    local = config.model_copy(update={"horde_url": "http://127.0.0.1:9"})
    assert ready_to_start(local, plan)  # a local horde: any name will do


def test_allow_controlnet_downloads_the_served_baselines_controlnets_and_annotators(tmp_path):
    from controlnet import ControlNets
    from models.cache import ModelCache

    settings = {"cache_home": str(tmp_path), "dreamer": True, "force_cpu_generation": True,
                "models_to_load": ["Deliberate"]}
    off = build_config(settings, environ={}).config
    on = build_config({**settings, "allow_controlnet": True}, environ={}).config
    reference = load_reference(on, upstream=False)
    plan = plan_worker(on, has_gpu=False, reference=reference)
    plain = {r.name for r in weight_records(off, plan)}
    extra = {r.name for r in weight_records(on, plan)} - plain
    assert {"control_canny", "control_hough", "control_seg", "annotator_hed", "annotator_leres",
            "annotator_midas", "annotator_openpose", "annotator_mlsd", "annotator_seg"} <= extra
    assert not any(name.endswith("_sd2") or name.startswith("control_qr") for name in extra)
    controlnets = ControlNets(reference=reference, cache=ModelCache(DevicePolicy.cpu(), ram_budget_bytes=0),
                              device=DevicePolicy.cpu(), cache_home=tmp_path)
    for name in extra:  # the downloader writes exactly where the ControlNet manager reads
        record = reference.get(name)
        assert {model_dir(tmp_path, record) / f.path for f in record.files} == set(controlnets.files(name))
        assert all(path.is_relative_to(tmp_path / "controlnet") for path in controlnets.files(name))


# --- memory: the committed defaults on injected machines -------------------------------------------------


def committed_config(horde, tmp_path, **overrides):
    from bridge.config import load_config

    settings = {"horde_url": horde.base_url, "api_key": DEFAULT_API_KEY, "cache_home": str(tmp_path / "home"),
                "state_dir": str(tmp_path / "state"), "alchemist_name": "memory-test-alchemist",
                "allow_private_sources": True,  # the local horde's sources are on loopback
                **overrides}
    return load_config(REPO / "bridgeData.yaml", environ={}, overrides=settings).config


def tiny_alchemist(config, machine, models_dir):
    from interrogators.tiny import TINY_AESTHETIC, TINY_CAPTION, TINY_CLIP, TINY_DEEPDANBOORU

    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, upstream=False))
    names = {"caption_model": TINY_CAPTION, "clip_model": TINY_CLIP, "danbooru_model": TINY_DEEPDANBOORU,
             "aesthetic_model": TINY_AESTHETIC}  # nsfw: the safety pass on the CLIP + DeepDanbooru
    return build_worker(config, plan, device=DevicePolicy.cpu(memory=machine), weights_dir=models_dir,
                        interrogator_models=names)


def test_cpu_alchemist_on_a_16_gb_machine_warms_and_serves_its_three_interrogators(
    tmp_path_factory, tmp_path
):
    import threading

    from bridge.daemon import Daemon, LoopTimings
    from bridge.journal import Journal
    from bridge.stats import Stats
    from tests.bridge.test_daemon import make_client, webp
    from tests.interrogators.helpers import tiny_models_dir

    models_dir = tiny_models_dir(tmp_path_factory)
    machine = InjectedMachine.gib(16, ram_others=4)  # a 16 GB desktop, 12 GB free
    with LocalHorde() as horde:
        config = committed_config(horde, tmp_path, forms=["caption", "interrogation", "nsfw"])
        worker = tiny_alchemist(config, machine, models_dir)
        assert (worker.dreamer, worker.alchemist) == (False, True)
        interrogators = worker.runtime.interrogators
        assert interrogators.ready_forms() == ["caption", "interrogation", "nsfw"]
        cache = worker.runtime.admission.cache
        # Warmed at start, and small enough for the soft budget: all their models stay loaded between
        # forms (nsfw is the safety pass, on the interrogation form's CLIP).
        needed = {interrogators.caption.key, interrogators.interrogation.key,
                  interrogators.safety.embedder.key}
        assert needed <= set(cache.resident()) and not cache.evictions
        assert machine.held("ram") == cache.used_bytes()
        ids = [horde.request_interrogation(horde.host_image(webp(color), f"{color}.webp"),
                                           ["caption", "interrogation", "nsfw"])
               for color in ("purple", "green", "orange")]  # fmt: skip
        daemon = Daemon(client=make_client(horde), runtime=worker.runtime, sources=worker.sources,
                        journal=Journal(tmp_path / "inflight.json"), stats=Stats(),
                        timings=LoopTimings(idle_poll_s=0.05))  # fmt: skip
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            statuses = horde.wait_done(ids, timeout=120)
        finally:
            daemon.request_stop("test")
            thread.join(timeout=30)
    forms = [form for status in statuses.values() for form in status["forms"]]
    assert len(forms) == 9 and {f["state"] for f in forms} == {"done"}
    assert {f["form"] for f in forms} == {"caption", "interrogation", "nsfw"}


def test_alchemist_on_a_machine_too_small_for_its_models_offers_nothing_and_keeps_running(
    tmp_path_factory, tmp_path
):
    from tests.interrogators.helpers import tiny_models_dir

    models_dir = tiny_models_dir(tmp_path_factory)
    # 4 GB with everything but 300 MB taken: no interrogator's working memory fits.
    machine = InjectedMachine(ram_total=4 << 30, ram_others=(4 << 30) - (300 << 20))
    with LocalHorde() as horde:
        config = committed_config(horde, tmp_path, forms=["caption", "nsfw"])
        worker = tiny_alchemist(config, machine, models_dir)  # starts: nothing loaded, nothing raised
        assert worker.runtime.interrogators.ready_forms() == []
        assert worker.runtime.admission.cache.resident() == [] and machine.held("ram") == 0
        [source] = worker.sources
        assert source.ready_forms(worker.runtime) == []
        with HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="t:1:n") as client:
            assert source.pop(client, worker.runtime, 1) == []
        assert horde.worker_details("memory-test-alchemist") is None


def test_generation_gets_a_safety_pass_sharing_the_alchemy_clip(tmp_path, tmp_path_factory):
    import shutil

    from bridge.jobs.generation import GenerationSource
    from bridge.worker import WorkerPlan, build_worker
    from interrogators.tiny import TINY_AESTHETIC, TINY_CLIP, TINY_DEEPDANBOORU
    from tests.interrogators.helpers import tiny_models_dir

    weights = tmp_path / "weights"
    shutil.copytree(tiny_models_dir(tmp_path_factory), weights)
    config = build_config({"dreamer": True, "alchemist": True, "force_cpu_generation": True,
                           "forms": ["interrogation", "nsfw"], "cache_home": str(tmp_path / "home"),
                           "state_dir": str(tmp_path / "state")}, environ={}).config
    reference = load_reference(config, upstream=False)
    names = {"clip_model": TINY_CLIP, "danbooru_model": TINY_DEEPDANBOORU, "aesthetic_model": TINY_AESTHETIC}
    both = build_worker(config, WorkerPlan(True, True, reference, []), device=DevicePolicy.cpu(),
                        weights_dir=weights, interrogator_models=names)
    safety = both.runtime.safety
    assert safety is not None and safety.can_decide and safety.scores_aesthetics
    assert safety.embedder is both.runtime.interrogators.interrogation.embedder  # one CLIP, one memo
    assert both.runtime.sd_safety_checker is None  # opt-in only
    shutil.rmtree(weights / "deepdanbooru")
    dreamer = config.model_copy(update={"alchemist": False})
    unchecked = build_worker(dreamer, WorkerPlan(True, False, reference, []), device=DevicePolicy.cpu(),
                             weights_dir=weights, interrogator_models=names)
    assert unchecked.runtime.safety is None and not GenerationSource().ready(unchecked.runtime)


def test_the_v13_post_processors_download_where_the_registry_reads_them(tmp_path, caplog):
    from bridge import horde_names

    forms = ["RestoreFormer", "4xNomos2_hq_dat2", "2xModernSpanimationV1", "vectorize", "palette", "describe"]
    config = build_config({"cache_home": str(tmp_path), "alchemist": True, "dreamer": False, "forms": forms},
                          environ={}).config
    plan = plan_worker(config, has_gpu=False, reference=load_reference(config, upstream=False))
    with caplog.at_level("WARNING"):
        records = {r.name: r for r in weight_records(config, plan)}
    # The weightless forms need no weights (and no warning); RestoreFormer brings GFPGAN's face helpers.
    assert set(records) == {"RestoreFormer", "4xNomos2_hq_dat2", "2xModernSpanimationV1", "GFPGAN"}
    assert "no reference entry" not in caplog.text
    placed = {model_dir(tmp_path, r) / f.path for r in records.values() for f in r.files}
    for path in placed:  # as if every download had finished
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    registry = PostProcessorRegistry(weights_dir=tmp_path, cache=None, device=DevicePolicy.cpu())
    for name in ("RestoreFormer", "4xNomos2_hq_dat2", "2xModernSpanimationV1"):
        assert set(registry.get(name).files()) <= placed, name
    # A generation worker with post-processing on fetches all sixteen.
    dreamer = build_config({"dreamer": True, "force_cpu_generation": True, "models_to_load": ["Deliberate"]},
                           environ={}).config
    both = plan_worker(dreamer, has_gpu=False, reference=load_reference(dreamer, upstream=False))
    assert set(horde_names.POST_PROCESSORS) <= {r.name for r in weight_records(dreamer, both)}
