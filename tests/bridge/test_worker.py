"""Worker assembly: modes on a CPU-only machine, and leaving maintenance at start."""

from __future__ import annotations

from bridge.api_models import InterrogationPopRequest
from bridge.config import build_config
from bridge.horde_api import HordeClient
from bridge.local_horde import DEFAULT_API_KEY, LocalHorde
from bridge.worker import choose_modes, leave_maintenance


def test_cpu_only_machine_serves_alchemy_and_refuses_generation_unless_forced():
    config = build_config({}, environ={}).config
    dream, alchemy, notes = choose_modes(config, has_gpu=False)
    assert (dream, alchemy) == (False, True)
    assert notes == []
    asked = build_config({"dreamer": True}, environ={}).config
    dream, _, notes = choose_modes(asked, has_gpu=False)
    assert dream is False and "force_cpu_generation" in notes[0]
    forced = build_config({"dreamer": True, "force_cpu_generation": True}, environ={}).config
    assert choose_modes(forced, has_gpu=False)[0] is True
    assert choose_modes(config, has_gpu=True)[:2] == (True, False)


def test_remove_maintenance_on_init_clears_our_worker():
    with LocalHorde() as horde:
        client = HordeClient(horde.base_url, DEFAULT_API_KEY, client_agent="t:1:n")
        client.pop_interrogation(InterrogationPopRequest(name="maint-alchemist", forms=["caption"]))
        worker_id = horde.worker_details("maint-alchemist")["id"]
        client.set_maintenance(worker_id, True)
        assert horde.worker_details("maint-alchemist")["maintenance_mode"] is True
        leave_maintenance(client, client.find_user(), ["maint-alchemist"])
        assert horde.worker_details("maint-alchemist")["maintenance_mode"] is False
