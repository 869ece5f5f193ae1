"""The worker's long-lived heap, kept out of the cyclic garbage collector's full passes.

A worker imports torch, diffusers, transformers and friends: about half a million objects that live as long
as the process. Python's full (oldest-generation) collection walks every one of them, about 0.3 s on a
volunteer's CPU, holding the GIL, whenever enough new objects have survived, so every job thread and the
loop stop for it in turn (measured in bench/forms.py: one such pause every hundred-odd short jobs).
`gc.freeze()` moves what is alive when the loop starts into the permanent generation, which no collection
walks; anything created later (jobs, models loaded on demand) is collected as before. The loop holds the
heap frozen while it runs (`long_lived_heap`), and the last loop to end thaws it, so a process that starts
several loops one after another (the tests) keeps nothing beyond the loop that froze it.

A frozen object is never collected: a model loaded before the loop and evicted later sits in reference
cycles (pipelines <-> hooks) that only the collector frees. So whoever drops a model collects with
`collect_everything`, which thaws the heap for that one full pass and freezes what survives again.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_loops = 0
_collected = False


@contextmanager
def long_lived_heap() -> Iterator[None]:
    """Freeze the heap for the block (nested and concurrent blocks share one freeze). The first freeze of the
    process collects first, so that the garbage of the start (imports, model loading) is not kept for good."""
    global _loops, _collected
    with _lock:
        if _loops == 0:
            if not _collected:
                gc.collect()
                _collected = True
            gc.freeze()
        _loops += 1
    try:
        yield
    finally:
        with _lock:
            _loops -= 1
            if _loops == 0:
                gc.unfreeze()


def collect_everything() -> None:
    """A full collection that reaches the frozen heap too (an evicted model, an out-of-memory job's
    leftovers): thaw, collect, freeze again what is still alive while a loop runs."""
    with _lock:
        if _loops:
            gc.unfreeze()
        gc.collect()
        if _loops:
            gc.freeze()
