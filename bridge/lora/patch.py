"""LoRAs merged into a resident model's weights for a job, and the exact original bytes put back after.

Applying adds `strength * up @ down` to every weight a LoRA targets: unet modules at the job's `model`
strength, text-encoder modules at its `clip` strength (negative strengths too). Merged weights cost nothing
per denoising step (peft's unmerged adapters add two matmuls per layer per step). The original of every
changed weight is kept: on a CPU the weight is pointed at a new tensor and the original tensor itself is the
backup; on a GPU the weight is changed in place and a CPU copy is the backup (no extra VRAM). Undo puts the
originals back, so a job after it is byte-identical to one on a model that never had a LoRA (peft's unmerge
subtracts the delta again, which does not give the same bytes back).

One model's state is shared by every job on it (the pipelines variants share the modules). `ModelLoras.use`
lets jobs wanting the same LoRAs at the same strengths run together and keeps the merged state for the next
job that asks for the same; a job wanting another set (or none) waits until the current users are done, then
undoes and applies. So concurrent jobs on one model are correct: identical sets run concurrently, different
sets are serialised.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from bridge.lora.prompts import install_hooks
from bridge.lora.weights import COMPONENTS, LoraFormatError, LoraWeights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a job: its identity (file digest), how to read it (read only to merge it), strengths."""

    key: str
    name: str
    load: Callable[[], LoraWeights]
    model: float = 1.0
    clip: float = 1.0


@dataclass
class PatchReport:
    """What applying a set of LoRAs did: modules changed, modules that did not fit, time taken."""

    changed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # LoRA name -> modules that did not fit the model
    matched: dict[str, int] = field(default_factory=dict)  # LoRA name -> modules merged
    failed: dict[str, str] = field(default_factory=dict)  # LoRA name -> why its file could not be read
    apply_s: float = 0.0
    undo_s: float = 0.0
    reused: bool = False


@dataclass
class _Saved:
    param: torch.nn.Parameter
    original: torch.Tensor  # the original tensor (CPU weights) or a CPU copy of it (device weights)
    in_place: bool


def _module(root: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The named submodule; transformers 5 text encoders lack the `text_model.` level older files name."""
    candidates = [name]
    while name.startswith("text_model."):
        name = name[len("text_model.") :]
        candidates.append(name)
    for candidate in candidates:
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _target(pipe: Any, component: str, module: str) -> torch.nn.Parameter | None:
    root = getattr(pipe, component, None)
    if not isinstance(root, torch.nn.Module):
        return None
    found = _module(root, module)
    weight = getattr(found, "weight", None)
    return weight if isinstance(weight, torch.nn.Parameter) else None


def _targets(pipe: Any, uses: Sequence[LoraUse], report: PatchReport) -> dict[int, tuple[Any, list]]:
    """id(weight) -> (weight, [(pair, strength), ...]) for every weight the LoRAs fit."""
    out: dict[int, tuple[Any, list]] = {}
    for use in uses:
        try:
            weights = use.load()
        except LoraFormatError as exc:
            report.failed[use.name] = str(exc)
            continue
        matched = skipped = 0
        for (component, module), pair in weights.pairs.items():
            strength = use.model if component == "unet" else use.clip
            weight = _target(pipe, component, module)
            if weight is None or pair.numel != weight.numel():
                skipped += 1
                continue
            matched += 1
            if strength != 0:
                out.setdefault(id(weight), (weight, []))[1].append((pair, float(strength)))
        report.matched[use.name] = matched
        if skipped:
            report.skipped[use.name] = skipped
    return out


def _merged(current: torch.Tensor, pairs: list) -> torch.Tensor:
    """A new tensor: current + sum(strength * up @ down), computed in float32, in current's dtype."""
    base = current.reshape(current.shape[0], -1)
    merged = base.float() if base.dtype != torch.float32 else base
    for pair, strength in pairs:
        up, down = pair.up.to(current.device), pair.down.to(current.device)
        merged = torch.addmm(merged, up, down, alpha=strength)  # a new tensor: `current` is never written
    return merged.to(current.dtype).reshape(current.shape)


class ModelLoras:
    """The LoRA state of one resident model, shared by the jobs on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._key: tuple = ()
        self._users = 0
        self._queue: deque[object] = deque()
        self._saved: list[_Saved] = []
        self._modules: list[tuple[str, weakref.ref]] = []
        self._probe: tuple[torch.nn.Parameter, int, float] | None = None
        self._watched: set[int] = set()
        self._last = PatchReport()

    @contextmanager
    def use(self, pipe: Any, uses: Sequence[LoraUse]) -> Iterator[PatchReport]:
        """Hold the model with exactly `uses` merged (none: the original weights) for the block."""
        key = tuple((u.key, float(u.model), float(u.clip)) for u in uses)
        with self._cond:
            if self._queue or not self._same(pipe, key):
                # First come, first served: a job wanting the current set does not overtake one waiting
                # for another set (it would starve), it queues behind it.
                ticket = object()
                self._queue.append(ticket)
                try:
                    while not (self._queue[0] is ticket and (self._users == 0 or self._same(pipe, key))):
                        self._cond.wait()
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may share this set
            if self._users == 0:
                install_hooks(pipe)  # alone on the model: the one safe moment to add hooks
            if self._same(pipe, key):
                last = self._last
                report = PatchReport(last.changed, dict(last.skipped), dict(last.matched), dict(last.failed))
                report.reused = True
            else:
                report = self._switch(pipe, uses, key)
            self._users += 1
        try:
            yield report
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @property
    def applied(self) -> tuple:
        """(file key, model, clip) of each LoRA merged now; () when the weights are the original ones."""
        return self._key

    def _same(self, pipe: Any, key: tuple) -> bool:
        return self._key == key and self._valid(pipe)

    def _valid(self, pipe: Any) -> bool:
        """Whether the merged state still stands: the same modules, and a merged weight still merged (the
        cache may have reloaded the model, or copied it to the GPU again from its clean RAM copy)."""
        if not self._key:
            return True
        if any(ref() is not getattr(pipe, name, None) for name, ref in self._modules):
            return False
        if self._probe is None:
            return True
        param, index, value = self._probe
        return float(param.detach().reshape(-1)[index]) == value

    def _switch(self, pipe: Any, uses: Sequence[LoraUse], key: tuple) -> PatchReport:
        report = PatchReport()
        started = time.perf_counter()
        self._undo(pipe)
        report.undo_s = time.perf_counter() - started
        started = time.perf_counter()
        if uses:
            self._apply(pipe, uses, report)
            self._key = key
        report.apply_s = time.perf_counter() - started
        self._last = report
        logger.info(
            "LoRA on %s: %s (%d weights merged, %.0f MB of originals kept aside; undo %.3f s, apply %.3f s)",
            self.name,
            ", ".join(f"{u.name} model {u.model:g} clip {u.clip:g}" for u in uses) or "none",
            report.changed,
            sum(s.original.numel() * s.original.element_size() for s in self._saved) / 2**20,
            report.undo_s,
            report.apply_s,
        )
        return report

    @torch.no_grad()
    def _apply(self, pipe: Any, uses: Sequence[LoraUse], report: PatchReport) -> None:
        for weight, pairs in _targets(pipe, uses, report).values():
            current = weight.data
            patched = _merged(current, pairs)
            if current.device.type == "cpu":
                self._saved.append(_Saved(weight, current, in_place=False))
                weight.data = patched
            else:
                self._saved.append(_Saved(weight, current.to("cpu", copy=True), in_place=True))
                current.copy_(patched)
        report.changed = len(self._saved)
        self._modules = [
            (name, weakref.ref(getattr(pipe, name)))
            for name in COMPONENTS
            if isinstance(getattr(pipe, name, None), torch.nn.Module)
        ]
        self._probe = _probe(self._saved)
        unet = getattr(pipe, "unet", None)
        if unet is not None and id(unet) not in self._watched:
            # A model the cache dropped takes the backups with it instead of leaving them alive here.
            self._watched.add(id(unet))
            weakref.finalize(unet, _forget, weakref.ref(self), id(unet))

    @torch.no_grad()
    def _undo(self, pipe: Any) -> None:
        if self._key and self._valid(pipe):
            for saved in reversed(self._saved):
                if saved.in_place:
                    saved.param.data.copy_(saved.original.to(saved.param.device))
                else:
                    saved.param.data = saved.original
        self._clear()

    def _clear(self) -> None:
        self._saved, self._modules, self._probe, self._key = [], [], None, ()

    def forget(self, unet_id: int) -> None:
        """The model with that unet was dropped: its merged state went with it."""
        with self._cond:
            self._watched.discard(unet_id)
            unet = dict(self._modules).get("unet")
            if unet is not None and unet() is None:
                self._clear()


def _probe(saved: list[_Saved]) -> tuple[torch.nn.Parameter, int, float] | None:
    """One element a merge changed, and its merged value: if it reads otherwise later, the merge is gone."""
    for entry in saved:
        merged = entry.param.detach().reshape(-1).float().cpu()
        change = (merged - entry.original.reshape(-1).float().cpu()).abs()
        index = int(change.argmax())
        if float(change[index]) > 0:
            return entry.param, index, float(merged[index])
    return None


def _forget(owner: weakref.ref, unet_id: int) -> None:
    loras = owner()
    if loras is not None:
        loras.forget(unet_id)


class LoraPatcher:
    """Every model's LoRA state, by model name."""

    def __init__(self) -> None:
        self._models: dict[str, ModelLoras] = {}
        self._lock = threading.Lock()

    def model(self, name: str) -> ModelLoras:
        with self._lock:
            return self._models.setdefault(name, ModelLoras(name))

    @contextmanager
    def use(self, name: str, pipe: Any, uses: Sequence[LoraUse]) -> Iterator[PatchReport]:
        with self.model(name).use(pipe, uses) as report:
            yield report
