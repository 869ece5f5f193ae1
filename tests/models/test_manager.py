import json
import shutil
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from models.cache import MIB, ModelCache, object_bytes
from models.device import DevicePolicy
from models.loading import ModelLoadError
from models.manager import ModelManager, ModelNotReadyError
from models.reference import ModelReference
from models.tiny import TINY_NAMES

CPU = DevicePolicy.cpu()


@pytest.fixture(scope="module")
def model_tree(tiny_models, tmp_path_factory):
    """A private copy of the tiny models with two extra records: an unsupported baseline and a checkpoint
    that verifies but cannot be loaded."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("manager-models")
    shutil.copytree(
        tiny_models.parent, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sha256", ".*")
    )
    records = json.loads((root / "reference.json").read_text())
    save_file({"not.a.unet": torch.zeros(4)}, str(root / "junk.safetensors"))
    from models.downloads import hash_file

    junk = {**records["tiny-sd1"], "name": "junk", "diffusers_config": None}
    junk["config"] = {
        "files": [{"path": "junk.safetensors", "sha256sum": hash_file(root / "junk.safetensors")}]
    }
    records["junk"] = junk
    # A .safetensors whose header is garbage (its hash verifies: it was published that way).
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 8 + b"not a safetensors header" * 40)
    records["corrupt"] = {**junk, "name": "corrupt", "config": {
        "files": [{"path": "corrupt.safetensors", "sha256sum": hash_file(root / "corrupt.safetensors")}]}}
    # A reference whose component configs point outside the model folder.
    records["escapes"] = {**junk, "name": "escapes", "diffusers_config": "../../outside"}
    records["tiny-flux"] = {**records["tiny-sd1"], "name": "tiny-flux", "baseline": "flux_1"}
    (root / "reference.json").write_text(json.dumps(records))
    return root


def make_manager(root, models=TINY_NAMES, budget_mib=256):
    reference = ModelReference.load(
        cache_dir=root / "ref-cache", upstream=None, extra_files=[root / "reference.json"]
    )
    cache = ModelCache(CPU, ram_budget_bytes=budget_mib * MIB)
    return ModelManager(reference=reference, cache=cache, device=CPU, cache_home=root / "home", models=models)


def draw(pipe, seed=3, **kw):
    out = pipe("a tiny test", num_inference_steps=2, height=64, width=64, generator=CPU.generator(seed), **kw)
    return np.asarray(out.images[0])


def test_advertises_only_present_and_verified_models(model_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(model_tree, root)
    manager = make_manager(root, models=[*TINY_NAMES, "no-such-model", "tiny-flux"])
    assert manager.models == list(TINY_NAMES)  # unknown and unsupported baselines are never served
    assert manager.ready_models() == list(TINY_NAMES)
    assert manager.files_dir("tiny-sd1") == root
    assert manager.record("TINY-SD1").name == "tiny-sd1"

    weights = root / "tiny-sd1-diffusers" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    (root / "tiny-inpainting-config" / "unet" / "config.json").unlink()
    assert manager.ready_models() == ["tiny-sd1", "tiny-sd2-depth", "tiny-sdxl", "tiny-sdxl-inpainting"]
    with pytest.raises(ModelNotReadyError):
        manager.pipeline("tiny-sd1-diffusers").__enter__()


def test_pipelines_load_once_and_stay_resident_within_budget(model_tree):
    manager = make_manager(model_tree)
    with manager.pipeline("tiny-sd1") as pipe:
        assert isinstance(pipe, StableDiffusionPipeline)
        assert draw(pipe).shape == (64, 64, 3)
    # Drawing with each kind is covered by test_loading; here: all six stay resident together.
    with manager.pipeline("tiny-sd1-diffusers") as pipe:
        assert isinstance(pipe, StableDiffusionPipeline)
    with manager.pipeline("tiny-inpainting") as pipe:
        assert isinstance(pipe, StableDiffusionInpaintPipeline)
    with manager.pipeline("tiny-sd2-depth") as pipe:
        assert type(pipe).__name__ == "StableDiffusionDepth2ImgPipeline"
    with manager.pipeline("tiny-sdxl") as pipe:
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    with manager.pipeline("tiny-sdxl-inpainting") as pipe:
        assert type(pipe).__name__ == "StableDiffusionXLInpaintPipeline"
    cache = manager._cache
    assert sorted(cache.resident()) == sorted(TINY_NAMES)
    assert cache.used_bytes() <= cache.ram_budget_bytes
    with manager.pipeline("tiny-sd1"):
        pass
    assert cache.resident()[-1] == "tiny-sd1" and len(cache.evictions) == 0


def test_variants_share_the_base_modules(model_tree):
    manager = make_manager(model_tree)
    with (
        manager.pipeline("tiny-sd1") as base,
        manager.pipeline("tiny-sd1", StableDiffusionImg2ImgPipeline) as i2i,
    ):
        assert isinstance(i2i, StableDiffusionImg2ImgPipeline)
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(i2i, name) is getattr(base, name)
        assert i2i.scheduler is not base.scheduler  # per-job scheduler state
        assert i2i.unet.dtype == CPU.dtype
        before = object_bytes(base)
        result = draw(i2i, image=Image.new("RGB", (64, 64), "white"), strength=0.6)
        assert result.shape == (64, 64, 3)
        assert manager._cache.used_bytes() == before  # no copies of the weights


def test_eviction_under_a_tight_budget(model_tree):
    manager = make_manager(model_tree)
    with manager.pipeline("tiny-sd1") as pipe:
        one_model = object_bytes(pipe)
    tight = make_manager(model_tree, budget_mib=(2 * one_model + one_model // 2) // MIB + 1)
    for name in ("tiny-sd1", "tiny-sd1-diffusers", "tiny-inpainting"):
        with tight.pipeline(name):
            assert tight._cache.used_bytes() <= tight._cache.ram_budget_bytes
    assert tight._cache.resident() == ["tiny-sd1-diffusers", "tiny-inpainting"]
    assert [key for key, _ in tight._cache.evictions] == ["tiny-sd1"]


def test_concurrent_jobs_on_two_models_match_serial_results(model_tree):
    manager = make_manager(model_tree)
    expected = {}
    for name in ("tiny-sd1", "tiny-sd1-diffusers"):
        with manager.pipeline(name) as pipe:
            expected[name] = draw(pipe, seed=11)
    results: dict[tuple[str, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def job(name, i):
        try:
            with manager.pipeline(name) as pipe:
                results[(name, i)] = draw(pipe, seed=11)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(n, i)) for i in range(2) for n in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for (name, _), image in results.items():
        np.testing.assert_array_equal(image, expected[name])


def test_unloadable_model_stops_being_advertised(model_tree):
    manager = make_manager(model_tree, models=["tiny-sd1", "junk"])
    assert manager.ready_models() == ["tiny-sd1", "junk"]
    with pytest.raises(ModelLoadError), manager.pipeline("junk"):
        pass
    assert manager.ready_models() == ["tiny-sd1"]
    assert "junk" in manager.broken_models()
    assert manager._cache.resident() == []


@pytest.mark.parametrize(
    ("name", "why"), [("corrupt", "cannot be read"), ("escapes", "outside the model folder")]
)
def test_models_whose_files_cannot_be_used_are_marked_broken(model_tree, name, why):
    manager = make_manager(model_tree, models=["tiny-sd1", name])
    assert manager.ready_models() == ["tiny-sd1", name]  # present and verified: advertised until tried
    with pytest.raises(ModelLoadError, match=why), manager.pipeline(name):
        pass
    assert manager.ready_models() == ["tiny-sd1"]
    assert why in manager.broken_models()[name]


def test_missing_models_are_downloaded_verified_then_served(tiny_models, tmp_path):
    """The tiny-sd1 files served over loopback HTTP, as an upstream record with download URLs."""
    import functools
    import http.server

    from models.downloads import Downloader
    from models.records import parse_reference

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_models.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raw = json.loads(tiny_models.read_text())["tiny-sd1"]
        base = f"http://127.0.0.1:{server.server_address[1]}"
        raw["config"]["download"] = [
            {
                "file_name": f["path"].rsplit("/", 1)[-1],
                "file_path": f["path"].rpartition("/")[0],
                "file_url": f"{base}/{f['path']}",
            }
            for f in raw["config"]["files"]
        ]
        records = parse_reference({"tiny-sd1": raw}, category="stable_diffusion")
        home = tmp_path / "home"
        manager = ModelManager(
            reference=ModelReference(records),
            cache=ModelCache(CPU, ram_budget_bytes=64 * MIB),
            device=CPU,
            cache_home=home,
            models=["tiny-sd1"],
            downloader=Downloader(home, progress=False),
        )
        assert manager.ready_models() == []
        assert manager.download_missing() == {"tiny-sd1": True}
        assert manager.files_dir("tiny-sd1") == home / "checkpoints"
        assert manager.ready_models() == ["tiny-sd1"]
        with manager.pipeline("tiny-sd1") as pipe:
            assert draw(pipe).shape == (64, 64, 3)
    finally:
        server.shutdown()
