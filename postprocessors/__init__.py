"""The horde's post-processors behind one interface.

    registry = PostProcessorRegistry(weights_dir=cache_home, cache=model_cache, device=device_policy)
    result = registry.apply(image, payload["post_processing"], strength=payload.get("facefixer_strength"))
    result.image, result.metadata     # PIL image; gen_metadata entries to submit with it

Order of application (as the legacy AI-Horde-Worker and horde-worker-reGen apply a job's list), whatever the
order of the request:
  1. upscalers: RealESRGAN_x4plus, RealESRGAN_x2plus, RealESRGAN_x4plus_anime_6B, NMKD_Siax, 4x_AnimeSharp,
     4xNomos8kSC, 4xLSDIRplus, 4xNomosWebPhoto_RealPLKSR, 4xNomos2_realplksr_dysample, 4xNomos2_hq_dat2,
     2xModernSpanimationV1 (in request order among themselves; output exactly x2 / x4, alpha resized too);
  2. face fixers: GFPGAN, CodeFormers, GFPGANv1.3, RestoreFormer (on the upscaled image; no face -> unchanged
     + an information entry);
  3. strip_background, last: its transparency would not survive the other steps (RGBA out).
Each name runs once. Unknown names raise KeyError; an image a processor cannot take (corrupt, beyond
MAX_INPUT_PIXELS, or an upscale beyond MAX_OUTPUT_PIXELS) raises PostProcessError, as do missing or damaged
weights: the job layer turns that into a faulted submit.

Weights load through the shared models.cache.ModelCache; `postprocessors.tiny.build_tiny_postprocessors`
writes architecture-true random-weight files for tests, benchmarks and the offline demo.
"""

from postprocessors.base import (
    MAX_INPUT_PIXELS,
    MAX_OUTPUT_PIXELS,
    PostProcessError,
    PostProcessor,
    PostProcessResult,
)
from postprocessors.registry import ORDER, PostProcessorRegistry, ordered

__all__ = [
    "MAX_INPUT_PIXELS",
    "MAX_OUTPUT_PIXELS",
    "ORDER",
    "PostProcessError",
    "PostProcessResult",
    "PostProcessor",
    "PostProcessorRegistry",
    "ordered",
]
