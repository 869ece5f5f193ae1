"""Everything a job needs to run, built once at start and handed to jobs (no import-time globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.config import BridgeConfig
    from bridge.sources import SourceFetcher
    from models.device import DevicePolicy


@dataclass
class Runtime:
    config: BridgeConfig
    device: DevicePolicy
    fetcher: SourceFetcher
    # Each is None when this worker does not serve that family of jobs.
    models: Any = None  # models.manager.ModelManager
    postprocessors: Any = None  # postprocessors.registry.PostProcessorRegistry
    interrogators: Any = None  # interrogators.InterrogatorSet
    safety: Any = None  # interrogators.nsfw.NsfwChecker, used to censor generations
    loras: Any = None  # bridge.lora.service.LoraSupport: LoRAs and textual inversions (allow_lora)
