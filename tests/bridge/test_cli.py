"""--check-config's ControlNet section: which types are ready, and what the pop will say."""

from __future__ import annotations

from bridge.cli import controlnet_lines
from bridge.config import build_config


def test_check_config_says_which_control_types_are_ready(tmp_path):
    settings = {"cache_home": str(tmp_path), "models_to_load": ["Deliberate"]}
    off = build_config(settings, environ={}).config
    assert "allow_controlnet is false" in controlnet_lines(off, ["Deliberate"])[0]
    on = build_config({**settings, "allow_controlnet": True}, environ={}).config
    lines = controlnet_lines(on, ["Deliberate"])
    assert lines[0] == "stable diffusion 1: ready: none"
    assert "stable diffusion 1: depth not ready: ControlNet control_depth; annotator annotator_leres" in lines
    assert "stable diffusion 1: canny not ready: ControlNet control_canny" in lines  # canny needs no weights
    assert "pops WITHOUT allow_controlnet" in lines[-1]
    assert controlnet_lines(on, [])[0].startswith("no served model can take ControlNet")
