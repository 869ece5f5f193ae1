"""max_tiles from this machine's measured upscaling speed: an upscale form must finish within its TTL.

The horde offers an upscale form only to workers whose `max_tiles` (512x512 tiles of the source) covers it,
and aborts the form 180 s after the pop. How many tiles fit depends on the machine: a 2048² source upscaled
x4 takes about 1,000 s on a 2-core CPU and seconds on a GPU. So the seconds one tile takes are measured for
each upscaler this worker serves: once at start (`calibrate`: one small pass after the model is loaded) and
again after every upscale form it runs (a slower result counts at once, a faster one gradually). A form may
then use `SHARE` of its TTL, split among the forms that can be queued ahead of it on a run slot; the rest is
left for the source download, the upload and the submit. An upscaler that cannot finish even one tile in that
time is not offered at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

HORDE_TILE = 512
MAX_TILES = 256  # the horde's upper bound for max_tiles
SHARE = 0.8
CALIBRATION_SIDE = 256  # one CPU tile of the upscalers' tiled inference


class TileBudget:
    def __init__(self, *, ttl: float, queue_size: int = 1, max_threads: int = 1, fallback: int = 16) -> None:
        # A form popped now may wait for the forms queued ahead of it on the same run slots.
        ahead = queue_size / max(1, max_threads)
        self.seconds_per_form = ttl * SHARE / (1 + ahead)
        self.fallback = fallback
        self._rates: dict[str, float] = {}  # form -> seconds per 512x512 tile of source
        self._lock = threading.Lock()
        self._logged: tuple[int, tuple[str, ...]] | None = None

    def seconds_per_tile(self, form: str) -> float | None:
        with self._lock:
            return self._rates.get(form)

    def observe(self, form: str, source_pixels: int, seconds: float) -> None:
        """An upscale of a `source_pixels` source took `seconds`."""
        if source_pixels <= 0 or seconds <= 0:
            return
        rate = seconds / (source_pixels / (HORDE_TILE * HORDE_TILE))
        with self._lock:
            before = self._rates.get(form)
            # Slower: believe it at once (the next form must not time out). Faster: follow gradually.
            self._rates[form] = rate if before is None or rate > before else 0.7 * before + 0.3 * rate

    def fast_enough(self, form: str) -> bool:
        """Whether one tile of `form` finishes in a form's share of the TTL (unmeasured forms: yes)."""
        rate = self.seconds_per_tile(form)
        return rate is None or rate <= self.seconds_per_form

    def max_tiles(self, forms: Iterable[str]) -> int:
        """The max_tiles to pop with: what the slowest measured upscaler among `forms` finishes in time."""
        rates = [r for f in forms if (r := self.seconds_per_tile(f)) is not None]
        if not rates:
            return self.fallback
        tiles = max(1, min(MAX_TILES, int(self.seconds_per_form / max(rates))))
        key = (tiles, tuple(sorted(forms)))
        if key != self._logged:
            logger.info(
                "max_tiles %d: the slowest upscaler offered takes %.1f s a 512² tile, a form may take %.0f s",
                tiles, max(rates), self.seconds_per_form,
            )  # fmt: skip
            self._logged = key
        return tiles


def calibrate(budget: TileBudget, registry: Any, forms: Sequence[str]) -> None:
    """Time one small pass of each upscaler among `forms` whose weights are present (model loaded first, so
    the time is the upscaling alone), before the first pop."""
    available = set(registry.available())
    for form in forms:
        if form not in available:
            continue
        processor = registry.get(form)
        if getattr(processor, "scale", 1) <= 1:
            continue  # face fixers and strip_background: not counted in tiles by the horde
        try:
            processor.process(Image.new("RGB", (16, 16)))  # loads the model
            image = Image.effect_noise((CALIBRATION_SIDE, CALIBRATION_SIDE), 64).convert("RGB")
            started = time.perf_counter()
            processor.process(image)
            seconds = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - a failed calibration leaves the form unmeasured
            logger.warning("could not time %s at start: %s", form, exc)
            continue
        budget.observe(form, CALIBRATION_SIDE * CALIBRATION_SIDE, seconds)
        rate = budget.seconds_per_tile(form) or 0.0
        verdict = "" if budget.fast_enough(form) else ": too slow for a form's TTL, not offered"
        logger.info("%s: %.1f s per 512x512 tile on this machine%s", form, rate, verdict)
