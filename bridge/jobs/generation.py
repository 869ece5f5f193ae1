"""Image generation jobs: `generate/pop` -> images -> one R2 upload + submit per id.

`GenerationSource.pop` asks for the models that are ready now with the worker's limits and flags.
`GenerationJob.prepare` fetches the source image and mask (failures become gen_metadata, never
exceptions), `execute` runs the numbered steps and returns one Submission per id, `send` uploads the
webp to the id's presigned R2 URL and submits `generation: "R2"` (base64 when there is no URL or the
upload was refused).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from bridge.api_models import GenerationPopRequest, GenerationPopResponse, GenerationSubmit
from bridge.config import dreamer_name, max_pixels
from bridge.errors import HordeError, Policy
from bridge.generation.censor import CensorUnavailable
from bridge.generation.masks import prepare_sources
from bridge.generation.request import RequestFault, WorkerLimits, build_request
from bridge.generation.runner import GenerationResult, run_generation
from bridge.generation.substitutions import Substitution, cap_metadata, information
from bridge.images import encode_webp, encode_webp_base64
from bridge.jobs.base import Job, JobSource, Submission
from bridge.sources import SourceImageError

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.lora.plan import JobExtras
    from bridge.runtime import Runtime

logger = logging.getLogger(__name__)

UPLOAD_QUALITY = 95  # the legacy worker's quality for R2 uploads
FAULTED_GENERATION = "faulted"


@dataclass
class FetchedSources:
    image: Image.Image | None = None
    mask: Image.Image | None = None
    metadata: list[dict[str, str]] | None = None


class GenerationJob(Job):
    kind = "generation"

    def __init__(self, pop: GenerationPopResponse) -> None:
        super().__init__()
        self.pop = pop
        self.fetched = FetchedSources(metadata=[])
        self.extras: JobExtras | None = None

    @property
    def ids(self) -> list[str]:
        return self.pop.job_ids

    @property
    def model(self) -> str | None:
        return self.pop.model

    @property
    def ttl(self) -> float | None:
        return self.pop.ttl

    def prepare(self, runtime: Runtime) -> None:
        started = time.monotonic()
        image = self._fetch(runtime, self.pop.source_image, "source_image")
        # A mask without its source means nothing: don't spend a download on it.
        mask = self._fetch(runtime, self.pop.source_mask, "source_mask") if image is not None else None
        self.fetched.image, self.fetched.mask = image, mask
        self.extras = self._prepare_extras(runtime)
        self.timings.source_download = time.monotonic() - started

    def _prepare_extras(self, runtime: Runtime) -> JobExtras | None:
        """LoRAs and TIs resolved and downloaded ahead of the run (bridge/lora); None when none are asked or
        this worker has no LoRA support (build_request then reports them as not applied)."""
        payload = self.pop.payload
        if not (payload.loras or payload.tis) or runtime.loras is None:
            return None
        record = self._record(runtime)
        if record is None:
            return None
        return runtime.loras.prepare(payload, record, ttl=self.pop.ttl)

    def _fetch(self, runtime: Runtime, source: str | None, kind: str) -> Image.Image | None:
        if not source:
            return None
        try:
            return runtime.fetcher.fetch(source)
        except SourceImageError as exc:
            # The public workers go on without it (txt2img / unmasked) and say so in gen_metadata.
            logger.warning("%s of %s unusable (%s): %s", kind, self.describe(), exc.kind, exc)
            self.fetched.metadata.append({"type": kind, "value": exc.kind, "ref": str(exc)[:255]})
            return None

    def execute(self, runtime: Runtime) -> list[Submission]:
        """1. model record, 2. sources, 3. request, 4. generate, 5. one submission per id."""
        record = self._record(runtime)
        if record is None:
            return self.fault(f"model {self.pop.model!r} is not served by this worker")
        sources, kind, source_subs = prepare_sources(
            self.fetched.image, self.fetched.mask, self.pop.source_processing
        )
        if self.pop.extra_source_images:
            count, why = len(self.pop.extra_source_images), "not supported: not used"
            source_subs.append(
                Substitution("extra_source_images", count, 0, why, meta_type="extra_source_images")
            )
        payload = self.pop.payload
        if self.extras is not None:  # triggers and TI markers are in the prompt; the LoRAs/TIs are handled
            payload = payload.model_copy(update={"prompt": self.extras.prompt, "loras": [], "tis": []})
        try:
            request, subs = build_request(
                payload,
                record,
                kind,
                WorkerLimits.from_config(runtime.config),
                n_images=len(self.ids),
            )
            result = run_generation(runtime, replace(request, extras=self.extras), sources)
        except (RequestFault, CensorUnavailable) as exc:
            logger.warning("faulting %s: %s", self.describe(), exc)
            return self.fault(str(exc))
        self.timings.model_load = result.model_load_s
        self.timings.inference = result.inference_s
        self.timings.post_processing = result.post_processing_s
        return self._submissions(result, [*source_subs, *subs, *result.notes])

    def _record(self, runtime: Runtime) -> Any:
        name = self.pop.model
        if not name or runtime.models is None or name not in runtime.models.ready_models():
            return None
        try:
            return runtime.models.record(name)
        except KeyError:
            return None

    def _submissions(self, result: GenerationResult, subs: list[Substitution]) -> list[Submission]:
        extras = self.extras.metadata if self.extras is not None else []
        shared = [*self.fetched.metadata, *extras, *(s.to_metadata() for s in subs)]
        batched = len(self.ids) > 1
        submissions = []
        for job_id, generated in zip(self.ids, result.images, strict=True):
            metadata = [*shared, *generated.metadata]
            if batched:
                metadata.append({"type": "batch_index", "value": "see_ref", "ref": str(generated.index)})
            submissions.append(
                Submission(
                    job_id=job_id,
                    state=generated.state,
                    gen_metadata=cap_metadata(metadata),
                    seed=generated.seed,
                    image=encode_webp(generated.image, quality=UPLOAD_QUALITY),
                    upload_url=self.pop.upload_url_for(job_id),
                )
            )
        return submissions

    def fault(self, reason: str) -> list[Submission]:
        seed = self.pop.payload.seed or 0
        metadata = cap_metadata([*self.fetched.metadata, information(reason)])
        return [
            Submission(job_id=i, state="faulted", gen_metadata=list(metadata), seed=seed) for i in self.ids
        ]

    def send(self, client: HordeClient, submission: Submission) -> float:
        generation = FAULTED_GENERATION
        if submission.state != "faulted" and submission.image is not None:
            generation = self._upload(client, submission)
        body = GenerationSubmit(
            id=submission.job_id,
            generation=generation,
            state=submission.state,
            seed=submission.seed if submission.seed is not None else 0,
            gen_metadata=submission.gen_metadata,
        )
        started = time.monotonic()
        reward = client.submit_generation(body)
        self.timings.submit += time.monotonic() - started
        return reward

    def _upload(self, client: HordeClient, submission: Submission) -> str:
        """PUT to R2 and return "R2"; base64 of the image when there is no URL or R2 refused it."""
        if submission.upload_url:
            started = time.monotonic()
            try:
                client.upload(submission.upload_url, submission.image)
                return "R2"
            except HordeError as exc:
                if exc.policy is not Policy.FAULT:
                    raise
                logger.warning("R2 upload for %s refused (%s): submitting base64", submission.job_id[:8], exc)
            finally:
                self.timings.upload += time.monotonic() - started
        with Image.open(io.BytesIO(submission.image)) as image:
            return encode_webp_base64(image, quality=UPLOAD_QUALITY)


class GenerationSource(JobSource):
    name = "generation"

    def ready(self, runtime: Runtime) -> bool:
        return runtime.models is not None and bool(runtime.models.ready_models())

    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[Job]:
        if capacity < 1 or not self.ready(runtime):
            return []
        allow_lora = runtime.loras is not None and runtime.loras.available()
        reply = client.pop_generation(pop_request(runtime.config, runtime.models.ready_models(), allow_lora))
        for message in reply.messages:
            logger.info("message from the horde (%s): %s", message.origin or "horde", message.message)
        if reply.is_idle:
            if reply.skipped:
                logger.debug("no job; skipped: %s", reply.skipped)
            return []
        return [GenerationJob(reply)]


def pop_request(config: Any, models: list[str], allow_lora: bool = False) -> GenerationPopRequest:
    """The generate/pop body from the worker's config (legacy key names) and its ready models; `allow_lora`
    only when LoRA support works here now (bridge.lora.service.LoraSupport.available)."""
    return GenerationPopRequest(
        name=dreamer_name(config),
        models=models,
        priority_usernames=list(config.priority_usernames),
        nsfw=config.nsfw,
        blacklist=list(config.blacklist),
        bridge_agent=config.bridge_agent,
        threads=config.max_threads,
        require_upfront_kudos=config.require_upfront_kudos,
        amount=config.max_batch,
        extra_slow_worker=config.extra_slow_worker,
        max_pixels=max_pixels(config),
        allow_img2img=config.allow_img2img,
        allow_painting=config.allow_painting,
        allow_unsafe_ipaddr=config.allow_unsafe_ip,
        allow_post_processing=config.allow_post_processing,
        # Neither is implemented: advertising them would only earn faulted jobs.
        allow_controlnet=False,
        allow_sdxl_controlnet=False,
        allow_lora=allow_lora,
        limit_max_steps=config.limit_max_steps,
    )
