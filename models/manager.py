"""ModelManager: which generation models this worker can serve, and their pipelines on demand.

A model is advertised only when every file its record lists is present and verified. Its base pipeline is
loaded once into the ModelCache (RAM, then the execution device) and shared: each `pipeline()` call gets
a light pipeline object built with `from_pipe` on the same modules (no weight copies) and a scheduler of
its own, so concurrent jobs on one model never share scheduler state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.cache import ModelCache
from models.device import DevicePolicy
from models.downloads import is_ready, model_dir
from models.loading import LoadPlan, ModelLoadError, load_pipeline, plan_load
from models.records import GENERATION_CATEGORIES, SERVABLE_BASELINES, ModelRecord
from models.reference import ModelReference

if TYPE_CHECKING:
    from models.downloads import Downloader

logger = logging.getLogger(__name__)

SUPPORTED_BASELINES = SERVABLE_BASELINES  # the one list lives in models/records.py


class ModelNotReadyError(KeyError):
    """The model is unknown, not configured here, or its files are missing or corrupt."""


class ModelManager:
    def __init__(
        self,
        *,
        reference: ModelReference,
        cache: ModelCache,
        device: DevicePolicy,
        cache_home: Path,
        models: Sequence[str],
        downloader: Downloader | None = None,
        depth_estimator_dir: Path | None = None,
    ) -> None:
        self._reference = reference
        self._cache = cache
        self._device = device
        self._cache_home = Path(cache_home)
        self._downloader = downloader
        self._depth_estimator_dir = depth_estimator_dir
        self._models: list[str] = []
        self._broken: dict[str, str] = {}
        self._plans: dict[str, LoadPlan] = {}
        self._lock = threading.Lock()
        _quiet_from_pipe()
        for name in models:
            self._add(name)

    def _add(self, name: str) -> None:
        canonical = self._reference.canonical(name)
        if canonical is None:
            logger.warning("model %r is not in the model reference; not served", name)
            return
        record = self._reference.get(canonical)
        if record.category not in GENERATION_CATEGORIES:
            logger.warning(
                "model %r is a %s model, not a generation model; not served", name, record.category
            )
        elif (record.baseline or "").lower() not in SUPPORTED_BASELINES:
            logger.warning(
                "model %r: baseline %r is not supported by this worker; not served", name, record.baseline
            )
        elif canonical not in self._models:
            self._models.append(canonical)

    def add_model(self, name: str) -> bool:
        """Serve one more model (dynamic_models); True when it is now among the configured models."""
        with self._lock:
            self._add(name)
            canonical = self._reference.canonical(name)
            return canonical is not None and canonical in self._models

    # --- what is served -------------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """The configured generation models, ready or not."""
        return list(self._models)

    def record(self, name: str) -> ModelRecord:
        return self._reference.get(name)

    def files_dir(self, name: str) -> Path:
        """Where that model's verified files live."""
        return model_dir(self._cache_home, self.record(name))

    def is_ready(self, name: str) -> bool:
        canonical = self._reference.canonical(name)
        if canonical is None or canonical not in self._models or canonical in self._broken:
            return False
        return is_ready(self.record(canonical), self.files_dir(canonical))

    def ready_models(self) -> list[str]:
        """Configured models whose files are all present and verified (what pops advertise)."""
        return [name for name in self._models if self.is_ready(name)]

    def broken_models(self) -> dict[str, str]:
        """Models whose files are present but could not be loaded, with the reason."""
        return dict(self._broken)

    def download_missing(self) -> dict[str, bool]:
        """Fetch what configured models lack (needs a downloader); model name -> ready now."""
        if self._downloader is None:
            return {name: self.is_ready(name) for name in self._models}
        todo = [self.record(name) for name in self._models if not self.is_ready(name)]
        outcomes = self._downloader.ensure_all(todo)
        for name, outcome in outcomes.items():
            if not outcome.ok:
                logger.error("model %r could not be downloaded: %s", name, outcome.reason)
        return {name: self.is_ready(name) for name in self._models}

    # --- pipelines ------------------------------------------------------------------------------------

    def _plan(self, name: str) -> LoadPlan:
        with self._lock:
            plan = self._plans.get(name)
        if plan is None:
            try:
                plan = plan_load(self.record(name), self.files_dir(name))
            except ModelLoadError:
                raise
            except Exception as exc:
                # A checkpoint whose header cannot be read (a corrupt .safetensors) is as broken as one that
                # fails later in diffusers: the model must stop being advertised.
                reason = str(exc).splitlines()[0] if str(exc) else ""
                raise ModelLoadError(
                    f"model {name!r} cannot be read: {type(exc).__name__}: {reason}"
                ) from exc
            with self._lock:
                self._plans[name] = plan
        return plan

    def _loader(self, name: str, plan: LoadPlan) -> Any:
        def load() -> Any:
            try:
                return load_pipeline(
                    self.record(name),
                    self.files_dir(name),
                    self._device,
                    plan=plan,
                    depth_estimator_dir=self._depth_estimator_dir,
                )
            except (ModelLoadError, MemoryError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as exc:
                # Verified files that diffusers still rejects (wrong shapes, unknown layout) stay broken.
                reason = str(exc).splitlines()[0] if str(exc) else ""
                raise ModelLoadError(
                    f"model {name!r} failed to load: {type(exc).__name__}: {reason}"
                ) from exc

        return load

    @contextmanager
    def pipeline(self, name: str, pipeline_class: type | None = None) -> Iterator[Any]:
        """The model's pipeline on the execution device, locked in the cache. With pipeline_class
        (e.g. StableDiffusionImg2ImgPipeline) a variant built by `from_pipe` on the same modules."""
        canonical = self._reference.canonical(name)
        if canonical is None or not self.is_ready(canonical):
            raise ModelNotReadyError(f"model {name!r} is not ready on this worker")
        loaded = False
        try:
            plan = self._plan(canonical)
            size = plan.estimated_bytes(self._device.dtype)
            with self._cache.use(canonical, self._loader(canonical, plan), size_hint=size) as base:
                loaded = True
                yield self._variant(base, pipeline_class)
        except ModelLoadError as exc:
            if not loaded:
                # Present but unloadable (unsupported shape, missing component): stop advertising it.
                self._broken[canonical] = str(exc)
                logger.error("model %r cannot be loaded and is no longer served: %s", canonical, exc)
            raise

    def _variant(self, base: Any, pipeline_class: type | None) -> Any:
        cls = pipeline_class or type(base)
        # The base's scheduler holds per-run state (timesteps): every user gets a fresh one.
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        # from_pipe casts every module to `dtype` (float32 by default): pass the dtype they already have.
        variant = cls.from_pipe(base, scheduler=scheduler, dtype=self._device.dtype)
        variant.set_progress_bar_config(disable=True)
        return variant


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every same-dtype `.to(dtype)` that "modules should be kept in float32: []"
    (an empty list); from_pipe does that for each variant, which would flood the worker's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_from_pipe() -> None:
    target = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _NoEmptyFp32Warning) for f in target.filters):
        target.addFilter(_NoEmptyFp32Warning())
