"""The deadline check point: silent before the deadline, `Interrupted` with a readable reason after it."""

from __future__ import annotations

import itertools
import time

import pytest

from models.interrupt import NEVER, Interrupt, Interrupted


def ticking(start: float = 0.0):
    """A clock that advances by one at every reading: check point n reads n - 1."""
    return itertools.count(start).__next__


def test_no_deadline_never_stops_and_adds_no_step_callback() -> None:
    for _ in range(3):
        NEVER.check("anything")
    assert not NEVER.due()
    assert NEVER.step_callback("generation") is None


def test_the_check_point_at_the_deadline_raises_with_what_ran() -> None:
    interrupt = Interrupt(deadline=2, clock=ticking())
    interrupt.check("tile 1 of 4")
    interrupt.check("tile 2 of 4")
    with pytest.raises(Interrupted) as raised:
        interrupt.check("tile 3 of 4")
    assert raised.value.reason == "the job's ttl ran out during tile 3 of 4: stopped unfinished"
    assert str(raised.value) == raised.value.reason


def test_a_real_deadline_on_the_monotonic_clock() -> None:
    Interrupt(deadline=time.monotonic() + 60).check()
    with pytest.raises(Interrupted, match="^the job's ttl ran out while it ran"):
        Interrupt(deadline=time.monotonic() - 0.001).check()


def test_the_step_callback_passes_the_tensors_through_then_stops_the_pipeline() -> None:
    callback = Interrupt(deadline=1, clock=ticking(), what="the form's ttl").step_callback("image 1 of 2")
    assert callback is not None
    tensors = {"latents": object()}
    assert callback(None, 0, 999, tensors) is tensors  # diffusers reads the latents back from it
    with pytest.raises(Interrupted, match="the form's ttl ran out during image 1 of 2, after step 2"):
        callback(None, 1, 980, tensors)
