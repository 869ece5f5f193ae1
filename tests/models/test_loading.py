import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.cache import object_bytes
from models.device import DevicePolicy
from models.loading import (
    CONFIGS_DIR,
    FAMILIES,
    CheckpointInfo,
    ModelLoadError,
    UnsafeCheckpointError,
    clip_bpe,
    clip_tokenizer,
    load_ckpt_state_dict,
    load_pipeline,
    plan_load,
    select_family,
)
from models.records import ModelRecord
from models.reference import ModelReference
from models.tiny import pipeline_to_ldm, tiny_pipeline

SHARED = os.environ.get("HORDE_SHARED_DIR", "/work/shared")
CPU = DevicePolicy.cpu()


@pytest.fixture(scope="module")
def tiny_ref(tiny_models):
    return ModelReference.load(
        cache_dir=tiny_models.parent / "ref-cache", upstream=None, extra_files=[tiny_models]
    )


def generate(pipe, **kw):
    return pipe(
        "a tiny test",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        **kw,
    ).images[0]


# --- tokenizer and shipped configs --------------------------------------------------------------------


def test_clip_bpe_is_the_real_clip_vocabulary():
    vocab, merges = clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = clip_tokenizer(CONFIGS_DIR / "sd1" / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    # OpenCLIP text encoders (SD2, SDXL's second) pad with "!" (id 0).
    open_tok = clip_tokenizer(CONFIGS_DIR / "sdxl" / "tokenizer_2")
    assert open_tok("a cat", padding="max_length", max_length=77).input_ids[-1] == 0


# Parameter counts of the published models: the shipped configs describe exactly those shapes.
EXPECTED_PARAMETERS = {
    "sd1": (859_520_964, 123_060_480),
    "sd1-inpainting": (859_535_364, 123_060_480),
    "sd2": (865_910_724, 340_387_840),
    "sd2-v": (865_910_724, 340_387_840),
    "sd2-inpainting": (865_925_124, 340_387_840),
    "sd2-depth": (865_913_604, 340_387_840),
    "sdxl": (2_567_463_684, 123_060_480),
    "sdxl-inpainting": (2_567_478_084, 123_060_480),
}


def test_shipped_configs_describe_the_published_architectures():
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert set(EXPECTED_PARAMETERS) == set(FAMILIES)
    for family, (unet_n, text_n) in EXPECTED_PARAMETERS.items():
        folder = CONFIGS_DIR / family
        index = json.loads((folder / "model_index.json").read_text())
        assert hasattr(diffusers, index["_class_name"])
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            assert (count(unet), count(vae), count(text)) == (unet_n, 83_653_863, text_n), family
            if family.startswith("sdxl"):
                text2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
                assert count(text2) == 694_659_840
    v_config = json.loads((CONFIGS_DIR / "sd2-v" / "scheduler" / "scheduler_config.json").read_text())
    assert v_config["prediction_type"] == "v_prediction"


# --- choosing the config family -----------------------------------------------------------------------


def horde_record(name: str, file: str = "stable_diffusion") -> ModelRecord:
    data = json.loads(Path(f"{SHARED}/model-reference/{file}.json").read_text())
    return ModelRecord.from_entry(name, data[name], category=file)


def info(in_channels=4, arch=None):
    return CheckpointInfo(in_channels=in_channels, arch=arch, parameters=1)


@pytest.mark.skipif(
    not os.path.isdir(f"{SHARED}/model-reference"), reason="shared model reference not present"
)
def test_family_follows_the_horde_records():
    assert select_family(horde_record("stable_diffusion"), info(4, "sd1")) == "sd1"
    assert select_family(horde_record("stable_diffusion_inpainting"), info(9, "sd1")) == "sd1-inpainting"
    assert select_family(horde_record("stable_diffusion_2.1"), info(4, "sd2")) == "sd2-v"
    assert select_family(horde_record("SDXL 1.0"), info(4, "sdxl")) == "sdxl"
    depth = horde_record("Stable Diffusion 2 Depth", "diffusers-2023")
    assert select_family(depth, CheckpointInfo(None, None, 0)) == "sd2-depth"
    assert select_family(depth, info(5, "sd2")) == "sd2-depth"


def test_checkpoint_shapes_win_over_a_wrong_record():
    record = ModelRecord(name="mislabelled", baseline="stable diffusion 1", inpainting=False)
    assert select_family(record, info(9, "sd1")) == "sd1-inpainting"
    assert select_family(record, info(4, "sdxl")) == "sdxl"
    sd2 = ModelRecord(
        name="base", baseline="stable diffusion 2", files=[{"path": "m.ckpt"}, {"path": "v2-inference.yaml"}]
    )
    assert select_family(sd2, info(4, "sd2")) == "sd2"
    with pytest.raises(ModelLoadError, match="not supported"):
        select_family(ModelRecord(name="c", baseline="stable_cascade"), info(4, None))


# --- the tiny models through the real loaders ---------------------------------------------------------


def test_single_file_safetensors_loads_the_exact_weights(tiny_ref, tiny_models, tmp_path):
    record = tiny_ref.get("tiny-sd1")
    plan = plan_load(record, record.base_dir)
    assert plan.kind == "single_file" and plan.config_dir.name == "tiny-sd1-config" and plan.family == "sd1"
    pipe = load_pipeline(record, record.base_dir, CPU, plan=plan)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    original = tiny_pipeline("sd1", seed=1, work=tmp_path)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(original, name).state_dict()
        assert set(want) <= set(got)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    image = generate(pipe)
    assert image.size == (64, 64)
    # The size estimate made before loading is what the loaded pipeline then holds.
    expected = 4 * sum(v.numel() for v in pipeline_to_ldm(original).values())
    assert plan.estimated_bytes(torch.float32) == expected
    assert abs(object_bytes(pipe) - expected) <= 0.01 * expected


def test_folder_model_loads_and_draws(tiny_ref):
    record = tiny_ref.get("tiny-sd1-diffusers")
    plan = plan_load(record, record.base_dir)
    assert plan.kind == "folder" and plan.path.name == "tiny-sd1-diffusers"
    pipe = load_pipeline(record, record.base_dir, CPU, plan=plan)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert generate(pipe).size == (64, 64)


def test_inpainting_ckpt_loads_as_an_inpainting_pipeline(tiny_ref):
    record = tiny_ref.get("tiny-inpainting")
    plan = plan_load(record, record.base_dir)
    assert plan.family == "sd1-inpainting" and plan.path.suffix == ".ckpt"
    pipe = load_pipeline(record, record.base_dir, CPU, plan=plan)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    image = generate(pipe, image=Image.new("RGB", (64, 64), "gray"), mask_image=Image.new("L", (64, 64), 255))
    assert image.size == (64, 64)


def test_depth_folder_and_single_file_load(tiny_ref, tmp_path):
    record = tiny_ref.get("tiny-sd2-depth")
    pipe = load_pipeline(record, record.base_dir, CPU)
    assert type(pipe).__name__ == "StableDiffusionDepth2ImgPipeline" and pipe.unet.config.in_channels == 5
    assert generate(pipe, image=Image.new("RGB", (64, 64), "white"), strength=1.0).size == (64, 64)

    # The same model as a single file: UNet/VAE/text from the checkpoint, DPT from its own folder.
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(pipe, open_clip=True), str(tmp_path / "depth.safetensors"))
    config = tmp_path / "depth-config"
    shutil.copytree(
        record.base_dir / "tiny-sd2-depth", config, ignore=shutil.ignore_patterns("*.safetensors")
    )
    pipe.depth_estimator.save_pretrained(tmp_path / "dpt")
    single = ModelRecord(
        name="depth-single",
        baseline="stable diffusion 2",
        style="depth2img",
        files=[{"path": "depth.safetensors"}],
        extra={"diffusers_config": "depth-config"},
    )
    plan = plan_load(single, tmp_path)
    assert plan.family == "sd2-depth"
    loaded = load_pipeline(single, tmp_path, CPU, plan=plan, depth_estimator_dir=tmp_path / "dpt")
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    got, want = loaded.text_encoder.state_dict(), pipe.text_encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # OpenCLIP layout converted back exactly
    with pytest.raises(ModelLoadError, match="depth estimator"):
        load_pipeline(single, tmp_path, CPU, plan=plan.__class__(**{**plan.__dict__, "shipped_config": True}))


def test_sdxl_single_file_with_both_text_encoders(tmp_path):
    from safetensors.torch import save_file

    from models.tiny import _save_config_folder

    pipe = tiny_pipeline("sdxl", seed=5, work=tmp_path)
    save_file(pipeline_to_ldm(pipe), str(tmp_path / "xl.safetensors"))
    _save_config_folder(pipe, tmp_path / "xl-config", tmp_path)
    record = ModelRecord(
        name="tiny-xl",
        baseline="stable_diffusion_xl",
        files=[{"path": "xl.safetensors"}],
        extra={"diffusers_config": "xl-config"},
    )
    plan = plan_load(record, tmp_path)
    assert plan.family == "sdxl"
    loaded = load_pipeline(record, tmp_path, CPU, plan=plan)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        got, want = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert generate(loaded).size == (64, 64)


def test_partial_checkpoint_is_refused_not_left_half_loaded(tiny_ref, tmp_path):
    from safetensors.torch import load_file, save_file

    record = tiny_ref.get("tiny-sd1")
    state = load_file(str(record.base_dir / "tiny-sd1.safetensors"))
    del state["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    shutil.copytree(record.base_dir / "tiny-sd1-config", tmp_path / "cfg")
    partial = ModelRecord(
        name="partial", files=[{"path": "partial.safetensors"}], extra={"diffusers_config": "cfg"}
    )
    with pytest.raises(ModelLoadError, match="no weights for 1 tensors of text_encoder"):
        load_pipeline(partial, tmp_path, CPU)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 3, 3)},
            "x": Evil(),
        },
        path,
    )
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_ckpt_state_dict(path)
    record = ModelRecord(name="evil", baseline="stable diffusion 1", files=[{"path": "evil.ckpt"}])
    with pytest.raises(UnsafeCheckpointError):
        plan_load(record, tmp_path)
    assert not marker.exists()


def test_record_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no checkpoint"):
        plan_load(ModelRecord(name="yaml-only", files=[{"path": "v1-inference.yaml"}]), tmp_path)


# --- checkpoints in the layouts found in the wild (models/tiny_checkpoints.py) -------------------------


@pytest.fixture(scope="module")
def wild_ref(checkpoint_fixtures, tmp_path_factory):
    # A private copy: loading writes twins beside the checkpoints.
    folder = tmp_path_factory.mktemp("wild")
    shutil.copytree(checkpoint_fixtures.parent, folder, dirs_exist_ok=True)
    return ModelReference.load(
        cache_dir=folder / "ref-cache", upstream=None, extra_files=[folder / checkpoint_fixtures.name]
    )


WILD = {
    # name: (file the reference names, family, pipeline class, prediction type, UNet input channels)
    "training-sd1": ("sd-v1-4.ckpt", "sd1", "StableDiffusionPipeline", "epsilon", 4),
    "legacy-sd1": ("legacy-sd1.ckpt", "sd1", "StableDiffusionPipeline", "epsilon", 4),
    "sd2-768-v": ("768-v-ema.ckpt", "sd2-v", "StableDiffusionPipeline", "v_prediction", 4),
    "inpainting-sd1": (
        "sd-v1-5-inpainting.ckpt", "sd1-inpainting", "StableDiffusionInpaintPipeline", "epsilon", 9
    ),
    "civitai-fp16": ("civitai-fp16.safetensors", "sd1", "StableDiffusionPipeline", "epsilon", 4),
    "civitai-fp16-ema": ("civitai-fp16-ema.safetensors", "sd1", "StableDiffusionPipeline", "epsilon", 4),
    "sdxl-single": ("sd_xl_base_1.0.safetensors", "sdxl", "StableDiffusionXLPipeline", "epsilon", 4),
}


@pytest.mark.parametrize("name", list(WILD))
def test_checkpoints_from_the_wild_load_into_the_right_pipeline(wild_ref, name):
    file, family, cls, prediction, channels = WILD[name]
    record = wild_ref.get(name)
    plan = plan_load(record, record.base_dir)
    assert plan.path.name == file and plan.source is None  # the file the reference names and hashes
    assert plan.family == family
    pipe = load_pipeline(record, record.base_dir, CPU, plan=plan)
    assert type(pipe).__name__ == cls
    assert pipe.scheduler.config.prediction_type == prediction
    assert pipe.unet.config.in_channels == channels and pipe.unet.dtype == torch.float32
    # Weights a pipeline uses only: EMA copies and schedule buffers are not counted.
    modules = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert plan.parameters == sum(p.numel() for m in modules for p in getattr(pipe, m).parameters())


def test_first_verified_load_keeps_a_safetensors_twin_used_by_later_loads(wild_ref, monkeypatch):
    import models.loading as loading

    record = wild_ref.get("training-sd1")
    ckpt = record.base_dir / "sd-v1-4.ckpt"
    first = load_pipeline(record, record.base_dir, CPU)
    twin = ckpt.with_name(ckpt.name + ".twin.safetensors")
    assert twin.is_file() and twin.stat().st_size < ckpt.stat().st_size  # no EMA copies, no buffers
    plan = plan_load(record, record.base_dir)
    assert plan.path == twin and plan.source == ckpt

    def no_unpickling(path):
        raise AssertionError(f"{path} was unpickled")

    monkeypatch.setattr(loading, "load_ckpt_state_dict", no_unpickling)
    again = load_pipeline(record, record.base_dir, CPU, plan=plan)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(again, name).state_dict(), getattr(first, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_a_twin_of_another_file_is_not_used(wild_ref):
    from models.twins import write_twin

    record = wild_ref.get("legacy-sd1")
    ckpt = record.base_dir / "legacy-sd1.ckpt"
    write_twin(ckpt, {"model.diffusion_model.x": torch.zeros(2)}, "0" * 64, ("model.",))
    plan = plan_load(record, record.base_dir)
    assert plan.path == ckpt and plan.source is None  # stale twin: the .ckpt is read again
    load_pipeline(record, record.base_dir, CPU, plan=plan)
    assert plan_load(record, record.base_dir).source == ckpt  # and the twin is rewritten


@pytest.mark.parametrize(("family", "in_channels", "model_type"), [("sdxl", 4, "xl_base"),
                                                                    ("sdxl-inpainting", 9, "xl_inpaint")])
def test_real_shape_sdxl_single_file_is_recognised_and_maps_onto_the_shipped_config(
    family, in_channels, model_type
):
    """A checkpoint with SDXL's real key set and shapes (on the meta device: no 7 GB written): recognised
    as SDXL (or SDXL inpainting) from its keys, sized before loading, and every UNet and VAE tensor lands on
    a tensor of the same shape in the shipped config's modules, through diffusers' own conversion."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    state = pipeline_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2))
    from models.loading import _info

    checkpoint = _info({key: tuple(value.shape) for key, value in state.items()})
    assert (checkpoint.arch, checkpoint.in_channels) == ("sdxl", in_channels)
    unet_n, text_n = EXPECTED_PARAMETERS[family]
    assert checkpoint.parameters == unet_n + 83_653_863 + text_n + 694_659_840  # ~6.9 GB in fp16
    record = ModelRecord(name="an SDXL model", baseline="stable_diffusion_xl", inpainting=in_channels == 9)
    assert select_family(record, checkpoint) == family
    assert single_file_utils.infer_diffusers_model_type(state) == model_type
    converted_unet = single_file_utils.convert_ldm_unet_checkpoint(state, unet.config)
    converted_vae = single_file_utils.convert_ldm_vae_checkpoint(state, vae.config)
    for converted, module in ((converted_unet, unet), (converted_vae, vae)):
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in converted.items()} == expected
