"""An honest bridge identity: our own name by default, what the horde withholds read from its answers,
--check-config explaining bridge_agent, and docs/bridge-capabilities.md covering the horde's whole table."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest

from bridge.cli import check_config
from bridge.config import BRIDGE_NAME, DEFAULT_BRIDGE_AGENT, BridgeConfig, build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.identity import WithheldReport, withheld
from bridge.jobs.generation import GenerationSource
from bridge.journal import Journal
from local_horde import DEFAULT_API_KEY, LocalHorde
from local_horde.capabilities import BRIDGE_CAPABILITIES
from tests.bridge.generation import conftest as generation_fixtures
from tests.bridge.generation.conftest import make_manager, make_runtime
from tests.local_horde.conftest import small_params, webp

tiny_reference = generation_fixtures.tiny_reference
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bridge-capabilities.md"


def test_our_own_name_is_the_default() -> None:
    assert BridgeConfig().bridge_agent == DEFAULT_BRIDGE_AGENT
    assert DEFAULT_BRIDGE_AGENT.split(":")[0] == BRIDGE_NAME


def test_withheld_kinds_leave_out_what_our_own_settings_refuse() -> None:
    skipped = {"img2img": 2, "painting": 1, "bridge_version": 3, "max_pixels": 4}
    kinds = withheld(skipped, BridgeConfig())
    assert list(kinds.values()) == [3, 2, 1] and len(kinds) == 3
    own = withheld(skipped, BridgeConfig(allow_img2img=False, allow_painting=False))
    assert list(own.values()) == [3]  # img2img and painting are skipped because we said no


def test_the_first_pops_tell_the_operator_what_the_horde_withholds(
    tiny_reference: Path, tmp_path: Path, caplog, passing_safety
) -> None:
    """Through the daemon and the local horde, with the default (unknown to the horde) bridge name."""
    manager = make_manager(tiny_reference, ("tiny-sd1-diffusers",))
    with LocalHorde(known_models=manager.ready_models()) as horde:
        horde.request_generation(small_params(), models=["tiny-sd1-diffusers"], source_image=webp())
        horde.request_generation(small_params(post_processing=["GFPGAN"]), models=["tiny-sd1-diffusers"])
        horde.request_generation(small_params(hires_fix=True), models=["tiny-sd1-diffusers"])
        runtime = make_runtime(manager, passing_safety, api_key=DEFAULT_API_KEY,
                               dreamer_name="identity-worker")
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="identity-tests:0:none")
        source = GenerationSource()
        journal, timings = Journal(tmp_path / "j.json"), LoopTimings(idle_poll_s=0.02)
        daemon = Daemon(client=client, runtime=runtime, sources=[source], journal=journal, timings=timings)
        with caplog.at_level(logging.WARNING, logger="bridge.identity"):
            thread = threading.Thread(target=daemon.run, daemon=True)
            thread.start()
            try:
                deadline = time.monotonic() + 60
                while len(source.withheld.seen) < 2 and thread.is_alive() and time.monotonic() < deadline:
                    thread.join(0.05)
                thread.join(0.3)  # more idle pops: nothing new to say
            finally:
                daemon.request_stop("test")
                thread.join(timeout=30)
        assert horde.accounting().handed_out == []  # nothing is offered to this bridge name
    [line] = [r.getMessage() for r in caplog.records if r.name == "bridge.identity"]
    assert line.startswith(f"the horde withholds from bridge {BRIDGE_NAME!r}: ")
    assert "img2img (jobs with a source image) (1 waiting)" in line
    assert "(post-processing, hires fix, tiling, clip skip, LoRA versions, some samplers...) (2 waiting)" in (
        line
    )
    assert "docs/bridge-capabilities.md" in line


def test_a_report_repeats_nothing_already_said() -> None:
    report = WithheldReport()
    assert report.observe({"bridge_version": 1}, BridgeConfig())
    assert report.observe({"bridge_version": 5}, BridgeConfig()) is None
    assert "inpainting and outpainting" in report.observe({"painting": 1}, BridgeConfig())


def test_check_config_explains_bridge_agent(capsys) -> None:
    check_config(build_config({}, environ={}))
    section = capsys.readouterr().out.split("# bridge_agent\n", 1)[1].split("\n#", 1)[0]
    assert f"value: {DEFAULT_BRIDGE_AGENT}" in section
    assert "not in the horde's bridge table" in section and "0.75x" in section
    assert "docs/bridge-capabilities.md" in section
    check_config(build_config({"bridge_agent": "AI Horde Worker reGen:10.0.0:x"}, environ={}))
    assert "is in the horde's bridge table" in capsys.readouterr().out


def _rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = line
    return rows


def test_the_capability_document_covers_the_horde_table_with_real_tests() -> None:
    rows = _rows()
    table = {feature for versions in BRIDGE_CAPABILITIES.values() for features in versions.values()
             for feature in features}  # fmt: skip
    assert table | {"painting"} <= set(rows)
    for name, line in rows.items():
        for path, test in re.findall(r"(tests/[\w/]+\.py)::(\w+)", line):
            assert re.search(rf"^def {test}\(", (REPO / path).read_text(encoding="utf-8"), re.M), (name, test)


@pytest.mark.parametrize("name", ["img2img", "inpainting", "post-processing", "hires_fix", "r2", "karras"])
def test_implemented_capabilities_name_their_test(name: str) -> None:
    line = _rows()[name]
    assert "| yes" in line and "tests/" in line
