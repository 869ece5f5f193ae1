import json
import os

import pytest
import torch
from safetensors import safe_open

from models.downloads import verify_file
from models.reference import ModelReference
from models.tiny import TINY_NAMES, build_tiny_models, main, pipeline_to_ldm, tiny_pipeline


@pytest.fixture(scope="module")
def reference(tiny_models):
    return json.loads(tiny_models.read_text())


def test_reference_lists_the_four_models_with_their_kinds(reference):
    assert set(reference) == set(TINY_NAMES)
    assert reference["tiny-inpainting"]["inpainting"] is True
    assert reference["tiny-sd2-depth"]["style"] == "depth2img"
    assert reference["tiny-sd2-depth"]["baseline"] == "stable diffusion 2"
    assert reference["tiny-sd1"]["baseline"] == "stable diffusion 1"
    assert reference["tiny-sd1"]["config"]["files"][0]["path"] == "tiny-sd1.safetensors"
    assert reference["tiny-inpainting"]["config"]["files"][0]["path"] == "tiny-inpainting.ckpt"


def test_every_listed_file_exists_relative_to_the_json_with_its_real_sha256(tiny_models, reference):
    for record in reference.values():
        assert record["config"]["files"]
        for spec in record["config"]["files"]:
            path = tiny_models.parent / spec["path"]
            assert not os.path.isabs(spec["path"])
            assert verify_file(path, spec["sha256sum"]), spec["path"]


def test_reference_parses_as_local_records(tiny_models):
    ref = ModelReference.load(
        cache_dir=tiny_models.parent / "ref-cache", upstream=None, extra_files=[tiny_models]
    )
    record = ref.get("tiny-sd1")
    assert record.base_dir == tiny_models.parent
    assert record.extra["diffusers_config"] == "tiny-sd1-config"
    assert ref.is_inpainting(ref.get("tiny-inpainting"))
    assert ref.is_depth(ref.get("tiny-sd2-depth"))


def test_build_is_idempotent(tiny_models):
    stamp = {p: p.stat().st_mtime_ns for p in tiny_models.parent.glob("*") if p.is_file()}
    assert build_tiny_models(tiny_models.parent) == tiny_models
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_command_prints_the_reference_path(tiny_models, capsys):
    assert main([str(tiny_models.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_models)


def test_single_file_checkpoint_holds_every_weight_in_ldm_layout(tiny_models, tmp_path):
    # The checkpoint was built from the seed-1 pipeline: rebuilding it gives the same weights.
    pipe = tiny_pipeline("sd1", seed=1, work=tmp_path)
    expected = pipeline_to_ldm(pipe)
    with safe_open(str(tiny_models.parent / "tiny-sd1.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert keys == set(expected)
        for key in [
            "model.diffusion_model.input_blocks.0.0.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight",
        ]:
            assert torch.equal(fh.get_tensor(key), expected[key])
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert expected["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4


def test_inpainting_ckpt_is_a_tensor_only_pickle(tiny_models):
    state = torch.load(tiny_models.parent / "tiny-inpainting.ckpt", weights_only=True)["state_dict"]
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
