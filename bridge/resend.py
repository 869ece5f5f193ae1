"""Results a stopped worker had finished but not submitted: sent at the next start while their ttl lasts.

The daemon keeps each finished result in the journal until its submit is done (`Journal.keep_result`). After a
crash, a result whose job the horde still waits for is worth sending: the requester gets it now instead of
after another worker redoes it. One that expired, or cannot be sent, is faulted back like any other leftover.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.errors import HordeError, Policy
from bridge.jobs.base import Submission
from bridge.journal import GENERATION, Journal

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.stats import Stats

log = logging.getLogger(__name__)

Fault = Callable[[str, str, str], object]  # (job id, family, reason): hands an id back to the horde


def _send(client: HordeClient, family: str, submission: Submission, deadline: float) -> float:
    # Imported here: the job modules pull in the generation stack, which a restart may not need.
    if family == GENERATION:
        from bridge.jobs.generation import send_generation

        return send_generation(client, submission, deadline=deadline)
    from bridge.jobs.alchemy import send_alchemy

    return send_alchemy(client, submission, deadline=deadline)


def resend_saved(client: HordeClient, journal: Journal, stats: Stats, fault: Fault) -> int:
    """Send every saved result of an id the journal holds (and nobody claimed) while its ttl lasts; fault
    back those that cannot be sent. Each id ends in one submit or a logged drop. Returns how many were
    sent."""
    sent = 0
    for job_id, record in journal.saved_results().items():
        if not journal.claim(job_id):
            journal.forget_result(job_id)  # no journal entry: its submit already happened
            continue
        family = str(record.get("family", GENERATION))
        remaining = float(record.get("expires_at", 0.0)) - time.time()
        try:
            if remaining <= 1.0:
                raise LookupError("its ttl ran out while the worker was down")
            submission = Submission.from_record(record["submission"])
            reward = _send(client, family, submission, time.monotonic() + remaining)
            stats.submitted(family, submission.state, reward)
            log.info("sent the result of %s kept from before the restart: %s, %.2f kudos",
                     job_id[:8], submission.state, reward)
            sent += 1
        except HordeError as err:
            if err.policy is Policy.FAULT:
                _fault_back(fault, job_id, family, f"its saved result was refused: {err}")
            else:
                stats.dropped(family)
                log.warning("dropped the saved result of %s: %s", job_id[:8], err)
        except Exception as err:  # an unreadable record, an expired one: hand the id back
            _fault_back(fault, job_id, family, f"its saved result could not be sent: {err}")
        journal.finish(job_id)
    return sent


def _fault_back(fault: Fault, job_id: str, family: str, reason: str) -> None:
    log.warning("faulting %s back to the horde: %s", job_id[:8], reason)
    try:
        fault(job_id, family, reason[:250])
    except HordeError as err:
        log.warning("could not fault %s back (%s): the horde will requeue it after its ttl", job_id[:8], err)
