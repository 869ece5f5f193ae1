"""Checks made before a worker starts serving: who it is, which GPU, and whether its downloads fit the disk.

Pure where they can be: `--check-config` and the start print the same plan and the same lines.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from bridge.config import REAL_HORDE_HOSTS, TEMPLATE_WORKER_NAMES, BridgeConfig, api_base, dreamer_name

log = logging.getLogger(__name__)


def is_real_horde(config: BridgeConfig) -> bool:
    host = (urlparse(api_base(config)).hostname or "").lower()
    return host in REAL_HORDE_HOSTS or host.endswith(tuple(f".{h}" for h in REAL_HORDE_HOSTS))


def template_name_problems(config: BridgeConfig, *, dreamer: bool, alchemist: bool) -> list[str]:
    """One line per worker name still at a template default (everyone who keeps it shares it)."""
    names = [("dreamer_name / worker_name", dreamer_name(config))] if dreamer else []
    names += [("alchemist_name", config.alchemist_name)] if alchemist else []
    return [
        f"{key} is {name!r}, the template's default: the horde gives a name to one account only, so "
        "everyone who keeps it collides (403 WrongCredentials). Choose a name of your own."
        for key, name in names
        if name in TEMPLATE_WORKER_NAMES
    ]


def apply_gpu_indices(config: BridgeConfig, environ: MutableMapping[str, str] | None = None) -> str | None:
    """gpu_device_indices (reGen's key, PCI bus order): the first index becomes the only visible GPU.
    Must run before torch initialises CUDA; an operator's CUDA_VISIBLE_DEVICES wins."""
    env = os.environ if environ is None else environ
    if not config.gpu_device_indices or "CUDA_VISIBLE_DEVICES" in env:
        return None
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["CUDA_VISIBLE_DEVICES"] = str(config.gpu_device_indices[0])
    if len(config.gpu_device_indices) > 1:
        log.warning("gpu_device_indices lists %d GPUs: this worker drives one, GPU %d",
                    len(config.gpu_device_indices), config.gpu_device_indices[0])
    return env["CUDA_VISIBLE_DEVICES"]


# ---- the download plan --------------------------------------------------------------------------------


@dataclass
class DownloadPlan:
    """What the configured models still need from the network, and whether the disk holds it."""

    where: Path
    # (name, bytes still needed); None: the reference gives no size
    items: list[tuple[str, int | None]] = field(default_factory=list)
    free: int = 0

    @property
    def total(self) -> int:
        return sum(size or 0 for _, size in self.items)

    @property
    def unknown(self) -> list[str]:
        return [name for name, size in self.items if size is None]

    @property
    def fits(self) -> bool:
        return self.total <= self.free

    def lines(self) -> list[str]:
        if not self.items:
            return ["nothing to download: every file is on disk and verified"]
        out = [f"{name}: {'size unknown' if size is None else _gb(size)}" for name, size in self.items]
        unknown = f" + {len(self.unknown)} of unknown size" if self.unknown else ""
        out.append(f"total: {_gb(self.total)}{unknown}")
        out.append(f"free in {self.where}: {_gb(self.free)}")
        return out

    def shortage(self) -> str | None:
        """The line that stops a start, or None when the disk has room."""
        if self.fits:
            return None
        return (f"not enough disk space for the download plan: {_gb(self.total)} needed, "
                f"{_gb(self.free)} free in {self.where}; free some space, choose fewer models "
                "(models_to_load / models_to_skip) or set only_models_on_disk: true")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _disk_free(path: Path) -> int:
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def download_plan(
    cache_home: Path, records: Iterable, *, disk_free: Callable[[Path], int] = _disk_free
) -> DownloadPlan:
    """The bytes each record still needs under cache_home (verified files count as there)."""
    from models.downloads import missing_bytes, model_dir

    plan = DownloadPlan(where=Path(cache_home), free=disk_free(Path(cache_home)))
    for record in records:
        needed = missing_bytes(record, model_dir(Path(cache_home), record))
        if needed != 0:
            plan.items.append((record.name, needed))
    return plan
