"""The one retry policy of the horde client: exponential backoff with full jitter, Retry-After honoured.

Full jitter (a uniform delay in [0, min(cap, base * 2**n)]) spreads many workers that failed together
(a horde restart) instead of having them all come back in lockstep. Waiting goes through an Event so a
shutting-down daemon can cut a backoff short; tests inject `sleep` and `clock` so they never wait.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.errors import HordeError, Policy

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RetryPolicy:
    max_attempts: int = 5
    max_elapsed: float = 120.0
    base_delay: float = 1.0
    max_delay: float = 30.0
    # Retry-After values above this are clamped: a misconfigured proxy must not park the worker for hours.
    max_retry_after: float = 300.0
    cancel: threading.Event = field(default_factory=threading.Event)
    sleep: Callable[[float], None] | None = None
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 1)."""
        if retry_after is not None and retry_after >= 0:
            # The server said when: waiting less just earns another 429. A little jitter on top still
            # spreads the workers that were all told the same second.
            return min(retry_after, self.max_retry_after) + self.rng.uniform(0, self.base_delay)
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return self.rng.uniform(0, cap)

    def wait(self, seconds: float) -> bool:
        """Wait `seconds` unless cancelled. True when cancelled (now or during the wait)."""
        if self.cancel.is_set():
            return True
        if self.sleep is not None:
            self.sleep(seconds)
            return self.cancel.is_set()
        return self.cancel.wait(seconds)

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str = "request",
        deadline: float | None = None,
        until_deadline: bool = False,
    ) -> T:
        """Run `fn`; retry it while it raises a RETRY-policy HordeError and the budget lasts.

        The budget is `max_attempts` / `max_elapsed`; no retry starts after `deadline` (a `clock()` time, such
        as a job's ttl). With `until_deadline` the count does not matter, only the deadline: a finished result
        is worth retrying for as long as the horde still takes it. Raises the last error once the budget runs
        out, or at once when cancelled. Errors of any other policy pass straight through. The raised error
        carries the earlier attempts' errors (`earlier`): a DuplicateGen after a lost answer means the lost
        attempt was accepted.
        """
        start = self.clock()
        attempt = 0
        failed: list[HordeError] = []
        while True:
            attempt += 1
            try:
                return fn()
            except HordeError as exc:
                exc.earlier = tuple(failed)
                failed.append(exc)
                if exc.policy is not Policy.RETRY:
                    raise
                delay = self.delay(attempt, exc.retry_after)
                now = self.clock()
                out_of_budget = deadline is not None and now + delay >= deadline
                if not (until_deadline and deadline is not None):
                    out_of_budget |= attempt >= self.max_attempts or now - start + delay > self.max_elapsed
                if out_of_budget:
                    logger.warning("%s failed after %d attempt(s): %s", what, attempt, exc)
                    raise
                logger.info("%s failed (%s); retry %d in %.1f s", what, exc, attempt, delay)
                if self.wait(delay):
                    logger.info("%s: retry cancelled (shutting down)", what)
                    raise
