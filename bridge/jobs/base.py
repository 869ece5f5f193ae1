"""The one interface every job kind implements.

The daemon knows nothing about generations or alchemy forms: it pops `Job`s from `JobSource`s, calls
`prepare` (network: source images) ahead of time, `execute` (compute) when a slot is free, and `send`
(upload + submit) in the background. Adding a job kind means adding a class here, not a branch in the loop.
"""

from __future__ import annotations

import abc
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.runtime import Runtime

TERMINAL_STATES = ("ok", "censored", "csam", "faulted")


@dataclass
class Submission:
    """What one horde id ends with. Exactly one per popped id."""

    job_id: str
    state: str = "ok"
    gen_metadata: list[dict[str, str]] = field(default_factory=list)
    seed: int | None = None
    image: bytes | None = None
    upload_url: str | None = None
    result: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.state not in TERMINAL_STATES:
            raise ValueError(f"state {self.state!r} is not one of {TERMINAL_STATES}")


@dataclass
class JobTimings:
    """Seconds spent per stage, filled in as the job moves through the loop."""

    popped_at: float = field(default_factory=time.monotonic)
    pop_wait: float = 0.0  # the pop request that brought this job
    source_download: float = 0.0
    queue_wait: float = 0.0
    model_load: float = 0.0
    inference: float = 0.0
    post_processing: float = 0.0
    safety: float = 0.0  # the safety pass over generated images (after the run slot is released)
    upload: float = 0.0
    submit: float = 0.0


class Job(abc.ABC):
    """One popped unit of work: a generation (one or more ids) or one alchemy form (one id)."""

    kind: ClassVar[str] = "job"

    def __init__(self) -> None:
        self.timings = JobTimings()

    @property
    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Every horde id this job must submit."""

    @property
    def model(self) -> str | None:
        """The model (or form) this job runs on, for stats and logs."""
        return None

    @property
    def ttl(self) -> float | None:
        """Seconds the horde gives us before it aborts the job."""
        return None

    def prepare(self, runtime: Runtime) -> None:  # noqa: B027 - optional hook
        """Network stage (runs ahead of execution): fetch source images. Must not raise for bad input;
        record the problem so that `execute` returns faulted submissions with gen_metadata."""

    @abc.abstractmethod
    def execute(self, runtime: Runtime) -> list[Submission]:
        """Compute stage. Returns exactly one Submission per id in `ids`. May raise: the loop turns an
        exception into `fault(...)`."""

    def execute_in_slot(self, runtime: Runtime, slot: AbstractContextManager[object]) -> list[Submission]:
        """The compute stage under one of the loop's run slots: `slot` is entered here. The default holds
        it for all of `execute`; a job whose last step needs no slot (the safety pass of a generation)
        leaves it first, so that the next job starts while that step runs."""
        with slot:
            return self.execute(runtime)

    @abc.abstractmethod
    def fault(self, reason: str) -> list[Submission]:
        """One faulted Submission per id (with gen_metadata explaining why, where the contract allows)."""

    @abc.abstractmethod
    def send(self, client: HordeClient, submission: Submission) -> float:
        """Upload the result (if any) and submit it. Returns the reward. Raises bridge.errors types."""

    def describe(self) -> str:
        return f"{self.kind} {self.model or ''} {','.join(i[:8] for i in self.ids)}".strip()


class JobSource(abc.ABC):
    """Pops jobs of one family (image generation, alchemy) for the loop."""

    name: ClassVar[str] = "source"

    @abc.abstractmethod
    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[Job]:
        """Ask the horde for up to `capacity` jobs this worker can run now. Empty list when idle."""

    def ready(self, runtime: Runtime) -> bool:
        """False while this source has nothing it could serve (no model ready yet)."""
        return True
