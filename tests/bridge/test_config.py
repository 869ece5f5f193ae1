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
    KEY_ALIASES,
    POST_PROCESSOR_FORMS,
    BridgeConfig,
    ConfigError,
    api_base,
    build_config,
    configured_forms,
    dreamer_name,
    family_weights,
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
        ("forms", "caption"),
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


def test_an_unknown_form_is_dropped_with_one_line_not_a_stop():
    loaded = build_config({"forms": ["caption", "painting", "caption", "vectorize"]}, environ={})
    assert configured_forms(loaded.config) == ["caption", "vectorize"]
    [line] = [w for w in loaded.warnings if w.startswith("forms:")]
    assert "'painting' dropped" in line


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
    assert any("allow_sdxl_controlnet is set but not acted on" in w for w in loaded.warnings)
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


def test_check_config_on_committed_file_masks_the_key_and_names_the_template_names():
    result = _run_cli("--check-config", "--set", "cache_home=/nonexistent-cache", env_key=SECRET)
    # The committed names are the template's: a start against the real horde would stop, and says why.
    assert result.returncode == 1, result.stderr
    assert "the worker would not start: alchemist_name is 'An Awesome Alchemist', the template's default" in (
        result.stdout
    )
    assert "# resolved models_to_load" in result.stdout and "# download plan" in result.stdout
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


# ---- the peers' files ----------------------------------------------------------------------------------
DATA = Path(__file__).parent / "data"


PEER_FILES = ["legacy_bridgeData.yaml", "regen_bridgeData.yaml", "regen2026_bridgeData.yaml"]


@pytest.mark.parametrize("name", PEER_FILES)
def test_peer_files_load_with_no_error_and_no_unknown_key(name):
    loaded = load_config(DATA / name, environ={})
    assert not [w for w in loaded.warnings if "unknown key" in w]
    file_keys = set(yaml.safe_load((DATA / name).read_text()))
    known = set(BridgeConfig.model_fields) | set(KEY_ALIASES) | set(loaded.ignored_legacy_keys)
    assert file_keys <= known | set(loaded.mapped_keys)
    # post-process becomes every post-processor form served here, never a form name of its own.
    assert "post-process" not in loaded.config.forms and "post_process" not in loaded.config.forms
    assert set(POST_PROCESSOR_FORMS) <= set(loaded.config.forms)


def test_regen_2026_keys_that_mean_ours_are_honoured():
    loaded = load_config(DATA / "regen2026_bridgeData.yaml", environ={})
    config = loaded.config
    # The reserves (MB) replace the template's untouched "80%".
    assert (config.vram_to_leave_free, config.ram_to_leave_free) == ("2048", "4096")
    assert config.forms[:2] == ["nsfw", "interrogation"]  # alchemy_caption_enabled: false drops caption
    assert config.only_models_on_disk and config.download_rate_limit_kbps == 5000
    assert config.gpu_device_indices == [1] and config.dreamer is True and config.alchemist is True
    assert set(loaded.mapped_keys) == {"vram_reserve_mb", "ram_reserve_mb", "alchemy_caption_enabled",
                                       "model_stickiness"}
    assert "extra_model_directories" in loaded.ignored_legacy_keys
    # An explicit leave-free value of ours wins over a reserve, and says so.
    both = build_config({"ram_reserve_mb": 4096, "ram_to_leave_free": "50%"}, environ={})
    assert both.config.ram_to_leave_free == "50%" and any("ram_reserve_mb" in w for w in both.warnings)


def test_post_process_and_spellings_of_forms():
    config = build_config({"forms": ["Caption", "post_process", "gfpgan", "NSFW"]}, environ={}).config
    assert config.forms == ["caption", *POST_PROCESSOR_FORMS, "nsfw"]
    # A name the horde does not know is dropped with one warning, never a stop (the server may add it later).
    mistyped = build_config({"forms": ["post-processing", "caption"]}, environ={})
    assert configured_forms(mistyped.config) == ["caption"]
    assert any("'post-processing' dropped" in warning for warning in mistyped.warnings)


def test_post_processor_forms_are_the_post_processors_served():
    from postprocessors import ORDER

    assert set(POST_PROCESSOR_FORMS) == set(ORDER)


def test_gpu_indices_pick_the_visible_gpu():
    from bridge.startup import apply_gpu_indices

    config = build_config({"gpu_device_indices": [2, 3]}, environ={}).config
    env: dict[str, str] = {}
    assert apply_gpu_indices(config, env) == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert apply_gpu_indices(config, {"CUDA_VISIBLE_DEVICES": "0"}) is None  # the operator's choice wins


def test_template_names_stop_only_against_the_real_horde():
    from bridge.startup import is_real_horde, template_name_problems

    default = build_config({}, environ={}).config
    assert len(template_name_problems(default, dreamer=True, alchemist=True)) == 2
    assert is_real_horde(default) and is_real_horde(build_config({"horde_url": "https://aihorde.net/api/"},
                                                                 environ={}).config)
    assert not is_real_horde(build_config({"horde_url": "http://127.0.0.1:7001"}, environ={}).config)
    own = build_config({"worker_name": "Mine", "alchemist_name": "Mine too"}, environ={}).config
    assert template_name_problems(own, dreamer=True, alchemist=True) == []


def test_family_shares_default_to_equal_and_name_only_known_families():
    assert family_weights(build_config({}, environ={}).config) == {"generation": 1.0, "alchemy": 1.0}
    partial = build_config({"family_shares": {"alchemy": 0.25}}, environ={}).config
    assert family_weights(partial) == {"generation": 1.0, "alchemy": 0.25}  # a family left out weighs 1
    env = build_config({}, environ={"HORDE_FAMILY_SHARES": "{generation: 3}"}).config
    assert family_weights(env)["generation"] == 3.0
    for bad, says in [({"dreams": 1}, "unknown job family ['dreams']; allowed: generation, alchemy"),
                      ({"alchemy": -1}, "each share must be a number >= 0"),
                      ({"alchemy": 0, "generation": 0}, "at least one family needs a share above 0")]:
        with pytest.raises(ConfigError) as caught:
            build_config({"family_shares": bad}, environ={})
        assert caught.value.lines[0].startswith("family_shares") and says in caught.value.lines[0]


@pytest.mark.parametrize(
    "text",
    [
        'api_key: "{key}\nworker_name: x\n',  # an unclosed quote
        "api_key: [{key}\n",  # an unclosed flow sequence
        "api_key: {key}: oops\n",  # a colon inside the value
        "worker_name: ok\napi_key: '{key}\tx\n",
        "  api_key: {key}\nworker_name: bad\n  - x\n",
    ],
)
def test_a_yaml_error_never_prints_the_key(tmp_path, text):
    bad = tmp_path / "broken.yaml"
    bad.write_text(text.format(key=SECRET))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    (line,) = err.value.lines
    assert SECRET not in line and "not valid YAML at line" in line


def test_the_cli_reports_a_broken_yaml_without_the_key(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text(f'worker_name: x\napi_key: "{SECRET}\n')
    result = _run_cli("--check-config", "--config", str(bad))
    assert result.returncode != 0 and "not valid YAML" in result.stderr
    assert SECRET not in result.stdout + result.stderr


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
