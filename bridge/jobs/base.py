"""The one interface every job kind implements.

The daemon knows nothing about generations or alchemy forms: it pops `Job`s from `JobSource`s, calls
`prepare` (network: source images) ahead of time, `execute` (compute) when a slot is free, and `send`
(upload + submit) in the background. Adding a job kind means adding a class here, not a branch in the loop.
Each job and source names its `family` (bridge/families.py): the loop shares its run slots and queue places
between families by that key alone, and places each job on a device lane by its `placement`.
"""

from __future__ import annotations

import abc
import base64
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bridge.safe_text import server_text
from models.interrupt import Interrupt

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

    def to_record(self) -> dict[str, Any]:
        """JSON-safe form, for the journal: a result not yet sent survives a restart."""
        record: dict[str, Any] = {k: getattr(self, k) for k in ("job_id", "state", "gen_metadata", "seed",
                                                                "upload_url", "result")}
        record["image"] = base64.b64encode(self.image).decode("ascii") if self.image is not None else None
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Submission:
        image = record.get("image")
        return cls(
            job_id=str(record["job_id"]),
            state=str(record.get("state", "ok")),
            gen_metadata=list(record.get("gen_metadata") or []),
            seed=record.get("seed"),
            image=base64.b64decode(image) if isinstance(image, str) else None,
            upload_url=record.get("upload_url"),
            result=record.get("result"),
        )


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
    # What the job used beyond a plain run ("controlnet:canny", "image_is_control"...), counted in the stats.
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where a job computes and the memory its models hold there while it runs.

    `device` None means the worker's execution device (the device policy's); "cpu" a job that computes on
    the CPU whatever the machine. `bytes` 0 means unknown: such a job never runs beside another on shared
    memory.
    """

    device: str | None = None
    bytes: int = 0


ON_CPU = Placement(device="cpu")  # no model to run: e.g. a job that only faults


def bytes_on_disk(paths: Iterable[Path]) -> int:
    """Bytes of the files (and of every file under the folders) given: a model's weights, as stored."""
    total = 0
    for path in paths:
        try:
            if path.is_dir():
                total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            elif path.is_file():
                total += path.stat().st_size
        except OSError:  # a file vanishing under us only makes the estimate smaller
            continue
    return total


class Job(abc.ABC):
    """One popped unit of work: a generation (one or more ids) or one alchemy form (one id)."""

    kind: ClassVar[str] = "job"
    family: ClassVar[str] = "job"  # the source's family (bridge/families.py): an opaque key to the loop

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

    def placement(self, runtime: Runtime) -> Placement:
        """Where `execute` will compute (asked after `prepare`). Default: the worker's device, size
        unknown."""
        return Placement()

    @property
    def deadline(self) -> float | None:
        """When (time.monotonic) the horde aborts this job: past it, nothing we submit counts."""
        ttl = self.ttl
        return self.timings.popped_at + ttl if ttl else None

    def expired(self) -> bool:
        deadline = self.deadline
        return deadline is not None and time.monotonic() >= deadline

    def interrupt(self) -> Interrupt:
        """The deadline its runners check between steps, images, passes, post-processors and tiles
        (models.interrupt): past it the horde has handed the job to another worker, so `execute` raises
        `Interrupted` at the next check point and the loop faults it, its run slot free at once."""
        return Interrupt(self.deadline)

    @property
    def rejected(self) -> bool:
        """True when the job is handed back for what was sent (an unreadable payload, a form this worker
        does not serve, more jobs than asked for, a source that cannot be fetched): not a failure of this
        worker, so it must not count towards pausing it."""
        return False

    def settled(self) -> list[Submission] | None:
        """Its submissions when they are known without running it (a rejected job), else None. The loop asks
        after `prepare` and then needs no run slot for it."""
        return None

    def prepare(self, runtime: Runtime) -> None:  # noqa: B027 - optional hook
        """Network stage (runs ahead of execution): fetch source images. Must not raise for bad input;
        record the problem so that `execute` returns faulted submissions with gen_metadata."""

    @abc.abstractmethod
    def execute(self, runtime: Runtime) -> list[Submission]:
        """Compute stage. Returns exactly one Submission per id in `ids`. May raise: the loop turns an
        exception into `fault(...)` (`Interrupted` from `interrupt()`'s check points among them)."""

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
        # Model names and ids come from the horde: one clean line (this reaches logs and the status panel).
        return server_text(f"{self.kind} {self.model or ''} {','.join(i[:8] for i in self.ids)}", limit=160)


class JobSource(abc.ABC):
    """Pops jobs of one family (image generation, alchemy) for the loop."""

    name: ClassVar[str] = "source"
    family: ClassVar[str] = "job"  # the family of the jobs it pops (bridge/families.py): as Job.family

    @abc.abstractmethod
    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[Job]:
        """Ask the horde for up to `capacity` jobs this worker can run now. Empty list when idle."""

    def ready(self, runtime: Runtime) -> bool:
        """False while this source has nothing it could serve (no model ready yet)."""
        return True
