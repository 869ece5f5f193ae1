"""Worker assembly: modes on a CPU-only machine, where downloaded weights land, leaving maintenance."""

from __future__ import annotations

from bridge.api_models import InterrogationPopRequest
from bridge.config import build_config
from bridge.horde_api import HordeClient
from bridge.worker import choose_modes, leave_maintenance, load_reference, plan_worker, weight_records
from interrogators.reference import model_dir as interrogator_dir
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.device import DevicePolicy
from models.downloads import model_dir
from models.reference import ModelReference
from postprocessors.registry import PostProcessorRegistry


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
    assert {"Deliberate", "stable-diffusion-safety-checker", "blip-image-captioning-large",
            "clip-vit-large-patch14", "RealESRGAN_x2plus", "strip_background", "CodeFormers",
            "GFPGAN"} <= set(records)
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
