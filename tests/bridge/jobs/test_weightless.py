"""vectorize, palette, describe: result shapes, and the forms end to end via the daemon and local horde."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import blurhash
import imagehash
import numpy as np
import pytest
from PIL import Image

from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource, DescribeJob, PaletteJob, VectorizeJob
from bridge.jobs.weightless import available_forms, describe, palette, vectorize
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from local_horde import LocalHorde
from models.device import DevicePolicy

FAST = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05, maintenance_poll_s=0.05)
FORMS = ["vectorize", "palette", "describe"]


def photo_like(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    """Smooth gradients, a few flat shapes and fine noise: enough structure for every form."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 120 + 60], axis=-1)
    image[height // 4 : height // 2, width // 5 : width // 2] = (230, 40, 30)
    image[height // 2 :, (2 * width) // 3 :] = (20, 30, 160)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def webp_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=95)
    return buffer.getvalue()


def test_vectorize_is_svg_markup_with_colour_paths() -> None:
    svg = vectorize(photo_like())
    assert svg.lstrip().startswith("<?xml") or svg.lstrip().startswith("<svg")
    assert "</svg>" in svg and 'width="96"' in svg and 'height="64"' in svg
    fills = set(re.findall(r'fill="(#[0-9A-Fa-f]{6})"', svg))
    assert len(fills) > 3  # colour mode, not binary
    assert " C" in svg or "C " in svg  # spline mode: cubic Bézier segments


def test_palette_shape_order_and_proportions() -> None:
    result = palette(photo_like())
    assert list(result) == ["colors"]
    colors = result["colors"]
    assert 1 <= len(colors) <= 6
    for color in colors:
        assert list(color) == ["hex", "proportion"]
        assert re.fullmatch(r"#[0-9a-f]{6}", color["hex"])
        assert isinstance(color["proportion"], float) and color["proportion"] == round(color["proportion"], 4)
    proportions = [c["proportion"] for c in colors]
    assert proportions == sorted(proportions, reverse=True)
    assert sum(proportions) == pytest.approx(1.0, abs=6e-4)
    # A two-colour image gives exactly those two colours in the proportions of their areas.
    two = Image.new("RGB", (40, 10), (255, 0, 0))
    two.paste((0, 0, 255), (0, 0, 10, 10))
    assert palette(two) == {"colors": [{"hex": "#ff0000", "proportion": 0.75},
                                       {"hex": "#0000ff", "proportion": 0.25}]}  # fmt: skip


def test_describe_shape_and_values() -> None:
    source = photo_like()
    reread = Image.open(io.BytesIO(webp_bytes(source)))
    result = describe(reread)
    assert list(result) == ["blurhash", "phash", "dhash", "width", "height", "aspect_ratio", "has_alpha",
                            "format"]  # fmt: skip
    assert (result["width"], result["height"], result["aspect_ratio"]) == (96, 64, 1.5)
    assert result["has_alpha"] is False and result["format"] == "WEBP"
    assert re.fullmatch(r"[0-9a-f]{16}", result["phash"]) and re.fullmatch(r"[0-9a-f]{16}", result["dhash"])
    assert result["phash"] == str(imagehash.phash(reread))
    assert blurhash.components(result["blurhash"]) == (4, 3)
    assert len(result["blurhash"]) == 4 + 2 * 4 * 3  # 1 + 1 + 4 + 2 per AC component
    rgba = Image.new("RGBA", (10, 20), (0, 0, 0, 0))
    alpha = describe(rgba)
    assert alpha["has_alpha"] is True and alpha["format"] is None and alpha["aspect_ratio"] == 0.5


def test_all_three_libraries_are_installed() -> None:
    assert available_forms() == FORMS


def test_the_libraries_are_looked_up_once_per_process(monkeypatch) -> None:
    import importlib.util

    available_forms()
    looked_up = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: looked_up.append(name))
    assert available_forms() == FORMS and looked_up == []  # asked before every pop: no search of sys.path


@pytest.fixture()
def horde():
    with LocalHorde() as server:
        yield server


def run_daemon_until_done(horde: LocalHorde, runtime: Runtime, ids: list[str], tmp_path: Path) -> dict:
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    client = HordeClient(horde.base_url, horde.api_key, client_agent="weightless-tests:0:none", retry=retry)
    daemon = Daemon(client=client, runtime=runtime, sources=[AlchemySource()],
                    journal=Journal(tmp_path / "inflight.json"), timings=FAST)  # fmt: skip
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        return horde.wait_done(ids, timeout=60)
    finally:
        daemon.request_stop("test")
        thread.join(timeout=30)


def weightless_runtime(horde: LocalHorde, forms: list[str]) -> Runtime:
    config = build_config(
        {"api_key": horde.api_key, "alchemist_name": "weightless-alchemist", "forms": forms}, environ={}
    ).config
    fetcher = SourceFetcher(timeout=5, allow_private=True)  # the local horde is on loopback
    return Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher)


def test_the_three_forms_through_the_daemon(horde: LocalHorde, tmp_path: Path) -> None:
    source = photo_like(seed=3)
    data = webp_bytes(source)
    rid = horde.request_interrogation(horde.host_image(data, "photo.webp"), FORMS)
    statuses = run_daemon_until_done(horde, weightless_runtime(horde, FORMS), [rid], tmp_path)
    forms = {f["form"]: f for f in statuses[rid]["forms"]}
    assert {f["state"] for f in forms.values()} == {"done"}
    decoded = Image.open(io.BytesIO(data))
    assert forms["vectorize"]["result"] == {"vectorize": vectorize(decoded)}
    assert forms["palette"]["result"] == {"palette": palette(decoded)}
    assert forms["describe"]["result"] == {"describe": describe(decoded)}
    books = horde.accounting()
    assert len(books.handed_out) == 3 and all(len(horde.submits(i)) == 1 for i in books.handed_out)
    assert sorted(books.rewards.values()) == [1.0, 1.0, 1.0]  # 1 kudos each
    # No R2 upload for these forms: the result is the JSON itself.
    assert all("r2_upload" not in s for i in books.handed_out for s in horde.submits(i))


def test_job_classes_route_by_form_name() -> None:
    from bridge.api_models import AlchemyForm

    classes = {
        name: type(AlchemySource.job_for(AlchemyForm(id=name * 3, form=name), FORMS)) for name in FORMS
    }
    assert classes == {"vectorize": VectorizeJob, "palette": PaletteJob, "describe": DescribeJob}


def test_a_broken_source_faults_the_form_and_the_daemon_goes_on(horde: LocalHorde, tmp_path: Path) -> None:
    bad = horde.request_interrogation(horde.host_image(b"not an image", "bad.webp"), ["palette"])
    good = horde.request_interrogation(horde.host_image(webp_bytes(photo_like()), "ok.webp"), ["palette"])
    statuses = run_daemon_until_done(horde, weightless_runtime(horde, ["palette"]), [good], tmp_path)
    assert statuses[good]["forms"][0]["state"] == "done"
    bad_submits = [
        s for i in horde.accounting().handed_out for s in horde.submits(i) if s["state"] == "faulted"
    ]
    assert bad_submits and horde.interrogation_status(bad)["forms"][0]["state"] in ("waiting", "faulted")
