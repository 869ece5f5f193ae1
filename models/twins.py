"""`.safetensors` twins of pickled checkpoints: unpickle a `.ckpt` once, memory-map it on every later start.

The reference names (and hashes) the `.ckpt`, so the `.ckpt` stays the model's file: it is what downloads
verify and what the first load reads (through the restricted unpickler). Once that load has produced a
complete pipeline, the weights it used are written beside it as `<file>.twin.safetensors`, stamped with the
`.ckpt`'s sha256. A later plan uses the twin only while that stamp matches the `.ckpt` it stands for; a
replaced or re-downloaded `.ckpt` makes its old twin stale, and the next load writes a new one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TWIN_SUFFIX = ".twin.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Keys safetensors metadata carries for the twin (strings only).
_SOURCE_KEY = "horde_bridge_source"
_SOURCE_SHA_KEY = "horde_bridge_source_sha256"
# Room kept free on the disk after writing a twin: a full disk would break the worker's other writes.
_DISK_MARGIN = 1 << 30


def twin_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + TWIN_SUFFIX)


def usable_twin(checkpoint: Path, source_sha256: str) -> Path | None:
    """The checkpoint's twin when it exists and was written from a file with this sha256."""
    twin = twin_path(checkpoint)
    if not twin.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(twin), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # a truncated or foreign file is simply not a usable twin
        logger.warning("ignoring %s (%s); it will be rewritten", twin.name, exc)
        return None
    if metadata.get(_SOURCE_SHA_KEY, "").lower() != source_sha256.lower():
        logger.info("%s was written from another %s; it will be rewritten", twin.name, checkpoint.name)
        return None
    return twin


def _weights_for_twin(state: Mapping[str, object], keep_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors a pipeline loads, contiguous, none sharing memory (safetensors refuses shared tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not key.startswith(keep_prefixes):
            continue
        tensor = value.detach().contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and where in seen:
            tensor = tensor.clone()
        seen.add(where)
        out[key] = tensor
    return out


def write_twin(
    checkpoint: Path, state: Mapping[str, object], source_sha256: str, keep_prefixes: tuple[str, ...]
) -> Path | None:
    """Write the twin (atomically); None, with one log line, when the disk has no room or refuses."""
    from safetensors.torch import save_file

    weights = _weights_for_twin(state, keep_prefixes)
    if not weights:
        return None
    needed = sum(t.numel() * t.element_size() for t in weights.values())
    twin = twin_path(checkpoint)
    part = twin.with_name(twin.name + ".part")
    try:
        free = shutil.disk_usage(checkpoint.parent).free
        if needed + _DISK_MARGIN > free:
            logger.warning(
                "not keeping a .safetensors twin of %s: it needs %.2f GB and %.2f GB are free; later starts "
                "will unpickle the .ckpt again",
                checkpoint.name,
                needed / 1e9,
                free / 1e9,
            )
            return None
        metadata = {"format": "pt", _SOURCE_KEY: checkpoint.name, _SOURCE_SHA_KEY: source_sha256.lower()}
        save_file(weights, str(part), metadata=metadata)
        os.replace(part, twin)
    except OSError as exc:
        part.unlink(missing_ok=True)
        logger.warning("could not write a .safetensors twin of %s (%s)", checkpoint.name, exc)
        return None
    logger.info("kept %s (%.2f GB): later loads memory-map it instead of unpickling", twin.name, needed / 1e9)
    return twin
