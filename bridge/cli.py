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


def resolved_models(loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """The model list after meta entries and skips, from the cached/upstream reference (no download)."""
    try:
        from models.reference import ModelReference
    except ImportError as err:  # the reference module is part of every install; this guards a broken one
        return list(loaded.config.models_to_load), [f"model reference unavailable: {err}"]
    config = loaded.config
    cache_dir = Path(config.cache_home) / "reference"
    extra = [Path(p) for p in config.custom_model_reference]
    try:
        reference = ModelReference.load(cache_dir=cache_dir, extra_files=extra, timeout=5.0)
    except Exception as err:  # offline with no cache yet: say so, don't fail the check
        return list(config.models_to_load), [f"model reference not available ({err}): names not checked"]
    resolved = reference.resolve(config.models_to_load, config.models_to_skip)
    return list(resolved.names), list(resolved.warnings)


def check_config(loaded: LoadedConfig) -> int:
    config = loaded.config
    print(f"# config: {loaded.source or '(defaults)'}")
    print(yaml.safe_dump(masked_dump(config), sort_keys=False).rstrip())
    names, model_warnings = resolved_models(loaded)
    print("\n# resolved models_to_load")
    print(json.dumps(names))
    if loaded.ignored_legacy_keys:
        print("\n# legacy keys accepted without effect")
        for key, why in loaded.ignored_legacy_keys.items():
            print(f"- {key}: {why}")
    print("\n# LoRA and textual inversion")
    from bridge.lora.service import describe

    for line in describe(config):
        print(f"- {line}")
    print("\n# keys accepted but not acted on yet")
    for key, why in NOT_ACTED_ON.items():
        print(f"- {key}: {why}")
    warnings = loaded.warnings + model_warnings
    print("\n# warnings")
    for warning in warnings or ["none"]:
        print(f"- {warning}")
    return 0


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
    if args.check_config:
        return check_config(loaded)
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
