"""The AI Horde's model reference: fetched, cached on disk, merged with local custom models, queried.

One record and its parsing live in models/records.py.
Meta entries of the legacy AI-Horde-Worker and of horde-worker-reGen (`TOP n`, `ALL SFW`, ...) resolve here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from models.records import (
    BASELINE_SD15,
    BASELINE_SD21,
    BASELINE_SDXL,
    GENERATION_CATEGORIES,
    REFERENCE_FILES,
    ModelRecord,
    category_for_file,
    is_servable,
    parse_reference,
)

logger = logging.getLogger(__name__)

DEFAULT_UPSTREAM = "https://raw.githubusercontent.com/Haidra-Org/AI-Horde-image-model-reference/main"
# The upstream files as of commit 46fdd9e (June 2026): used when neither upstream nor a cached copy is
# available, so a first start offline still knows the horde's model names.
SNAPSHOT_DIR = Path(__file__).with_name("reference_snapshot")
SNAPSHOT_DATE = "June 2026"

def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _short(exc: Exception) -> str:
    """The first line of an exception, without urllib3's nested retry text."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."


def _local_source(upstream: str | None) -> str | None:
    """`upstream` when it names files on this machine (a folder, `file://`, or a path pattern)."""
    if upstream is None or re.match(r"^https?://", upstream, re.IGNORECASE):
        return None
    return upstream.removeprefix("file://")


def _local_file(source: str, file: str) -> Path:
    if "{file}" in source:
        return Path(source.format(file=file)).expanduser()
    return Path(source).expanduser() / f"{file}.json"


def _upstream_url(upstream: str, file: str) -> str:
    if "{file}" in upstream:
        return upstream.format(file=file)
    return f"{upstream.rstrip('/')}/{file}.json"


@dataclass
class ResolvedModels:
    """The outcome of resolving `models_to_load`: real names in load order, plus what went wrong."""

    names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


_TOP_RE = re.compile(r"^(top|bottom)\s+(\d+)$", re.IGNORECASE)
# "ALL", "ALL MODELS", "ALL SFW", "ALL ANIME MODELS", ...: the selector is what sits between.
_ALL_RE = re.compile(r"^all(?:\s+(?P<selector>.*?))?\s*$", re.IGNORECASE)
_MODELS_SUFFIX_RE = re.compile(r"(?:^|\s+)models?$", re.IGNORECASE)


class ModelReference:
    """All records of all reference files, keyed by canonical name."""

    def __init__(self, records: Mapping[str, ModelRecord]) -> None:
        self._records: dict[str, ModelRecord] = dict(records)
        self._by_lower: dict[str, str] = {name.lower(): name for name in self._records}
        self._passed_over: dict[str, ModelRecord] = {}

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        *,
        cache_dir: Path,
        upstream: str | None = DEFAULT_UPSTREAM,
        extra_files: Sequence[Path] = (),
        session: requests.Session | None = None,
        timeout: float = 10.0,
    ) -> ModelReference:
        """Fetch each reference file (cached atomically), fall back to the cache when offline, then let
        the operator's local files add or override models. `upstream=None` reads the cache only."""
        cache_dir = Path(cache_dir)
        records: dict[str, ModelRecord] = {}
        http = session if session is not None else (requests.Session() if upstream is not None else None)
        try:
            for file, data in cls._fetch_all(cache_dir, upstream, http, timeout):
                records.update(parse_reference(data, category=file, source=f"{file}.json"))
        finally:
            if session is None and http is not None:
                http.close()
        for path in extra_files:
            records.update(cls._read_local(Path(path), known=records))
        logger.info(
            "model reference: %d records (%d generation models)",
            len(records),
            sum(r.category in GENERATION_CATEGORIES for r in records.values()),
        )
        return cls(records)

    @classmethod
    def _fetch_all(
        cls, cache_dir: Path, upstream: str | None, http: requests.Session | None, timeout: float
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each file from upstream (a URL, or a local folder / URL pattern of `model_reference`), else the
        cached copy, else the shipped snapshot. An unreachable source costs one log line, not one per file."""
        unreachable: Exception | None = None
        fallbacks: dict[str, list[str]] = {}
        local = _local_source(upstream)
        for file in REFERENCE_FILES:
            cached = cache_dir / f"{file}.json"
            failure: Exception | None = unreachable
            if local is not None:
                data = cls._read_cache(_local_file(local, file))
                if data is not None:
                    yield file, data
                    continue
                unreachable = failure = FileNotFoundError(f"no {file}.json in {local}")
            elif upstream is not None and http is not None and unreachable is None:
                try:
                    yield file, cls._fetch(http, _upstream_url(upstream, file), cached, timeout)
                    continue
                except (requests.ConnectionError, requests.Timeout) as exc:
                    # Offline: don't wait out one timeout per file.
                    unreachable = failure = exc
                except (requests.RequestException, ValueError) as exc:
                    failure = exc
            data = cls._read_cache(cached)
            if data is None:
                data = cls._read_cache(SNAPSHOT_DIR / f"{file}.json")
                used = f"the worker's shipped snapshot ({SNAPSHOT_DATE})" if data is not None else "nothing"
            else:
                age_h = (time.time() - cached.stat().st_mtime) / 3600
                used = f"the cached copy ({age_h:.1f} h old)"
            if failure is not None and failure is unreachable:
                fallbacks.setdefault(used, []).append(f"{file}.json")
            elif failure is not None:
                logger.warning("model reference %s.json: upstream reply unusable (%s); using %s",
                               file, _short(failure), used)
            if data is not None:
                yield file, data
        if fallbacks and unreachable is not None:
            where = local if local is not None else upstream
            parts = "; ".join(f"{used} for {', '.join(files)}" for used, files in fallbacks.items())
            logger.warning("model reference: %s unreachable (%s); using %s", where, _short(unreachable),
                           parts)

    @staticmethod
    def _fetch(http: requests.Session, url: str, cached: Path, timeout: float) -> dict[str, Any]:
        response = http.get(url, timeout=timeout)
        response.raise_for_status()
        data = response.json()
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        _atomic_write_text(cached, response.text)
        return data

    @staticmethod
    def _read_cache(cached: Path) -> dict[str, Any] | None:
        """A cached (or shipped) copy of a reference file, None when absent or unreadable."""
        if not cached.exists():
            return None
        try:
            data = json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("model reference cache %s is unreadable (%s); ignored", cached, exc)
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _read_local(path: Path, *, known: Mapping[str, ModelRecord]) -> dict[str, ModelRecord]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.error("custom model reference %s is unreadable (%s); ignored", path, exc)
            return {}
        if not isinstance(data, dict):
            logger.error("custom model reference %s is not a JSON object; ignored", path)
            return {}
        base_dir = path.resolve().parent
        parsed = parse_reference(data, category=category_for_file(path), base_dir=base_dir, source=str(path))
        for name in parsed:
            verb = "overrides" if name in known else "adds"
            logger.info("custom model reference %s %s model %r", path, verb, name)
        return parsed

    # ---- queries -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) is not None

    def records(self, category: str | None = None) -> list[ModelRecord]:
        return [r for r in self._records.values() if category is None or r.category == category]

    def generation_models(self) -> list[ModelRecord]:
        """Records a worker can advertise in `generate/pop` (checkpoints and diffusers)."""
        return [r for r in self._records.values() if r.category in GENERATION_CATEGORIES]

    def servable_models(self) -> list[ModelRecord]:
        """Generation models of the baselines this worker runs."""
        return [r for r in self._records.values() if is_servable(r)]

    def canonical(self, name: str) -> str | None:
        """The canonical spelling of `name` (exact first, then case-insensitive), or None."""
        if name in self._records:
            return name
        return self._by_lower.get(name.strip().lower())

    def get(self, name: str) -> ModelRecord:
        canonical = self.canonical(name)
        if canonical is None:
            raise KeyError(name)
        return self._records[canonical]

    def names(self, category: str | None = None) -> list[str]:
        return [r.name for r in self.records(category)]

    @staticmethod
    def is_depth(record: ModelRecord) -> bool:
        return (record.style or "").lower() == "depth2img"

    @staticmethod
    def is_inpainting(record: ModelRecord) -> bool:
        # The 2023 diffusers entry marks inpainting by style only.
        return record.inpainting or (record.style or "").lower() == "inpainting"

    # ---- meta entries --------------------------------------------------------------------------------
    def resolve(
        self,
        models_to_load: Sequence[str],
        models_to_skip: Sequence[str],
        *,
        model_stats: Callable[[], dict] | None = None,
        max_models: int | None = None,
    ) -> ResolvedModels:
        """Expand meta entries and names into canonical generation model names, minus the skip list."""
        warnings: list[str] = []
        stats_cache: list[dict] = []
        self._passed_over: dict[str, ModelRecord] = {}

        def stats() -> dict | None:
            if not stats_cache:
                if model_stats is None:
                    return None
                try:
                    stats_cache.append(model_stats() or {})
                except Exception as exc:  # a stats outage must not stop the worker from starting
                    warnings.append(f"model stats unavailable ({exc}); TOP/BOTTOM entries resolve to nothing")
                    stats_cache.append({})
            return stats_cache[0]

        wanted = self._expand_all(models_to_load, stats, warnings, "models_to_load")
        passed_over = dict(self._passed_over)
        skipped = set(self._expand_all(models_to_skip, stats, warnings, "models_to_skip"))
        skipped |= {c for c in (self.canonical(str(e)) for e in models_to_skip) if c is not None}
        names = [n for n in dict.fromkeys(wanted) if n not in skipped]
        passed = [r for name, r in passed_over.items() if name not in skipped]
        if passed:
            by_baseline: dict[str, list[str]] = {}
            for record in passed:
                by_baseline.setdefault(str(record.baseline), []).append(record.name)
            listed = "; ".join(f"{b}: {', '.join(sorted(n))}" for b, n in sorted(by_baseline.items()))
            count = len(passed)
            warnings.append(f"passed over {count} model(s) of baselines this worker cannot run ({listed})")
        if max_models is not None and len(names) > max_models:
            warnings.append(f"{len(names)} models resolved; keeping the first {max_models} (max_models)")
            names = names[:max_models]
        for message in warnings:
            logger.warning("models: %s", message)
        return ResolvedModels(names=names, warnings=warnings)

    def _expand_all(
        self, entries: Iterable[str], stats: Callable[[], dict | None], warnings: list[str], where: str
    ) -> list[str]:
        out: list[str] = []
        for entry in entries:
            expanded = self._expand(str(entry).strip(), stats, warnings, where)
            if expanded is None:
                warnings.append(f"{where}: unknown model or meta entry {entry!r}")
            else:
                out.extend(expanded)
        return out

    def _expand(
        self, entry: str, stats: Callable[[], dict | None], warnings: list[str], where: str
    ) -> list[str] | None:
        """Names for one entry, or None when it is neither a known model nor a meta entry."""
        canonical = self.canonical(entry)
        if canonical is not None:
            if self._records[canonical].category not in GENERATION_CATEGORIES:
                warnings.append(
                    f"{where}: {entry!r} is a {self._records[canonical].category} model, "
                    "not a generation model"
                )
                return []
            if not is_servable(self._records[canonical]):
                self._passed_over[canonical] = self._records[canonical]
                return []
            return [canonical]
        generation = self.generation_models()
        top = _TOP_RE.match(entry)
        if top:
            month = self._monthly_counts(stats(), warnings, entry)
            ranked = self._ranked(generation, month, len(generation), top=top.group(1).lower() == "top")
            return self._first_servable(ranked, int(top.group(2)))
        meta = _ALL_RE.match(entry)
        if meta is None:
            return None
        selector = _MODELS_SUFFIX_RE.sub("", (meta.group("selector") or "").strip()).strip().lower()
        predicate = self._selector(selector)
        if predicate is None:
            return None
        return self._first_servable([r.name for r in generation if predicate(r)], len(generation))

    def _first_servable(self, names: list[str], n: int) -> list[str]:
        """The first `n` servable names; the others met on the way are noted (said once by resolve)."""
        chosen: list[str] = []
        for name in names:
            if len(chosen) >= n:
                break
            if is_servable(self._records[name]):
                chosen.append(name)
            else:
                self._passed_over[name] = self._records[name]
        return chosen

    def _selector(self, selector: str) -> Callable[[ModelRecord], bool] | None:
        fixed: dict[str, Callable[[ModelRecord], bool]] = {
            "": lambda r: True,
            "sfw": lambda r: not r.nsfw,
            "nsfw": lambda r: r.nsfw,
            "sd15": lambda r: r.baseline == BASELINE_SD15,
            "sd21": lambda r: r.baseline == BASELINE_SD21,
            "sdxl": lambda r: r.baseline == BASELINE_SDXL,
            "inpainting": self.is_inpainting,
        }
        if selector in fixed:
            return fixed[selector]
        styles = {(r.style or "").lower() for r in self.generation_models()}
        if selector in styles:
            return lambda r: (r.style or "").lower() == selector
        return None

    def _monthly_counts(self, stats: dict | None, warnings: list[str], entry: str) -> dict[str, int]:
        if stats is None:
            warnings.append(f"{entry!r} needs the horde's model stats, which are not available")
            return {}
        period = stats.get("month") or stats.get("total") or {}
        counts: dict[str, int] = {}
        for name, count in period.items():
            canonical = self.canonical(str(name))
            if canonical is not None:
                try:
                    counts[canonical] = counts.get(canonical, 0) + int(count)
                except (TypeError, ValueError):
                    continue
        return counts

    @staticmethod
    def _ranked(records: list[ModelRecord], counts: Mapping[str, int], n: int, *, top: bool) -> list[str]:
        if not counts:
            return []
        # Unused models count 0 so BOTTOM n can name them; ties break by name for a stable result.
        ranked = sorted(
            records, key=lambda r: (-counts.get(r.name, 0) if top else counts.get(r.name, 0), r.name)
        )
        return [r.name for r in ranked[:n]]


def dynamic_models(
    queue_stats: Iterable[Mapping[str, Any]],
    current: Iterable[str],
    n: int,
    *,
    known: Iterable[str] | None = None,
) -> list[str]:
    """The `n` most-queued models of a `/api/v2/status/models` reply that are not already in `current`
    (and, when `known` is given, that the reference knows). Ties break on jobs, then name."""
    if n <= 0:
        return []
    have = {name.lower() for name in current}
    allowed = {name.lower() for name in known} if known is not None else None
    candidates: list[tuple[float, float, str]] = []
    for entry in queue_stats:
        name = entry.get("name")
        if not isinstance(name, str) or name.lower() in have:
            continue
        if allowed is not None and name.lower() not in allowed:
            continue
        queued = _as_float(entry.get("queued"))
        if queued <= 0:
            continue
        candidates.append((-queued, -_as_float(entry.get("jobs")), name))
    return [name for _, _, name in sorted(candidates)[:n]]


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
