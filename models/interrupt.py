"""A running job's deadline, checked cooperatively wherever model work loops.

Once the horde's ttl for a job has passed, the horde has handed it to another worker: nothing this worker
computes for it counts, and every second more is a second the run slot (and the GPU) is kept from the next
job. An `Interrupt` carries that deadline into the code that loops: each denoising step of a diffusers
pipeline (`on_step_end`, passed as `callback_on_step_end`), each image of a batch, each hires-fix pass, each
post-processor, each upscaler tile and each face. `check()` raises `Interrupted` there; the context managers
the work runs in (model cache locks, the LoRA patcher, borrowed schedulers) unwind as for any exception, and
the loop faults the job with the reason.

Check points are only placed between units of work, never inside one that changes shared state (a LoRA
merge, a cache move), so an interrupted job leaves every shared model as a finished one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Interrupted(Exception):
    """A job was stopped at a check point; `reason` says why (for the log and the faulted submit)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interrupt:
    """Stops work at its check points once `deadline` (on `clock`, time.monotonic by default) has passed.

    `deadline` None never stops (tools, tests, calibration). `what` names the deadline in the reason.
    """

    def __init__(
        self, deadline: float | None = None, *, what: str = "the job's ttl",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.deadline = deadline
        self.what = what
        self._clock = clock

    def due(self) -> bool:
        return self.deadline is not None and self._clock() >= self.deadline

    def check(self, where: str = "") -> None:
        """Raise `Interrupted` when the deadline has passed; `where` says what was running (for the log)."""
        if self.due():
            during = f"during {where}" if where else "while it ran"
            raise Interrupted(f"{self.what} ran out {during}: stopped unfinished")

    def step_callback(self, where: str) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None:
        """A diffusers `callback_on_step_end` that checks after every denoising step (None without a
        deadline: nothing is added to the denoising loop).

        Raising from the callback, rather than setting the pipeline's `_interrupt` flag, stops at once: the
        flag only skips the remaining steps and then still decodes the latents through the VAE (and not every
        pipeline, depth2img for one, reads it)."""

        if self.deadline is None:
            return None

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.check(f"{where}, after step {step + 1}")
            return tensors

        return on_step_end


NEVER = Interrupt()  # no deadline: work runs to the end
