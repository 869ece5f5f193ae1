"""Offer only what the server accepts: the swagger document read at start and on reload, through real HTTP."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from bridge import horde_names
from bridge.accepted_names import AcceptedNamesCache, parse_swagger, refused_forms
from bridge.config import build_config
from bridge.daemon import Daemon, LoopTimings
from bridge.errors import WorkerStopError
from bridge.horde_api import HordeClient
from bridge.jobs.alchemy import AlchemySource
from bridge.journal import Journal
from bridge.retry import RetryPolicy
from bridge.runtime import Runtime
from bridge.sources import SourceFetcher
from local_horde import LocalHorde
from models.device import DevicePolicy
from tests.bridge.jobs.test_weightless import photo_like, webp_bytes

FORMS = ["palette", "describe"]


@pytest.fixture()
def horde():
    with LocalHorde() as server:
        yield server


def client_for(horde: LocalHorde) -> HordeClient:
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05)
    return HordeClient(horde.base_url, horde.api_key, client_agent="names-tests:0:none", retry=retry)


def runtime_for(horde: LocalHorde, forms: list[str]) -> Runtime:
    config = build_config(
        {"api_key": horde.api_key, "alchemist_name": "names-alchemist", "forms": forms}, environ={}
    ).config
    fetcher = SourceFetcher(timeout=5, allow_private=True)  # the local horde is on loopback
    return Runtime(config=config, device=DevicePolicy.cpu(), fetcher=fetcher)


def test_the_local_horde_publishes_the_servers_names(horde: LocalHorde) -> None:
    names = parse_swagger(client_for(horde).swagger())
    assert names.source == "swagger"
    assert names.forms == frozenset(horde_names.FORMS)
    assert names.post_processors == frozenset(horde_names.POST_PROCESSORS)


def test_a_document_without_the_enums_is_refused() -> None:
    with pytest.raises(ValueError, match="no definitions"):
        parse_swagger({"swagger": "2.0"})
    with pytest.raises(ValueError, match="no alchemy forms"):
        parse_swagger({"definitions": {"InterrogationPopInput": {"properties": {"name": {}}}}})


def test_refused_forms_reads_the_validation_error_index() -> None:
    error = WorkerStopError("Input payload validation failed", status=400,
                            errors={"forms.1": "'palette' is not one of [...]"})  # fmt: skip
    assert refused_forms(error, ["describe", "palette"]) == ["palette"]
    assert refused_forms(WorkerStopError("x", status=400, errors={"name": "bad"}), ["describe"]) is None
    assert refused_forms(WorkerStopError("x", status=403), ["describe"]) is None


def test_a_withdrawn_form_is_not_offered_and_the_pop_goes_on(horde: LocalHorde, caplog) -> None:
    client, runtime = client_for(horde), runtime_for(horde, FORMS)
    horde.set_alchemy_forms([f for f in horde_names.FORMS if f != "palette"])
    source = AlchemySource()
    rid = horde.request_interrogation(horde.host_image(webp_bytes(photo_like()), "p.webp"), ["describe"])
    with caplog.at_level(logging.WARNING):
        jobs = source.pop(client, runtime, 4)
        source.pop(client, runtime, 4)  # idle now: the line is not repeated
    assert [job.model for job in jobs] == ["describe"]
    assert caplog.text.count("does not list palette") == 1
    assert horde.worker_details("names-alchemist")["forms"] == ["describe"]
    assert horde.interrogation_status(rid)["forms"][0]["state"] == "processing"


def test_a_name_withdrawn_after_the_read_costs_one_pop_not_the_worker(horde: LocalHorde, caplog) -> None:
    client, runtime = client_for(horde), runtime_for(horde, FORMS)
    source = AlchemySource(accepted=AcceptedNamesCache(refresh_s=3600))
    assert source.pop(client, runtime, 2) == []  # reads the document: both names listed
    horde.set_alchemy_forms([f for f in horde_names.FORMS if f != "palette"])  # the server moves on
    with caplog.at_level(logging.WARNING):
        assert source.pop(client, runtime, 2) == []  # 400 over palette: dropped, not raised
    assert "refused the pop over form name(s) palette" in caplog.text
    rid = horde.request_interrogation(horde.host_image(webp_bytes(photo_like()), "d.webp"), ["describe"])
    jobs = source.pop(client, runtime, 2)  # re-read, palette no longer offered
    assert [job.model for job in jobs] == ["describe"]
    assert horde.interrogation_status(rid)["forms"][0]["state"] == "processing"


def test_an_unreadable_document_falls_back_to_the_workers_list(horde: LocalHorde, caplog) -> None:
    horde.faults.http_error("/api/swagger.json", 404, count=None)
    cache = AcceptedNamesCache(retry_s=0.0)
    with caplog.at_level(logging.WARNING):
        names = cache.current(client_for(horde))
    assert names.source == "built-in" and "could not read the horde's API description" in caplog.text


def test_unknown_config_form_and_withdrawn_form_through_the_daemon(horde: LocalHorde, tmp_path: Path) -> None:
    """The daemon serves: a config naming an unknown form ('annotation', which v5.1.5 does not accept) and a
    form withdrawn on the server while it runs. Nothing stops, the known forms are served."""
    loaded = build_config({"api_key": horde.api_key, "alchemist_name": "names-daemon",
                           "forms": ["annotation", "palette", "describe"]}, environ={})  # fmt: skip
    assert any("'annotation' dropped" in w for w in loaded.warnings)
    fetcher = SourceFetcher(timeout=5, allow_private=True)  # the local horde is on loopback
    runtime = Runtime(config=loaded.config, device=DevicePolicy.cpu(), fetcher=fetcher)
    timings = LoopTimings(idle_poll_s=0.05, error_poll_s=0.05)
    daemon = Daemon(client=client_for(horde), runtime=runtime, sources=[AlchemySource()],
                    journal=Journal(tmp_path / "j.json"), timings=timings)  # fmt: skip
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        first = horde.request_interrogation(horde.host_image(webp_bytes(photo_like()), "a.webp"), ["palette"])
        horde.wait_done([first], timeout=30)
        horde.set_alchemy_forms([f for f in horde_names.FORMS if f != "palette"])
        second = horde.request_interrogation(horde.host_image(webp_bytes(photo_like(seed=1)), "b.webp"),
                                             ["describe"])  # fmt: skip
        status = horde.wait_done([second], timeout=30)[second]
        time.sleep(0.2)
        assert thread.is_alive() and daemon.stop_reason is None
    finally:
        daemon.request_stop("test")
        thread.join(timeout=30)
    assert status["forms"][0]["state"] == "done"
    assert "annotation" not in horde.worker_details("names-daemon")["forms"]
