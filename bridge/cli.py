"""Command line of run_worker.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from bridge.config import (
    NOT_ACTED_ON,
    SECRET_KEYS,
    ConfigError,
    LoadedConfig,
    is_anonymous,
    load_config,
    masked_dump,
    secrets,
)
from bridge.identity import bridge_agent_lines
from bridge.logs import setup_logging

log = logging.getLogger("bridge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_worker.py",
        description="AI Horde worker bridge: generates images and runs alchemy for the AI Horde.",
    )
    parser.add_argument("--config", type=Path, default=Path("bridgeData.yaml"),
                        help="the bridgeData.yaml to use (default: ./bridgeData.yaml)")
    parser.add_argument("--check-config", action="store_true",
                        help="print the resolved config (secrets masked), model list and warnings, then exit")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: a local horde and sample requests; results in ./demo-output")
    parser.add_argument("--demo-output", type=Path, default=Path("demo-output"),
                        help="where --demo writes its results")
    parser.add_argument("--download-models", action="store_true",
                        help="download and verify the configured models, then exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (yaml value), e.g. --set max_threads=2; repeatable")
    parser.add_argument("-n", "--worker-name", help="override worker_name")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output (warnings only)")
    parser.add_argument("--log-file", type=Path, help="also write the full (debug) log to this file")
    return parser.parse_args(argv)


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE"])
        overrides[key.strip()] = value if key.strip() in SECRET_KEYS else yaml.safe_load(value)
    if args.worker_name:
        overrides["worker_name"] = args.worker_name
    return overrides


def controlnet_lines(config: Any, names: list[str]) -> list[str]:
    """Which control types are ready for the resolved models (their files present and verified)."""
    if not config.allow_controlnet:
        return ["allow_controlnet is false: the worker pops without ControlNet and downloads none"]
    from controlnet import ANNOTATOR_REFERENCE, ControlNets
    from models.cache import ModelCache
    from models.device import DevicePolicy
    from models.reference import ModelReference

    extra = [Path(p) for p in config.custom_model_reference] + [ANNOTATOR_REFERENCE]
    reference = ModelReference.load(cache_dir=Path(config.cache_home) / "reference", upstream=None,
                                    extra_files=extra)
    records = [reference.get(name) for name in names if name in reference]
    probe = ControlNets(reference=reference, cache=ModelCache(DevicePolicy.cpu(), ram_budget_bytes=0),
                        device=DevicePolicy.cpu(), cache_home=Path(config.cache_home))
    lines = probe.report(records)
    pops = "with" if probe.serves(records) else "WITHOUT"
    return [*lines, f"the worker pops {pops} allow_controlnet (only when every type that has a ControlNet "
                    "for these baselines is ready; --download-models fetches what is missing)"]


def check_config(loaded: LoadedConfig) -> int:
    config = loaded.config
    print(f"# config: {loaded.source or '(defaults)'}")
    print(yaml.safe_dump(masked_dump(config), sort_keys=False).rstrip())
    plan_lines, model_warnings, stop, names = _plan_section(config)
    print("\n".join(plan_lines))
    if loaded.mapped_keys:
        print("\n# keys of other workers' files, honoured as ours")
        for key, became in loaded.mapped_keys.items():
            print(f"- {key}: {became}")
    if loaded.ignored_legacy_keys:
        print("\n# keys of other workers' files accepted without effect here")
        for key, why in loaded.ignored_legacy_keys.items():
            print(f"- {key}: {why}")
    print("\n# bridge_agent")
    for line in bridge_agent_lines(config):
        print(f"- {line}")
    print("\n# LoRA and textual inversion")
    from bridge.lora.service import describe

    for line in describe(config):
        print(f"- {line}")
    print("\n# keys accepted but not acted on yet")
    for key, why in NOT_ACTED_ON.items():
        print(f"- {key}: {why}")
    print("\n# ControlNet (allow_controlnet)")
    for line in controlnet_lines(config, names):
        print(f"- {line}")
    warnings = loaded.warnings + model_warnings
    print("\n# warnings")
    for warning in warnings or ["none"]:
        print(f"- {warning}")
    if stop:
        print(f"\nthe worker would not start: {stop}")
        return 1
    return 0


def _plan_section(config) -> tuple[list[str], list[str], str | None, list[str]]:
    """The resolved models and the download plan as `run_worker.py` would start with them (no download);
    warnings; the line that would stop the start, if any; the resolved model names."""
    from bridge.startup import download_plan, is_real_horde, template_name_problems
    from bridge.worker import _has_gpu, plan_worker, weight_records

    try:
        plan = plan_worker(config, has_gpu=_has_gpu())
    except Exception as err:  # offline with no cache and no snapshot: say so, don't fail the check
        return [f"\n# model plan unavailable: {err}"], [f"model plan unavailable ({err})"], None, []
    lines = ["\n# resolved models_to_load", json.dumps(plan.models)]
    downloads = download_plan(Path(config.cache_home), weight_records(config, plan))
    lines += ["\n# download plan"] + [f"- {line}" for line in downloads.lines()]
    warnings = list(plan.notes)
    names = template_name_problems(config, dreamer=plan.dreamer, alchemist=plan.alchemist)
    warnings += names
    stop = downloads.shortage()
    if names and is_real_horde(config):
        stop = names[0]
    return lines, warnings, stop, list(plan.models)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    verbosity = args.verbose - args.quiet
    try:
        loaded = load_config(args.config if args.config.exists() or not args.demo else None,
                             overrides=cli_overrides(args))
    except ConfigError as err:
        for line in err.lines:
            print(f"config error: {line}", file=sys.stderr)
        return 1
    from bridge.startup import apply_gpu_indices

    apply_gpu_indices(loaded.config)  # before anything initialises CUDA
    if args.check_config:
        return check_config(loaded)
    if loaded.config.limited_console_messages:
        verbosity = min(verbosity, -1)
    setup_logging(verbosity, args.log_file, secrets(loaded.config))
    if args.demo:
        from bridge.demo import run_demo

        return run_demo(loaded.config, output_dir=args.demo_output)
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    if is_anonymous(loaded.config):
        log.error("api_key is the anonymous key 0000000000: the AI Horde refuses anonymous workers "
                  "(403 AnonForbiddenWorker). Register at https://aihorde.net/register, then set "
                  "HORDE_API_KEY or api_key in %s. To try the worker offline: run_worker.py --demo",
                  args.config)
    from bridge.worker import download_models, run_worker

    if args.download_models:
        return download_models(loaded.config)
    return run_worker(loaded.config)
