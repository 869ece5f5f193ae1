"""The model reference: real horde files parse, upstream is cached, offline falls back, meta entries."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.records import REFERENCE_FILES
from models.reference import ModelReference, dynamic_models

DATA = Path(__file__).parent / "data"
SUBSET = DATA / "stable_diffusion_subset.json"


def _shared_reference_dir() -> Path | None:
    """The real reference files: $HORDE_MODEL_REFERENCE_DIR, or shared/ beside or inside the repo root."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("HORDE_MODEL_REFERENCE_DIR")]
    candidates += [str(repo.parent / "shared" / "model-reference"), str(repo / "shared" / "model-reference")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "stable_diffusion.json").is_file():
            return Path(candidate)
    return None


SHARED = _shared_reference_dir()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="shared/model-reference (the real horde files) not found"
)


@pytest.fixture(scope="module")
def real_reference(tmp_path_factory: pytest.TempPathFactory) -> ModelReference:
    if SHARED is None:
        pytest.skip("shared/model-reference (the real horde files) not found")
    cache = tmp_path_factory.mktemp("reference-cache")
    for file in REFERENCE_FILES:
        shutil.copy(SHARED / f"{file}.json", cache / f"{file}.json")
    return ModelReference.load(cache_dir=cache, upstream=None, extra_files=[SHARED / "diffusers-2023.json"])


@pytest.fixture
def subset(tmp_path: Path) -> ModelReference:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(SUBSET, cache / "stable_diffusion.json")
    return ModelReference.load(cache_dir=cache, upstream=None)


@pytest.fixture
def served_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on loopback serving a temporary directory."""
    root = tmp_path / "upstream"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- parsing the real files ----------------------------------------------------------------------------
@needs_shared
def test_real_stable_diffusion_file_parses_completely(real_reference: ModelReference) -> None:
    raw = json.loads((SHARED / "stable_diffusion.json").read_text())
    checkpoints = real_reference.records("stable_diffusion")
    # diffusers-2023 overrides the ckpt "stable_diffusion_inpainting" by name (a local file wins).
    assert len(checkpoints) == 160 and len(raw) == 161
    for record in checkpoints:
        entry = raw[record.name]
        assert record.baseline == entry["baseline"] and record.nsfw == entry["nsfw"]
        assert [f.path for f in record.files] == [f["path"] for f in entry["config"]["files"]]
        assert record.downloads and all(d.file_url.startswith("https://") for d in record.downloads)
        for spec, raw_spec in zip(record.files, entry["config"]["files"], strict=True):
            assert spec.sha256sum == (raw_spec.get("sha256sum") or "").lower() or (
                spec.sha256sum is None and "sha256sum" not in raw_spec
            )
    albedo = real_reference.get("AlbedoBase XL (SDXL)")
    assert albedo.files[0].sha256sum == albedo.files[0].sha256sum.lower()
    assert albedo.size_on_disk_bytes == 6776583201 and "homepage" in albedo.extra
    assert sum(bool(r.requirements) for r in checkpoints) >= 28


@needs_shared
def test_real_sibling_files_parse_with_their_category(real_reference: ModelReference) -> None:
    counts = {f: len(real_reference.records(f)) for f in REFERENCE_FILES}
    assert counts == {
        "stable_diffusion": 160,
        "diffusers": 2,
        "esrgan": 6,
        "gfpgan": 1,
        "codeformer": 1,
        "blip": 2,
        "clip": 2,
        "safety_checker": 1,
        "controlnet": 18,
        "miscellaneous": 2,
    }
    gfpgan = real_reference.get("GFPGAN")
    assert len(gfpgan.files) == 7 and len(gfpgan.downloads) == 7
    safety = real_reference.get("safety_checker")
    assert [f.sha256sum is None for f in safety.files] == [False, True, True]
    # The server indexes by key; this entry's own name field disagrees.
    assert real_reference.get("control_qr_sdxl").name == "control_qr_sdxl"
    assert real_reference.get("layer_diffuse_sd15").files[0].md5sum == "83efed29860db8d92824cdaec51a7be7"


@needs_shared
def test_real_diffusers_2023_shape(real_reference: ModelReference) -> None:
    depth = real_reference.get("Stable Diffusion 2 Depth")
    assert depth.category == "diffusers" and depth.hf_path == "stabilityai/stable-diffusion-2-depth"
    assert ModelReference.is_depth(depth) and not ModelReference.is_inpainting(depth)
    inpainting = real_reference.get("stable_diffusion_inpainting")
    assert inpainting.hf_path == "runwayml/stable-diffusion-inpainting"
    assert ModelReference.is_inpainting(inpainting)  # by style only, as in 2023
    assert {r.name for r in real_reference.generation_models()} >= {depth.name, "stable_diffusion"}
    assert "RealESRGAN_x4plus" not in {r.name for r in real_reference.generation_models()}


@needs_shared
def test_real_meta_entries_match_the_file(real_reference: ModelReference) -> None:
    raw = json.loads((SHARED / "stable_diffusion.json").read_text())
    by = lambda key, value: sum(r[key] == value for r in raw.values())  # noqa: E731
    sizes = {
        e: len(real_reference.resolve([e], []).names)
        for e in ("ALL SD15 MODELS", "ALL SDXL", "all sd21 models", "ALL ANIME MODELS", "ALL NSFW")
    }
    assert sizes["ALL SD15 MODELS"] == by("baseline", "stable diffusion 1")  # diffusers inpainting keeps sd1
    assert sizes["ALL SDXL"] == by("baseline", "stable_diffusion_xl")
    assert sizes["all sd21 models"] == by("baseline", "stable diffusion 2") + 1  # + the 2023 depth model
    assert sizes["ALL ANIME MODELS"] == by("style", "anime")
    assert sizes["ALL NSFW"] == by("nsfw", True)
    every = real_reference.resolve(["ALL"], [])
    servable = real_reference.servable_models()
    assert sorted(every.names) == sorted(r.name for r in servable)
    passed_over = len(real_reference.generation_models()) - len(servable)
    assert passed_over > 0  # flux_1 and stable_cascade are in the real file
    assert len(every.warnings) == 1 and f"passed over {passed_over} model(s)" in every.warnings[0]


# ---- fetching, caching, offline --------------------------------------------------------------------------
def test_upstream_is_cached_and_used_when_offline(
    tmp_path: Path, served_dir: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    root, url = served_dir
    shutil.copy(SUBSET, root / "stable_diffusion.json")
    (root / "esrgan.json").write_text(json.dumps({"Up": {"name": "Up", "type": "realesrgan"}}))
    cache = tmp_path / "cache"

    online = ModelReference.load(cache_dir=cache, upstream=url, timeout=2)
    assert "Yiffy" in online and online.get("Up").category == "esrgan"
    assert json.loads((cache / "stable_diffusion.json").read_text()) == json.loads(SUBSET.read_text())
    assert not list(cache.glob("*.tmp"))  # atomic writes leave no temporaries

    with caplog.at_level(logging.WARNING, logger="models.reference"):
        offline = ModelReference.load(cache_dir=cache, upstream=_dead_url(), timeout=2)
    assert offline.names() == online.names()
    assert any(
        "using the cached copy" in r.message and "stable_diffusion.json" in r.message for r in caplog.records
    )
    # Files never cached (gfpgan here) fall back to the snapshot shipped with the worker, and say so.
    assert any("snapshot" in r.message and "gfpgan.json" in r.message for r in caplog.records)
    assert ModelReference.load(cache_dir=cache, upstream=None).names() == online.names()


def test_silent_upstream_costs_one_timeout_not_one_per_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for file in REFERENCE_FILES:
        shutil.copy(SUBSET, cache / f"{file}.json")
    with socket.socket() as black_hole:  # accepts connections (backlog) and never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        started = time.monotonic()
        url = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        reference = ModelReference.load(cache_dir=cache, upstream=url, timeout=0.3)
        elapsed = time.monotonic() - started
    assert "Yiffy" in reference and elapsed < 0.3 * 3


def test_broken_upstream_reply_keeps_the_good_cache(tmp_path: Path, served_dir: tuple[Path, str]) -> None:
    root, url = served_dir
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(SUBSET, cache / "stable_diffusion.json")
    (root / "stable_diffusion.json").write_text("<html>rate limited</html>")
    reference = ModelReference.load(cache_dir=cache, upstream=url + "/{file}.json", timeout=2)
    assert "stable_diffusion" in reference
    assert json.loads((cache / "stable_diffusion.json").read_text()) == json.loads(SUBSET.read_text())


def test_local_file_adds_and_overrides_models(tmp_path: Path, subset: ModelReference) -> None:
    custom_dir = tmp_path / "custom"
    custom_dir.mkdir()
    custom = custom_dir / "my_models.json"
    custom.write_text(
        json.dumps(
            {
                "tiny-sd1": {
                    "name": "tiny-sd1",
                    "baseline": "stable diffusion 1",
                    "type": "ckpt",
                    "style": "generalist",
                    "config": {"files": [{"path": "tiny-sd1.safetensors", "sha256sum": "AB" * 32}]},
                },
                "Yiffy": {"name": "Yiffy", "baseline": "stable diffusion 1", "nsfw": True, "style": "furry"},
            }
        )
    )
    cache = tmp_path / "cache"  # the subset fixture's cache
    reference = ModelReference.load(cache_dir=cache, upstream=None, extra_files=[custom])
    tiny = reference.get("TINY-SD1")  # names match case-insensitively
    assert tiny.name == "tiny-sd1" and tiny.base_dir == custom_dir.resolve()
    assert tiny.files[0].sha256sum == "ab" * 32 and tiny.category == "stable_diffusion"
    assert reference.get("Yiffy").nsfw is True and subset.get("Yiffy").nsfw is False
    assert reference.get("Yiffy").base_dir == custom_dir.resolve()
    assert reference.resolve(["tiny-sd1"], []).names == ["tiny-sd1"]


# ---- meta entries ----------------------------------------------------------------------------------------
STATS = {
    "day": {"Yiffy": 999},
    "month": {
        "stable_diffusion": 500,
        "deliberate": 300,
        "AlbedoBase XL (SDXL)": 200,
        "Yiffy": 10,
        "ghost": 9999,
    },
    "total": {},
}


def test_top_and_bottom_rank_by_monthly_stats(subset: ModelReference) -> None:
    top = subset.resolve(["TOP 2"], [], model_stats=lambda: STATS)
    assert top.names == ["stable_diffusion", "Deliberate"] and not top.warnings
    # Unused models count 0; ties break by name.
    bottom = subset.resolve(["bottom 3"], [], model_stats=lambda: STATS)
    assert bottom.names == ["Mistoon Anime", "stable_diffusion_2.1", "stable_diffusion_inpainting"]


def test_top_without_stats_warns(subset: ModelReference) -> None:
    assert subset.resolve(["TOP 3"], []).warnings == [
        "'TOP 3' needs the horde's model stats, which are not available"
    ]

    def broken() -> dict:
        raise ConnectionError("horde down")

    result = subset.resolve(["TOP 3", "Yiffy"], [], model_stats=broken)
    assert result.names == ["Yiffy"] and "horde down" in result.warnings[0]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "ALL SFW",
            {
                "stable_diffusion",
                "stable_diffusion_2.1",
                "AlbedoBase XL (SDXL)",
                "stable_diffusion_inpainting",
                "waifu_diffusion",
                "Yiffy",
            },
        ),
        ("all nsfw models", {"Deliberate", "Mistoon Anime"}),
        ("ALL ANIME MODELS", {"waifu_diffusion", "Mistoon Anime"}),
        ("all furry", {"Yiffy"}),
        (
            "ALL SD15 MODELS",
            {"stable_diffusion", "Deliberate", "stable_diffusion_inpainting", "waifu_diffusion", "Yiffy"},
        ),
        ("ALL SD21", {"stable_diffusion_2.1"}),
        ("all sdxl models", {"AlbedoBase XL (SDXL)", "Mistoon Anime"}),
        ("ALL INPAINTING MODELS", {"stable_diffusion_inpainting"}),
        ("ALL INPAINTING", {"stable_diffusion_inpainting"}),
    ],
)
def test_all_meta_entries(subset: ModelReference, entry: str, expected: set[str]) -> None:
    result = subset.resolve([entry], [])
    assert set(result.names) == expected and not result.warnings


def test_all_models_and_plain_names_keep_order_without_duplicates(subset: ModelReference) -> None:
    result = subset.resolve(["yiffy", "ALL MODELS", "Deliberate"], [])
    assert result.names[0] == "Yiffy" and len(result.names) == len(subset.generation_models()) == 8
    assert len(set(result.names)) == 8 and not result.warnings


def test_skip_list_accepts_names_and_meta_entries(subset: ModelReference) -> None:
    result = subset.resolve(["ALL"], ["ALL NSFW", "WAIFU_DIFFUSION", "top 1"], model_stats=lambda: STATS)
    assert set(result.names) == {
        "stable_diffusion_2.1",
        "AlbedoBase XL (SDXL)",
        "stable_diffusion_inpainting",
        "Yiffy",
    }


def test_unknown_names_are_reported_not_dropped_silently(subset: ModelReference) -> None:
    result = subset.resolve(["Yiffy", "Not A Model", "ALL UNICORN MODELS"], ["Ghost"])
    assert result.names == ["Yiffy"]
    assert result.warnings == [
        "models_to_load: unknown model or meta entry 'Not A Model'",
        "models_to_load: unknown model or meta entry 'ALL UNICORN MODELS'",
        "models_to_skip: unknown model or meta entry 'Ghost'",
    ]


def test_non_generation_model_in_load_list_is_warned(tmp_path: Path, subset: ModelReference) -> None:
    (tmp_path / "cache" / "esrgan.json").write_text(json.dumps({"RealESRGAN_x4plus": {"type": "realesrgan"}}))
    reference = ModelReference.load(cache_dir=tmp_path / "cache", upstream=None)
    result = reference.resolve(["RealESRGAN_x4plus", "Yiffy"], [])
    assert result.names == ["Yiffy"] and "not a generation model" in result.warnings[0]


def test_max_models_caps_and_says_so(subset: ModelReference) -> None:
    result = subset.resolve(["ALL"], [], max_models=3)
    assert len(result.names) == 3 and "keeping the first 3" in result.warnings[0]


def test_dynamic_models_picks_most_queued_not_loaded() -> None:
    queue = [
        {"name": "A", "queued": 100.0, "jobs": 1, "count": 3},
        {"name": "B", "queued": 500, "jobs": 4, "count": 1},
        {"name": "C", "queued": 500, "jobs": 9, "count": 1},
        {"name": "D", "queued": 0, "jobs": 0, "count": 9},
        {"name": "E", "queued": 50, "jobs": 1},
        {"queued": 900},
    ]
    assert dynamic_models(queue, ["b"], 2) == ["C", "A"]
    assert dynamic_models(queue, [], 10, known=["A", "E", "D"]) == ["A", "E"]
    assert dynamic_models(queue, [], 0) == []


# ---- only servable baselines are chosen -------------------------------------------------------------------
def _snapshot() -> ModelReference:
    from models.reference import SNAPSHOT_DIR

    return ModelReference.load(cache_dir=SNAPSHOT_DIR, upstream=None)


def test_meta_entries_never_choose_a_baseline_this_worker_cannot_run() -> None:
    reference = _snapshot()
    unservable = [r for r in reference.generation_models() if r.baseline in ("flux_1", "stable_cascade")]
    assert len(unservable) == 2  # the June 2026 reference: one Flux, one Cascade
    servable = [r.name for r in reference.servable_models()]
    # The most used models of the month are Flux and Cascade: TOP 3 still gives three servable models.
    stats = {"month": {unservable[0].name: 900, unservable[1].name: 800, servable[5]: 700, servable[7]: 600,
                       servable[9]: 500}}
    top = reference.resolve(["TOP 3"], [], model_stats=lambda: stats)
    assert top.names == [servable[5], servable[7], servable[9]]
    (said,) = top.warnings  # once, naming both baselines
    assert "passed over 2 model(s)" in said and "flux_1" in said and "stable_cascade" in said
    every = reference.resolve(["ALL", "ALL SFW", "ALL NSFW"], [])
    assert set(every.names) == set(servable) and len(every.warnings) == 1
    named = reference.resolve([unservable[0].name, "stable_diffusion"], [])
    assert named.names == ["stable_diffusion"] and unservable[0].baseline in named.warnings[0]
    skipped = reference.resolve(["ALL"], [r.name for r in unservable])
    assert not skipped.warnings  # the operator skipped them: nothing to say


def test_dynamic_models_only_follow_servable_queues(caplog: pytest.LogCaptureFixture) -> None:
    from bridge.dynamic_models import DynamicModels

    reference = _snapshot()
    flux = next(r.name for r in reference.generation_models() if r.baseline == "flux_1")
    queue = [{"name": flux, "queued": 9e9, "jobs": 50}, {"name": "Deliberate", "queued": 10, "jobs": 1}]
    known = [r.name for r in reference.servable_models()]
    assert dynamic_models(queue, [], 1, known=known) == ["Deliberate"]

    class Manager:
        models: list[str] = []

    class Client:
        def model_status(self):
            return queue

    class Downloader:
        def ensure(self, record, dest):
            from models.downloads import DownloadOutcome

            return DownloadOutcome(record.name, False, "offline test")

    follower = DynamicModels(client=Client(), manager=Manager(), reference=reference, downloader=Downloader(),
                             cache_home=Path("/nonexistent"), number=1)
    with caplog.at_level(logging.INFO, logger="bridge.dynamic_models"):
        follower.refresh_once()
        follower.refresh_once()
    said = [r.message for r in caplog.records if flux in r.message]
    assert len(said) == 1 and "cannot run" in said[0]


def test_model_reference_from_a_local_folder_instead_of_the_internet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(SUBSET, mirror / "stable_diffusion.json")
    with caplog.at_level(logging.WARNING, logger="models.reference"):
        reference = ModelReference.load(cache_dir=tmp_path / "cache", upstream=str(mirror))
    assert "Yiffy" in reference and "Deliberate" in reference
    # The files the folder lacks come from the shipped snapshot, said in one line.
    (line,) = [r.message for r in caplog.records]
    assert "unreachable" in line and "snapshot" in line and "esrgan.json" in line
