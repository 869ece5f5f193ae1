"""Everything a job needs to run, built once at start and handed to jobs (no import-time globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.admission import Admission
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
    safety: Any = None  # interrogators.safety.SafetyPass: checks every generated image (CSAM/NSFW, aesthetic)
    sd_safety_checker: Any = None  # interrogators.nsfw.NsfwChecker, the optional second opinion
    controlnets: Any = None  # controlnet.ControlNets: None unless allow_controlnet
    cache: Any = None  # models.cache.ModelCache of every family: its budgets say what runs side by side
    # What this machine can hold (models, max_pixels, forms); None: no admission control (tests, tools).
    admission: Admission | None = None
    loras: Any = None  # bridge.lora.service.LoraSupport: LoRAs and textual inversions (allow_lora)
