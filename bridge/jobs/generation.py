"""Image generation jobs: `generate/pop` -> images -> one R2 upload + submit per id.

`GenerationSource.pop` asks for the models that are ready now with the worker's limits and flags.
`GenerationJob.prepare` fetches the source image and mask (failures become gen_metadata, never
exceptions), `execute` runs the numbered steps and returns one Submission per id, `send` uploads the
webp to the id's presigned R2 URL and submits `generation: "R2"` (base64 when there is no URL or the
upload failed in any way: the contract takes either, and a result is worth more than the upload path).
Submits retry until the job's ttl. A pop whose payload cannot be read, and ids beyond what was asked
for, are settled at once: faulted, with gen_metadata saying why.
"""

from __future__ import annotations

import base64
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from bridge.admission import MemoryFault, memory_guard
from bridge.api_models import GenerationPopRequest, GenerationPopResponse, GenerationSubmit
from bridge.config import dreamer_name, max_pixels
from bridge.errors import HordeError
from bridge.families import GENERATION
from bridge.generation.censor import SafetyFailed, check_images
from bridge.generation.masks import prepare_sources
from bridge.generation.request import GenerationRequest, RequestFault, WorkerLimits, build_request
from bridge.generation.runner import GenerationResult, run_generation
from bridge.generation.substitutions import Substitution, cap_metadata, information
from bridge.identity import WithheldReport
from bridge.images import encode_webp
from bridge.jobs.base import ON_CPU, Job, JobSource, JobTimings, Placement, Submission, bytes_on_disk
from bridge.safe_text import server_text
from bridge.sources import SourceImageError

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.lora.plan import JobExtras
    from bridge.runtime import Runtime

logger = logging.getLogger(__name__)

UPLOAD_QUALITY = 95  # the legacy worker's quality for R2 uploads
FAULTED_GENERATION = "faulted"
# An R2 PUT that has not worked within this long gives way to a base64 submit (the ttl keeps the rest).
UPLOAD_BUDGET_S = 30.0


@dataclass
class Generated:
    """What the run slot produced: images not yet checked, never submitted as they are."""

    request: GenerationRequest
    result: GenerationResult
    notes: list[Substitution]


@dataclass
class FetchedSources:
    image: Image.Image | None = None
    mask: Image.Image | None = None
    metadata: list[dict[str, str]] | None = None


class GenerationJob(Job):
    kind = "generation"
    family: ClassVar[str] = GENERATION

    def __init__(
        self, pop: GenerationPopResponse, *, ids: list[str] | None = None, refusal: str | None = None
    ) -> None:
        """`ids`: the pop's ids this job serves (all by default); `refusal`: why it is faulted unrun."""
        super().__init__()
        self.pop = pop
        self._ids = list(pop.job_ids if ids is None else ids)
        self.refusal = refusal
        self.fetched = FetchedSources(metadata=[])
        self.extras: JobExtras | None = None

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def rejected(self) -> bool:
        return bool(self.refusal or self.pop.unreadable)

    def settled(self) -> list[Submission] | None:
        if self.pop.unreadable:
            return self._unreadable_fault()
        if self.refusal:
            return self.fault(self.refusal)
        return None

    def _unreadable_fault(self) -> list[Submission]:
        fields = self.pop.unreadable
        logger.warning("faulting %s: the horde sent field(s) of the wrong type: %s", self.describe(),
                       "; ".join(f"{k} ({v})" for k, v in fields.items()))
        entries = [{"type": "information", "value": "parse_failed", "ref": f"{field}: {why}"}
                   for field, why in fields.items()]
        return self.fault(f"unreadable job: {', '.join(fields)} of the wrong type", entries)

    @property
    def model(self) -> str | None:
        return self.pop.model

    @property
    def ttl(self) -> float | None:
        return self.pop.ttl

    def prepare(self, runtime: Runtime) -> None:
        if self.rejected:
            return  # no download for a job that will not run
        started = time.monotonic()
        image = self._fetch(runtime, self.pop.source_image, "source_image")
        # A mask without its source means nothing: don't spend a download on it.
        mask = self._fetch(runtime, self.pop.source_mask, "source_mask") if image is not None else None
        self.fetched.image, self.fetched.mask = image, mask
        self.extras = self._prepare_extras(runtime)
        self.timings.source_download = time.monotonic() - started

    def placement(self, runtime: Runtime) -> Placement:
        """The worker's device, holding the model's weights (their size on disk: an estimate, as a file may
        carry EMA weights or another precision). A model this worker lacks faults without computing."""
        record = self._record(runtime)
        if record is None:
            return ON_CPU
        folder = runtime.models.files_dir(record.name)
        paths = [folder / spec.path for spec in record.files] or [folder]
        return Placement(bytes=bytes_on_disk(paths))

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
            return runtime.fetcher.fetch(source, deadline=self.deadline)
        except SourceImageError as exc:
            # The public workers go on without it (txt2img / unmasked) and say so in gen_metadata.
            logger.warning("%s of %s unusable (%s): %s", kind, self.describe(), exc.kind, exc)
            self.fetched.metadata.append({"type": kind, "value": exc.kind, "ref": str(exc)[:255]})
            return None

    def execute(self, runtime: Runtime) -> list[Submission]:
        """0. settled without running; 1-4 in the run slot (`_generate`), 5-6 after it
        (`_check_and_submit`)."""
        settled = self.settled()
        if settled is not None:
            return settled
        return self._check_and_submit(runtime, self._generate(runtime))

    def execute_in_slot(self, runtime: Runtime, slot: AbstractContextManager[object]) -> list[Submission]:
        """Generation holds the run slot; the safety pass runs after it is released, overlapping the next
        job (on the CPU when the GPU has no room for it)."""
        with slot:
            generated = self._generate(runtime)
        return self._check_and_submit(runtime, generated)

    def _generate(self, runtime: Runtime) -> Generated | list[Submission]:
        """1. model record, 2. sources, 3. request, 4. generate and post-process."""
        record = self._record(runtime)
        if record is None:
            return self.fault(f"model {self.pop.model!r} is not served by this worker")
        target = (self.pop.payload.width, self.pop.payload.height)
        sources, kind, source_subs = prepare_sources(
            self.fetched.image, self.fetched.mask, self.pop.source_processing, target
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
            with memory_guard(runtime, request):
                result = run_generation(runtime, replace(request, extras=self.extras), sources,
                                        self.interrupt())
        except (RequestFault, MemoryFault) as exc:
            logger.warning("faulting %s: %s", self.describe(), exc)
            return self.fault(str(exc))
        self.timings.model_load = result.model_load_s
        self.timings.inference = result.inference_s
        self.timings.post_processing = result.post_processing_s
        if result.control is not None:
            self.timings.features = list(result.control.features)
            logger.info("%s: %s", self.describe(), ", ".join(result.control.features))
        return Generated(request, result, [*source_subs, *subs, *result.notes])

    def _check_and_submit(
        self, runtime: Runtime, generated: Generated | list[Submission]
    ) -> list[Submission]:
        """5. the safety pass on every original image, 6. one submission per id."""
        if not isinstance(generated, Generated):
            return generated  # faulted before anything was generated
        started = time.monotonic()
        try:
            check_images(runtime, generated.request, generated.result.images)
        except SafetyFailed as exc:
            logger.error("faulting %s: %s", self.describe(), exc)
            return self.fault(str(exc))
        finally:
            self.timings.safety = time.monotonic() - started
        return self._submissions(generated.result, generated.notes)

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
            # Censorship entries lead: were the list capped, the horde must still see them.
            metadata.sort(key=lambda entry: entry["type"] != "censorship")
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

    def fault(self, reason: str, entries: list[dict[str, str]] | None = None) -> list[Submission]:
        seed = self.pop.payload.seed or 0
        metadata = cap_metadata([*self.fetched.metadata, *(entries or []), information(reason)])
        return [
            Submission(job_id=i, state="faulted", gen_metadata=list(metadata), seed=seed) for i in self.ids
        ]

    def send(self, client: HordeClient, submission: Submission) -> float:
        return send_generation(client, submission, deadline=self.deadline, timings=self.timings)


def send_generation(
    client: HordeClient, submission: Submission, *, deadline: float | None, timings: JobTimings | None = None
) -> float:
    """Upload (if there is an image) and submit one id; transient failures are retried until `deadline`."""
    timings = timings or JobTimings()
    generation = FAULTED_GENERATION
    if submission.state != "faulted" and submission.image is not None:
        generation = _upload(client, submission, deadline, timings)
    body = GenerationSubmit(
        id=submission.job_id,
        generation=generation,
        state=submission.state,
        seed=submission.seed if submission.seed is not None else 0,
        gen_metadata=submission.gen_metadata,
    )
    started = time.monotonic()
    reward = client.submit_generation(body, deadline=deadline)
    timings.submit += time.monotonic() - started
    return reward


def _upload(client: HordeClient, submission: Submission, deadline: float | None, timings: JobTimings) -> str:
    """PUT to R2 and return "R2"; the image as base64 when there is no URL or the PUT failed at all (refused,
    5xx to the end of its budget, no answer, a redirect)."""
    assert submission.image is not None
    if submission.upload_url:
        started = time.monotonic()
        budget = started + UPLOAD_BUDGET_S
        try:
            client.upload(submission.upload_url, submission.image,
                          deadline=budget if deadline is None else min(budget, deadline))
            return "R2"
        except HordeError as exc:
            logger.warning("R2 upload for %s failed (%s): submitting the image base64 instead",
                           server_text(submission.job_id[:8]), exc)
        finally:
            timings.upload += time.monotonic() - started
    # The webp is already what R2 would have stored: send the same bytes, not a re-encode.
    return base64.b64encode(submission.image).decode("ascii")


class GenerationSource(JobSource):
    name = "generation"
    family: ClassVar[str] = GENERATION

    def __init__(self) -> None:
        self.withheld = WithheldReport()

    def ready(self, runtime: Runtime) -> bool:
        """Models ready, and the safety pass to check what they make: an image that cannot be checked is
        never generated."""
        safety = runtime.safety
        return (
            runtime.models is not None
            and safety is not None
            and safety.can_decide
            and bool(runtime.models.ready_models())
        )

    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[Job]:
        if capacity < 1 or not self.ready(runtime):
            return []
        models, pixels = runtime.models.ready_models(), max_pixels(runtime.config)
        if runtime.admission is not None:  # only what this machine can hold now
            offer = runtime.admission.offer(models, pixels)
            models, pixels = offer.models, offer.max_pixels
            if not models:
                return []
        allow_lora = runtime.loras is not None and runtime.loras.available()
        request = pop_request(runtime.config, models, pixels=pixels, allow_lora=allow_lora,
                              allow_controlnet=_controlnet_ready(runtime, models))
        reply = client.pop_generation(request)
        for message in reply.messages:
            logger.info("message from the horde (%s): %s", server_text(message.origin or "horde", limit=40),
                        server_text(message.message, limit=1000))
        if reply.is_idle:
            if reply.skipped:
                logger.debug("no job; skipped: %s", server_text(reply.skipped))
                self.withheld.observe(reply.skipped, runtime.config)
            return []
        return split_over_delivery(reply, request.amount)


def split_over_delivery(reply: GenerationPopResponse, asked: int) -> list[Job]:
    """The ids asked for run; any beyond are faulted at once (run, they would wait past their ttl)."""
    ids = reply.job_ids
    if len(ids) <= asked:
        return [GenerationJob(reply)]
    reason = f"over-delivered: this worker asked for {asked} job(s) and was handed {len(ids)}"
    logger.warning("generate/pop %s: faulting the %d extra id(s) at once", reason, len(ids) - asked)
    return [GenerationJob(reply, ids=ids[:asked]), GenerationJob(reply, ids=ids[asked:], refusal=reason)]


def _controlnet_ready(runtime: Runtime, models: list[str]) -> bool:
    """allow_controlnet: asked for by the operator, and every type the served models may get is ready."""
    if runtime.controlnets is None or not runtime.config.allow_controlnet:
        return False
    return runtime.controlnets.serves([runtime.models.record(name) for name in models])


def pop_request(
    config: Any, models: list[str], *, pixels: int | None = None, allow_lora: bool = False,
    allow_controlnet: bool = False,
) -> GenerationPopRequest:  # fmt: skip
    """The generate/pop body from the worker's config (legacy key names) and its ready models; `pixels`, the
    max_pixels admission control found this machine holds, defaults to max_power's; `allow_lora` only when
    LoRA support works here now (bridge.lora.service.LoraSupport.available); `allow_controlnet` only when
    the ControlNets and annotators of those models are ready."""
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
        max_pixels=pixels if pixels is not None else max_pixels(config),
        allow_img2img=config.allow_img2img,
        allow_painting=config.allow_painting,
        allow_unsafe_ipaddr=config.allow_unsafe_ip,
        allow_post_processing=config.allow_post_processing,
        allow_controlnet=allow_controlnet,
        # The horde's SDXL ControlNet is its QR-code workflow, which this worker does not run.
        allow_sdxl_controlnet=False,
        allow_lora=allow_lora,
        limit_max_steps=config.limit_max_steps,
    )
