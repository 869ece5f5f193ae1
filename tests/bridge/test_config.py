"""The typed config: defaults, precedence, one-line errors naming the key, legacy files, secrets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bridge.config import (
    ANONYMOUS_API_KEY,
    BridgeConfig,
    ConfigError,
    api_base,
    build_config,
    dreamer_name,
    load_config,
    masked_dump,
    max_pixels,
    modes,
    secrets,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cretKEYs3cretKEY1234"

# Every key the legacy AI-Horde-Worker and reGen document, with non-default values.
LEGACY_FILE = textwrap.dedent(f"""\
    api_key: "{SECRET}"
    horde_url: "https://stablehorde.net"
    worker_name: "Legacy Worker"
    dreamer_name: "Legacy Dreamer"
    alchemist_name: "Legacy Alchemist"
    priority_usernames: ["db0#1"]
    max_threads: 2
    queue_size: 1
    max_batch: 4
    max_power: 32
    nsfw: false
    censor_nsfw: true
    blacklist: ["word"]
    censorlist: ["other"]
    allow_img2img: false
    allow_painting: false
    allow_unsafe_ip: false
    allow_post_processing: false
    allow_controlnet: true
    allow_sdxl_controlnet: true
    allow_lora: true
    max_lora_cache_size: 20
    require_upfront_kudos: true
    dynamic_models: true
    number_of_dynamic_models: 2
    max_models_to_download: 5
    models_to_load: ["top 2", "Deliberate"]
    models_to_skip: ["stable_diffusion_inpainting"]
    forms: ["caption", "nsfw", "interrogation", "GFPGAN"]
    cache_home: "./models/"
    temp_dir: "./tmp"
    always_download: true
    ram_to_leave_free: "50%"
    vram_to_leave_free: "2048"
    disable_terminal_ui: true
    stats_output_frequency: 60
    suppress_speed_warnings: true
    extra_slow_worker: true
    limit_max_steps: true
    disable_voodoo: true
    low_vram_mode: false
    enable_model_cache: true
""")


def test_defaults_are_the_legacy_defaults():
    config = build_config({}, environ={}).config
    assert config.api_key.get_secret_value() == ANONYMOUS_API_KEY
    assert (config.max_threads, config.queue_size, config.max_batch, config.max_power) == (1, 1, 1, 8)
    assert config.nsfw is True and config.censor_nsfw is False
    assert config.allow_img2img and config.allow_painting and config.allow_post_processing
    assert not (config.allow_lora or config.allow_controlnet)
    assert max_pixels(config) == 512 * 512
    assert dreamer_name(config) == config.worker_name
    assert config.dreamer_name is None


def test_config_is_frozen():
    config = build_config({}, environ={}).config
    with pytest.raises(ValidationError):
        config.max_threads = 4  # type: ignore[misc]


def test_precedence_yaml_then_env_then_cli():
    file_values = {"max_threads": 2, "worker_name": "from-yaml", "max_batch": 2}
    environ = {"HORDE_MAX_THREADS": "3", "HORDE_WORKER_NAME": "from-env"}
    loaded = build_config(file_values, environ=environ, overrides={"max_threads": 4})
    assert loaded.config.max_threads == 4  # CLI
    assert loaded.config.worker_name == "from-env"  # env over yaml
    assert loaded.config.max_batch == 2  # yaml only


def test_api_key_from_environment_and_horde_url_variable():
    loaded = build_config(
        {"api_key": "file-key-123"},
        environ={"HORDE_API_KEY": SECRET, "HORDE_URL": "https://aihorde.net/api/"},
    )
    assert loaded.config.api_key.get_secret_value() == SECRET
    assert api_base(loaded.config) == "https://aihorde.net"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_threads", "many"),
        ("max_threads", 0),
        ("max_power", 1),
        ("nsfw", "perhaps"),
        ("forms", ["caption", "painting"]),
        ("ram_to_leave_free", "lots"),
        ("horde_url", "ftp://example"),
        ("priority_usernames", ["nohash"]),
        ("models_to_load", "Deliberate"),
    ],
)
def test_each_validation_error_names_its_key(key, value):
    with pytest.raises(ConfigError) as caught:
        build_config({key: value}, environ={})
    assert len(caught.value.lines) == 1
    assert caught.value.lines[0].startswith(f"{key}:")
    assert "not allowed" in caught.value.lines[0]


def test_unknown_keys_warned_and_legacy_keys_listed():
    loaded = build_config({"max_thread": 2, "disable_voodoo": True}, environ={})
    assert any("max_thread" in w and "unknown key" in w for w in loaded.warnings)
    assert "disable_voodoo" in loaded.ignored_legacy_keys


def test_legacy_style_file_with_every_key_loads(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text(LEGACY_FILE)
    loaded = load_config(path, environ={})
    config = loaded.config
    assert config.max_batch == 4 and config.max_power == 32 and max_pixels(config) == 1024 * 1024
    assert config.forms == ["caption", "nsfw", "interrogation", "GFPGAN"]
    assert config.models_to_load == ["top 2", "Deliberate"]
    assert dreamer_name(config) == "Legacy Dreamer"
    assert not any("unknown key" in w for w in loaded.warnings)
    # Accepted but inert keys are said so, not silently ignored.
    assert any("allow_controlnet is set but not acted on" in w for w in loaded.warnings)
    assert config.allow_lora and config.max_lora_cache_size == 20  # acted on (bridge/lora)
    assert not any("allow_lora" in w for w in loaded.warnings)
    assert set(loaded.ignored_legacy_keys) == {"disable_voodoo", "low_vram_mode", "enable_model_cache"}


def test_reGen_alias_keys():
    loaded = build_config({"image_models_to_load": ["Deliberate"]}, environ={})
    assert loaded.config.models_to_load == ["Deliberate"]


def test_memory_specs_and_modes():
    for spec in ("80%", "2048", "2048MB", 4096):
        assert build_config({"ram_to_leave_free": spec}, environ={}).config.ram_to_leave_free == str(spec)
    config = build_config({}, environ={}).config
    assert modes(config, has_gpu=False) == (False, True)
    assert modes(config, has_gpu=True) == (True, False)
    both = build_config({"dreamer": True, "alchemist": True}, environ={}).config
    assert modes(both, has_gpu=False) == (True, True)


def test_committed_bridgedata_matches_the_model_and_documents_every_key():
    text = (REPO / "bridgeData.yaml").read_text()
    data = yaml.safe_load(text)
    assert set(data) == set(BridgeConfig.model_fields)
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")) and ":" in line:
            assert lines[index - 1].startswith("#") or lines[index - 1].startswith(
                tuple(f"{k}:" for k in data)
            ), f"key line {line!r} has no comment above it"


def _run_cli(*args: str, env_key: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if env_key:
        env["HORDE_API_KEY"] = env_key
    return subprocess.run(
        [sys.executable, str(REPO / "run_worker.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_check_config_on_committed_file_exits_zero_and_masks_the_key():
    result = _run_cli("--check-config", "--set", "cache_home=/nonexistent-cache", env_key=SECRET)
    assert result.returncode == 0, result.stderr
    assert "# resolved models_to_load" in result.stdout
    assert "keys accepted but not acted on yet" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "***22 chars***" in result.stdout


def test_check_config_with_bad_value_exits_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_threads: many\n")
    result = _run_cli("--check-config", "--config", str(bad))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_threads" in lines[0]


def test_civitai_keys_and_the_token_stays_secret():
    environ = {"HORDE_CIVITAI_API_TOKEN": "12345", "HORDE_CIVITAI_URL": "http://127.0.0.1:9/civitai"}
    config = build_config({"civitai_api_token": "ignored", "allow_lora": True}, environ=environ).config
    assert config.civitai_api_token.get_secret_value() == "12345"  # a numeric token stays a string
    assert config.civitai_url == "http://127.0.0.1:9/civitai" and config.prefetch_loras == 10
    assert masked_dump(config)["civitai_api_token"] == "***5 chars***" and "12345" in secrets(config)
    with pytest.raises(ConfigError, match="civitai_url"):
        build_config({"civitai_url": "civitai.com"}, environ={})
    legacy = build_config({"purge_loras_on_download": True}, environ={})
    assert "purge_loras_on_download" in legacy.ignored_legacy_keys
