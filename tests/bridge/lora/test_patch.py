"""LoRAs merged into SD1, SD2 and SDXL pipelines and taken out again: the image changes, strengths (negative
too) matter, the original bytes come back, the merged state is reused, concurrent jobs stay correct."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.lora.patch import LoraPatcher, LoraUse, ModelLoras
from bridge.lora.tiny import kohya_lora, save_safetensors
from bridge.lora.weights import LoraFormatError, parse_lora
from models.tiny import tiny_pipeline


@pytest.fixture(scope="module", params=["sd1", "depth", "sdxl"])
def pipe_and_lora(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    work = tmp_path_factory.mktemp(f"patch-{request.param}")
    pipe = tiny_pipeline(request.param, seed=0, work=work)
    pipe.set_progress_bar_config(disable=True)
    return pipe, save_safetensors(kohya_lora(pipe, seed=5), work / "lora.safetensors")


def uses_of(pipe: Any, path: Path, model: float = 1.0, clip: float = 1.0, key: str = "a") -> list[LoraUse]:
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    weights = parse_lora(path, sdxl=sdxl, unet_config=pipe.unet.config)
    return [LoraUse(key, f"lora-{key}", lambda: weights, model, clip)]


def image(pipe: Any) -> np.ndarray:
    kwargs: dict[str, Any] = {"num_inference_steps": 2, "output_type": "np",
                              "generator": torch.Generator().manual_seed(3)}  # fmt: skip
    if "Depth" in type(pipe).__name__:
        kwargs["image"] = Image.new("RGB", (64, 64), (120, 60, 30))
    else:
        kwargs.update(width=64, height=64)
    return pipe(prompt="a lighthouse", **kwargs).images[0]


def test_every_targeted_weight_is_found(pipe_and_lora: tuple[Any, Path]) -> None:
    pipe, path = pipe_and_lora
    weights = parse_lora(path, sdxl=hasattr(pipe, "text_encoder_2"), unet_config=pipe.unet.config)
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if hasattr(pipe, "text_encoder_2") else set())
    assert weights.components() == expected
    loras = ModelLoras("m")
    with loras.use(pipe, uses_of(pipe, path)) as report:
        assert report.skipped == {} and report.changed == len(weights.pairs) == report.matched["lora-a"]
    with loras.use(pipe, []):
        pass


def test_a_lora_changes_the_image_and_undo_restores_the_exact_bytes(pipe_and_lora: tuple[Any, Path]) -> None:
    pipe, path = pipe_and_lora
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = image(pipe)
    loras = ModelLoras("m")
    with loras.use(pipe, uses_of(pipe, path)):
        with_lora = image(pipe)
    with loras.use(pipe, uses_of(pipe, path, model=-1.0, clip=0.0)):
        negative = image(pipe)
    with loras.use(pipe, uses_of(pipe, path, model=0.0, clip=1.0)):
        clip_only = image(pipe)
    with loras.use(pipe, []):
        after = image(pipe)
    assert np.abs(with_lora - plain).max() > 0.01 and np.abs(negative - plain).max() > 0.01
    assert np.abs(negative - with_lora).max() > 0.01 and np.abs(clip_only - plain).max() > 0.001
    assert np.array_equal(after, plain)  # byte for byte: nothing leaks into the next job
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_the_merged_state_is_reused_by_the_next_job_asking_the_same(pipe_and_lora: tuple[Any, Path]) -> None:
    pipe, path = pipe_and_lora
    loras, uses = ModelLoras("m"), uses_of(pipe, path)
    with loras.use(pipe, uses) as first:
        assert not first.reused and first.changed
    with loras.use(pipe, uses) as second:
        assert second.reused and second.apply_s == 0 and loras.applied == (("a", 1.0, 1.0),)
    with loras.use(pipe, uses_of(pipe, path, model=0.5)) as other:
        assert not other.reused  # another strength is another state
    with loras.use(pipe, []):
        assert loras.applied == ()


def test_a_reloaded_model_is_not_taken_for_a_merged_one(tmp_path: Path) -> None:
    pipe = tiny_pipeline("sd1", seed=0, work=tmp_path)
    path = save_safetensors(kohya_lora(pipe, seed=5), tmp_path / "l.safetensors")
    loras = ModelLoras("m")
    with loras.use(pipe, uses_of(pipe, path)):
        pass
    fresh = tiny_pipeline("sd1", seed=0, work=tmp_path)  # the cache dropped and reloaded the model
    original = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    with loras.use(fresh, []):
        pass  # nothing to undo on the fresh copy: the old backups must not be written into it
    assert all(torch.equal(original[k], v) for k, v in fresh.unet.state_dict().items())
    with loras.use(fresh, uses_of(fresh, path)) as report:
        assert not report.reused and report.changed


def test_an_unreadable_file_is_reported_not_raised(tmp_path: Path) -> None:
    pipe = tiny_pipeline("sd1", seed=0, work=tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")

    def load() -> Any:
        return parse_lora(bad, sdxl=False)

    with pytest.raises(LoraFormatError):
        load()
    with ModelLoras("m").use(pipe, [LoraUse("bad", "bad", load)]) as report:
        assert "bad" in report.failed and report.changed == 0


def test_same_sets_share_the_model_and_different_sets_wait(tmp_path: Path) -> None:
    pipe = tiny_pipeline("sd1", seed=0, work=tmp_path)
    path = save_safetensors(kohya_lora(pipe, seed=5), tmp_path / "l.safetensors")
    patcher = LoraPatcher()
    a, b = uses_of(pipe, path, key="a"), uses_of(pipe, path, model=-1.0, key="b")
    events: list[tuple[str, str, float]] = []
    inside: dict[str, int] = {"a": 0, "b": 0}
    overlap_ab: list[bool] = []
    lock = threading.Lock()

    def job(name: str, uses: list[LoraUse]) -> None:
        with patcher.use("m", pipe, uses):
            with lock:
                inside[name[0]] += 1
                overlap_ab.append(inside["a"] > 0 and inside["b"] > 0)
                events.append((name, "in", time.perf_counter()))
            time.sleep(0.05)
            assert patcher.model("m").applied == (tuple((u.key, u.model, u.clip) for u in uses)[0],)
            with lock:
                inside[name[0]] -= 1
                events.append((name, "out", time.perf_counter()))

    threads = [
        threading.Thread(target=job, args=(n, u)) for n, u in (("a1", a), ("a2", a), ("b1", b), ("a3", a))
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=10)
    assert not any(overlap_ab)  # never two different sets on the model at once
    starts = {n: t for n, e, t in events if e == "in"}
    ends = {n: t for n, e, t in events if e == "out"}
    assert starts["a2"] < ends["a1"]  # the same set ran together
    assert starts["a3"] > starts["b1"]  # a3 came after b1 asked: it did not jump the queue
