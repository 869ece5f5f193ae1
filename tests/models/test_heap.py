"""The long-lived heap: frozen while a loop runs, shared by loops that overlap, thawed by the last."""

from __future__ import annotations

import gc
import weakref

from models.heap import collect_everything, long_lived_heap


def test_what_is_alive_when_the_loop_starts_is_frozen_until_the_last_loop_ends():
    # Not 0 everywhere: CPython 3.12.1 starts with a few hundred of its own objects frozen.
    before = gc.get_freeze_count()
    old = ["made before the loop"]
    with long_lived_heap():
        frozen = gc.get_freeze_count()
        assert frozen > before + 1000  # at least the modules imported to get here
        young = ["made while the loop runs"]
        with long_lived_heap():  # a second loop at the same time: no second freeze
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen  # the first loop still runs
        collected = gc.get_objects()  # what the collector's generations hold: not the frozen objects
        assert any(o is young for o in collected) and not any(o is old for o in collected)
    assert gc.get_freeze_count() <= before  # thawed by the last loop
    assert any(o is old for o in gc.get_objects())


def test_the_heap_is_thawed_even_when_the_loop_raises():
    try:
        with long_lived_heap():
            raise RuntimeError("the loop died")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0  # thawed: unfreeze empties the permanent generation


class _Model:
    """Stands for a loaded pipeline: it sits in a reference cycle (pipelines <-> hooks)."""

    def __init__(self) -> None:
        self.hook = {"owner": self}


def test_a_model_loaded_before_the_loop_and_dropped_during_it_is_still_collected():
    model = _Model()
    alive = weakref.ref(model)
    with long_lived_heap():
        frozen = gc.get_freeze_count()
        del model  # evicted from the cache
        gc.collect()
        assert alive() is not None  # frozen: a plain collection never reaches it
        collect_everything()
        assert alive() is None
        assert 0 < gc.get_freeze_count() <= frozen  # what still lives is frozen again
    assert gc.get_freeze_count() == 0
