"""ControlNets: which control types this worker can serve, and their annotators and ControlNets on demand.

A type is ready for a baseline when its ControlNet file (the horde's `controlnet.json`) and its annotator's
weights (`controlnet/annotators.json`) are present and verified, as model files are. Both live in the one
model cache with their real sizes: an annotator under `annotator:<record>`, a full ControlNet under
`controlnet:<file>`, a diff ControlNet — which only exists once added to a base model's UNet — under
`controlnet:<file>@<model>`, so each base model gets (and the budget counts) its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from controlnet.annotators import ANNOTATORS, Annotator, LoadedAnnotator, annotate
from controlnet.loading import DIFF, build_controlnet, estimated_bytes, file_format, read_keys, weight_file
from controlnet.types import CONTROL_BASELINES, CONTROL_TYPES, ControlType, controlnet_name, servable_types
from models.downloads import is_ready, model_dir

if TYPE_CHECKING:
    from models.cache import ModelCache
    from models.device import DevicePolicy
    from models.records import ModelRecord
    from models.reference import ModelReference

logger = logging.getLogger(__name__)

ANNOTATOR_REFERENCE = Path(__file__).with_name("annotators.json")


class ControlNotReadyError(RuntimeError):
    """The ControlNet or the annotator a job needs is not present (or not verified) on this worker."""


class ControlNets:
    def __init__(
        self, *, reference: ModelReference, cache: ModelCache, device: DevicePolicy, cache_home: Path
    ) -> None:
        self._reference = reference
        self._cache = cache
        self._device = device
        self._cache_home = Path(cache_home)
        self._formats: dict[Path, str] = {}

    # --- what is ready --------------------------------------------------------------------------------

    def _record(self, name: str | None) -> ModelRecord | None:
        if name is None or name not in self._reference:
            return None
        return self._reference.get(name)

    def files(self, name: str) -> list[Path]:
        record = self._reference.get(name)
        folder = model_dir(self._cache_home, record)
        return [folder / spec.path for spec in record.files]

    def _present(self, name: str | None) -> bool:
        record = self._record(name)
        return record is not None and is_ready(record, model_dir(self._cache_home, record))

    def missing(self, kind: ControlType, baseline: str | None) -> list[str]:
        """What keeps `kind` from running on `baseline` models (empty: ready)."""
        name = controlnet_name(kind, baseline)
        if name is None:
            return [f"the horde's reference has no {kind.name} ControlNet for {baseline} models"]
        reasons = [] if self._present(name) else [f"ControlNet {name}"]
        annotator = ANNOTATORS[kind.annotator].record
        if annotator is not None and not self._present(annotator):
            reasons.append(f"annotator {annotator}")
        return reasons

    def is_ready(self, kind: ControlType, baseline: str | None) -> bool:
        return not self.missing(kind, baseline)

    def serves(self, records: Iterable[ModelRecord]) -> bool:
        """Whether to pop with allow_controlnet: some served model can take ControlNet, and every type the
        horde may send for each such model's baseline is ready (types without any ControlNet in the horde's
        reference are not counted: no worker can serve them)."""
        baselines = {r.baseline for r in records if can_control(r)}
        return bool(baselines) and all(
            self.is_ready(kind, baseline) for baseline in baselines for kind in servable_types(baseline)
        )

    def report(self, records: Iterable[ModelRecord]) -> list[str]:
        """One line per baseline of the served models: which types are ready, and what the others lack."""
        baselines = dict.fromkeys(r.baseline for r in records if can_control(r))
        if not baselines:
            return ["no served model can take ControlNet (SD1 / SD2 txt2img models only)"]
        lines = []
        for baseline in baselines:
            ready = [k.name for k in CONTROL_TYPES if self.is_ready(k, baseline)]
            lines.append(f"{baseline}: ready: {', '.join(ready) or 'none'}")
            for kind in CONTROL_TYPES:
                if kind.name not in ready:
                    why = "; ".join(self.missing(kind, baseline))
                    lines.append(f"{baseline}: {kind.name} not ready: {why}")
        return lines

    def wanted_records(self, baselines: Iterable[str | None]) -> list[ModelRecord]:
        """The ControlNet and annotator records that serving these baselines needs (for the downloader)."""
        names: list[str] = []
        for baseline in dict.fromkeys(b for b in baselines if (b or "") in CONTROL_BASELINES):
            for kind in servable_types(baseline):
                names.append(str(controlnet_name(kind, baseline)))
                if ANNOTATORS[kind.annotator].record:
                    names.append(str(ANNOTATORS[kind.annotator].record))
        return [r for r in (self._record(n) for n in dict.fromkeys(names)) if r is not None]

    # --- annotators -----------------------------------------------------------------------------------

    def annotate(self, kind: ControlType, image: Image.Image) -> Image.Image:
        """The control map of `image` for `kind` (its annotator loaded through the cache)."""
        annotator = ANNOTATORS[kind.annotator]
        if annotator.record is None:
            return annotate(annotator, None, image)
        with self._annotator(annotator) as loaded:
            return annotate(annotator, loaded, image)

    @contextmanager
    def _annotator(self, annotator: Annotator) -> Iterator[LoadedAnnotator]:
        name = str(annotator.record)
        if not self._present(name) or annotator.load is None:
            raise ControlNotReadyError(
                f"the {annotator.name} annotator's weights ({name}) are not on this worker"
            )
        files = self.files(name)
        hint = sum(path.stat().st_size for path in files if path.is_file())
        loader = annotator.load
        with self._cache.use(f"annotator:{name}", lambda: loader(files), size_hint=hint) as loaded:
            yield loaded

    # --- ControlNets ----------------------------------------------------------------------------------

    @contextmanager
    def controlnet(self, kind: ControlType, model: str, baseline: str | None, unet: Any) -> Iterator[Any]:
        """The ControlNet of `kind` for `model` (whose loaded UNet is `unet`), on the execution device and
        locked in the cache for the duration."""
        name = controlnet_name(kind, baseline)
        if name is None or not self._present(name):
            missing = ", ".join(self.missing(kind, baseline))
            raise ControlNotReadyError(f"ControlNet {kind.name} is not ready on this worker ({missing})")
        path = weight_file(self.files(name))
        # Keyed by file: records sharing one (scribble and fakescribbles) share one ControlNet in memory.
        key = f"controlnet:{path.name}@{model}" if self._format(path) == DIFF else f"controlnet:{path.name}"
        dtype = self._device.dtype

        def load() -> Any:
            return build_controlnet(path, unet, dtype)

        with self._cache.use(key, load, size_hint=estimated_bytes(path, dtype)) as net:
            yield net

    def _format(self, path: Path) -> str:
        if path not in self._formats:
            self._formats[path] = file_format(read_keys(path))
        return self._formats[path]


def can_control(record: ModelRecord) -> bool:
    """Models the horde may send ControlNet jobs for that this worker can run them on: SD1/SD2 txt2img
    models (the horde refuses inpainting with ControlNet; depth2img models have no ControlNet pipeline)."""
    style = (record.style or "").lower()
    return (record.baseline or "") in CONTROL_BASELINES and not record.inpainting and style not in (
        "inpainting", "depth2img"
    )
