"""Unsent results survive a restart: a worker stopped between finishing a job and submitting it sends the
result at its next start while the job's ttl lasts, and faults it back once the ttl is gone. (The real kill -9
of a worker process is tests/bridge/test_daemon.py::test_journal_recovery_after_kill_9.)"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from bridge.api_models import GenerationPopRequest
from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.horde_api import HordeClient
from bridge.jobs.base import Submission
from bridge.journal import GENERATION, Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from local_horde import DEFAULT_API_KEY, LocalHorde
from models.device import DevicePolicy

REPO = Path(__file__).resolve().parents[2]
FAST = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05)
REGEN = "AI Horde Worker reGen:10.0.0:https://github.com/Haidra-Org/horde-worker-reGen"


def webp(color: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, format="WEBP")
    return buffer.getvalue()


@pytest.fixture
def horde():
    with LocalHorde(known_models=("tiny-sd1",)) as local:
        yield local


def client_for(horde: LocalHorde) -> HordeClient:
    retry = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)
    return HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="t:1:n", retry=retry, timeout=2.0)


def restart(horde: LocalHorde, journal_path: Path, **config) -> None:
    """A fresh daemon on the same journal: its start handles the leftovers; then it is stopped."""
    settings = build_config({"alchemist_name": "resend-alchemist", "forms": ["nsfw"], **config}, environ={})
    runtime = Runtime(config=settings.config, device=DevicePolicy.cpu(), fetcher=SourceFetcher())
    daemon = Daemon(client=client_for(horde), runtime=runtime, sources=[], journal=Journal(journal_path),
                    timings=FAST)
    daemon.request_stop("test")  # no pops: only the start-up recovery runs
    daemon.run()


def popped_generation(horde: LocalHorde) -> tuple[str, str]:
    horde.request_generation({"steps": 2, "width": 64, "height": 64}, models=["tiny-sd1"])
    reply = client_for(horde).pop_generation(GenerationPopRequest(name="resend-dreamer", models=["tiny-sd1"],
                                                                  bridge_agent=REGEN))
    (job_id,) = reply.job_ids
    return job_id, reply.upload_url_for(job_id) or ""


def test_a_saved_result_is_sent_at_restart_within_its_ttl(horde: LocalHorde, tmp_path: Path) -> None:
    job_id, upload_url = popped_generation(horde)
    journal = Journal(tmp_path / "inflight.json")
    journal.add([job_id], GENERATION)
    image = webp()
    result = Submission(job_id=job_id, seed=5, image=image, upload_url=upload_url,
                        gen_metadata=[{"type": "batch_index", "value": "see_ref", "ref": "0"}])
    journal.keep_result(job_id, GENERATION, time.time() + 120, result.to_record())
    restart(horde, tmp_path / "inflight.json")
    (submit,) = horde.submits(job_id)
    assert submit["state"] == "ok" and submit["seed"] == 5 and job_id in horde.accounting().rewards
    (gen,) = horde.generation_status(horde.generations.jobs[job_id].request.id)["generations"]
    assert horde.download(gen["img"]) == image  # the very bytes the killed worker made
    assert Journal(tmp_path / "inflight.json").leftovers == {} and not list(journal.results_dir.iterdir())


def test_an_expired_result_is_faulted_back_not_sent(horde: LocalHorde, tmp_path: Path) -> None:
    job_id, _ = popped_generation(horde)
    journal = Journal(tmp_path / "inflight.json")
    journal.add([job_id], GENERATION)
    expired = Submission(job_id=job_id, image=webp()).to_record()
    journal.keep_result(job_id, GENERATION, time.time() - 1, expired)
    restart(horde, tmp_path / "inflight.json")
    assert [s["state"] for s in horde.submits(job_id)] == ["faulted"]
