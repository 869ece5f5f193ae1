"""Alchemy: one small Job class per form kind, and the source that pops them from `interrogate/pop`.

Every form is one horde id with one source image. `prepare` downloads the source; `execute` runs the form and
returns its single Submission; `send` submits `{"<form>": result}` (post-processor forms first PUT their webp
to the presigned `r2_upload` and submit `{"<form>": "R2"}`). A form this worker cannot serve, one whose
fields cannot be read, one beyond the amount asked for, or one whose source cannot be fetched or decoded, is
submitted `faulted` at once, without a run slot, so that the horde hands it to another worker instead of
waiting out the 3-minute TTL. The interrogation submit has no gen_metadata: the reason goes to the log. An
image result whose R2 upload fails cannot reach the requester any other way: the form is faulted back too.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from bridge import horde_names
from bridge.accepted_names import AcceptedNames, AcceptedNamesCache, refused_forms
from bridge.admission import (
    MEMORY_ERRORS,
    free_device_memory,
    interrogator_folder,
    interrogator_sizes,
    post_processor_sizes,
)
from bridge.api_models import AlchemyForm, InterrogationPopRequest, InterrogationSubmit
from bridge.config import configured_forms
from bridge.errors import HordeError
from bridge.families import ALCHEMY
from bridge.identity import WithheldReport
from bridge.images import RESULT_QUALITY, encode_webp
from bridge.jobs import weightless
from bridge.jobs.base import ON_CPU, Job, JobSource, JobTimings, Placement, Submission, bytes_on_disk
from bridge.jobs.tiles import TileBudget
from bridge.safe_text import server_text
from bridge.sources import SourceImageError

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.runtime import Runtime

logger = logging.getLogger(__name__)

FORM_TTL = 180.0  # the horde aborts a form 3 minutes after the pop
# Upscale forms of sources with more 512x512 tiles than this are not offered to us. A worker follows its
# measured upscaling speed instead (bridge/jobs/tiles.py); this is the value before anything is measured.
DEFAULT_MAX_TILES = 16
INTERROGATOR_FORMS = horde_names.INTERROGATOR_FORMS
UPLOAD_BUDGET_S = 30.0  # an R2 PUT that has not worked within this long will not


class AlchemyJob(Job):
    """One popped form. Subclasses implement `run(runtime, image) -> Submission`."""

    kind: ClassVar[str] = "alchemy"
    family: ClassVar[str] = ALCHEMY

    def __init__(self, form: AlchemyForm) -> None:
        super().__init__()
        self.form = form
        self.image: Image.Image | None = None
        self.problem: str | None = None
        if form.unreadable:
            fields = "; ".join(f"{k} ({v})" for k, v in form.unreadable.items())
            self.problem = f"the horde sent field(s) of the wrong type: {fields}"

    @property
    def ids(self) -> list[str]:
        return [self.form.id]

    @property
    def model(self) -> str | None:
        return self.form.form

    @property
    def ttl(self) -> float | None:
        return FORM_TTL

    @property
    def payload(self) -> dict[str, Any]:
        return self.form.payload or {}

    @property
    def rejected(self) -> bool:
        return self.problem is not None

    def settled(self) -> list[Submission] | None:
        return self.fault(self.problem) if self.problem is not None else None

    def prepare(self, runtime: Runtime) -> None:
        if self.image is not None or self.problem is not None:
            return
        if not self.form.source_image:
            self.problem = "the form came without a source image"
            return
        started = time.monotonic()
        try:
            self.image = runtime.fetcher.fetch(self.form.source_image, deadline=self.deadline)
        except SourceImageError as exc:
            self.problem = f"source image {exc.kind}: {exc}"
        except Exception as exc:  # prepare must never raise: the failure becomes this form's fault
            logger.exception("fetching the source of %s failed", self.describe())
            self.problem = f"source image download_failed: {type(exc).__name__}: {exc}"
        finally:
            self.timings.source_download = time.monotonic() - started

    def placement(self, runtime: Runtime) -> Placement:
        """The worker's device holding the form's weights; a form that will only fault (no source, nothing
        to run it with) computes nothing and goes on the CPU."""
        if self.image is None:
            return ON_CPU
        weights = self.weights(runtime)
        return Placement(bytes=bytes_on_disk(weights)) if weights else ON_CPU

    def weights(self, runtime: Runtime) -> list[Path]:
        """The weight files or folders this form runs on; empty when this worker cannot run it."""
        return []

    def execute(self, runtime: Runtime) -> list[Submission]:
        self.prepare(runtime)  # a no-op after the loop's prepare; lets a caller skip it
        if self.image is None:
            return self.fault(self.problem or "no source image")
        reason = None
        try:
            return [self.run(runtime, self.image)]
        except MEMORY_ERRORS as exc:
            reason = f"out of memory: {type(exc).__name__}: {exc}"[:250]
        # Outside the handler, so that the failed run's frames (and its tensors) are released first.
        free_device_memory(runtime.device)
        return self.fault(reason)

    @abc.abstractmethod
    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        """Compute the form's result. May raise: the loop turns an exception into `fault`."""

    def ok(self, result: dict[str, Any], **extra: Any) -> Submission:
        return Submission(job_id=self.form.id, state="ok", result=result, **extra)

    def fault(self, reason: str) -> list[Submission]:
        # The interrogation submit has no gen_metadata: the reason can only go to our log.
        logger.warning("%s faulted: %s", self.describe(), server_text(reason, limit=500))
        return [Submission(job_id=self.form.id, state="faulted", result={})]

    def send(self, client: HordeClient, submission: Submission) -> float:
        return send_alchemy(client, submission, deadline=self.deadline, timings=self.timings)


def send_alchemy(
    client: HordeClient, submission: Submission, *, deadline: float | None, timings: JobTimings | None = None
) -> float:
    """PUT an image result to its r2_upload (if any), then submit; transient failures are retried until
    `deadline`."""
    timings = timings or JobTimings()
    if submission.state != "faulted" and submission.image is not None:
        started = time.monotonic()
        try:
            if not submission.upload_url:
                raise ValueError("an image result without an r2_upload URL")
            budget = started + UPLOAD_BUDGET_S
            client.upload(submission.upload_url, submission.image,
                          deadline=budget if deadline is None else min(budget, deadline))
        except (HordeError, ValueError) as exc:
            # No other way to hand an image to the requester: another worker gets the form.
            logger.warning("alchemy %s: R2 upload failed (%s): submitting it faulted",
                           server_text(submission.job_id[:8]), exc)
            submission = Submission(job_id=submission.job_id, state="faulted", result={})
        finally:
            timings.upload += time.monotonic() - started
    submit = InterrogationSubmit(id=submission.job_id, result=submission.result or {}, state=submission.state)
    started = time.monotonic()
    reward = client.submit_interrogation(submit, deadline=deadline)
    timings.submit += time.monotonic() - started
    return reward


class _InterrogatorJob(AlchemyJob):
    """A form answered by one of runtime.interrogators (the member named by `serves_from`)."""

    serves_from: ClassVar[str]

    def interrogator(self, runtime: Runtime) -> Any:
        found = getattr(runtime.interrogators, self.serves_from, None) if runtime.interrogators else None
        if found is None:
            raise RuntimeError(f"no {self.form.form} interrogator on this worker")
        return found

    def weights(self, runtime: Runtime) -> list[Path]:
        found = getattr(runtime.interrogators, self.serves_from, None) if runtime.interrogators else None
        folder = interrogator_folder(found)
        return [folder] if folder is not None else []

    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        interrogator = self.interrogator(runtime)
        loading_before = interrogator.load_seconds
        try:
            return self.ok(self.compute(interrogator, image))
        finally:
            self.timings.model_load += interrogator.load_seconds - loading_before

    @abc.abstractmethod
    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]: ...


class CaptionJob(_InterrogatorJob):
    serves_from = "caption"

    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return interrogator.caption(image, self.payload)


class InterrogationJob(_InterrogatorJob):
    serves_from = "interrogation"

    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return interrogator.interrogate(image, self.payload)


class NsfwJob(_InterrogatorJob):
    """The horde's NSFW verdict (the safety pass, on the CLIP embedding the other forms share)."""

    serves_from = "safety"

    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return {"nsfw": bool(interrogator.is_nsfw(image))}


class AestheticJob(_InterrogatorJob):
    """The LAION aesthetic predictor's score of the source, 4 decimals (as the current peers submit it)."""

    serves_from = "safety"

    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return {"aesthetic": round(float(interrogator.aesthetic_score(image)), 4)}


class PostProcessJob(AlchemyJob):
    """Every post-processor form: apply it, PUT the webp (quality 95) to r2_upload, submit "R2"."""

    tiles: TileBudget | None = None  # its source's speed record, told how long this form took

    def weights(self, runtime: Runtime) -> list[Path]:
        if runtime.postprocessors is None or not self.form.r2_upload:
            return []
        try:
            return list(runtime.postprocessors.get(self.form.form).files())
        except KeyError:
            return []

    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        if runtime.postprocessors is None:
            raise RuntimeError("no post-processors on this worker")
        if not self.form.r2_upload:
            # The result can only reach the requester through R2; without a URL the form cannot succeed.
            return self.fault("the form came without an r2_upload URL")[0]
        strength = _float_or_none(self.payload.get("facefixer_strength"))
        started = time.monotonic()
        processed = runtime.postprocessors.apply(image, [self.form.form], strength=strength,
                                                 interrupt=self.interrupt())
        self.timings.post_processing += time.monotonic() - started
        if self.tiles is not None:
            self.tiles.observe(self.form.form, image.width * image.height, time.monotonic() - started)
        data = encode_webp(processed.image, quality=RESULT_QUALITY)
        return self.ok({self.form.form: "R2"}, image=data, upload_url=self.form.r2_upload)


class WeightlessJob(AlchemyJob):
    """vectorize, palette, describe: `{form: compute(image)}` from an image library, no weights."""

    compute: ClassVar[Any]

    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        return self.ok({self.form.form: type(self).compute(image)})


class VectorizeJob(WeightlessJob):
    compute = staticmethod(weightless.vectorize)


class PaletteJob(WeightlessJob):
    compute = staticmethod(weightless.palette)


class DescribeJob(WeightlessJob):
    compute = staticmethod(weightless.describe)


class UnservableJob(AlchemyJob):
    """A form the horde handed out that this worker cannot run: faulted back without downloading."""

    def __init__(self, form: AlchemyForm, reason: str) -> None:
        super().__init__(form)
        self.problem = reason

    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        raise AssertionError("an unservable form never runs")  # execute faults before reaching run


# Post-processor forms all run as PostProcessJob (see job_for).
FORM_JOBS: dict[str, type[AlchemyJob]] = {
    "caption": CaptionJob,
    "interrogation": InterrogationJob,
    "nsfw": NsfwJob,
    "aesthetic": AestheticJob,
    "vectorize": VectorizeJob,
    "palette": PaletteJob,
    "describe": DescribeJob,
}


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def servable_forms(runtime: Runtime) -> set[str]:
    """Forms this worker has ready now: interrogators whose models are present, post-processors whose
    weights are present."""
    forms: set[str] = set(weightless.available_forms())
    if runtime.interrogators is not None:
        forms.update(runtime.interrogators.ready_forms())
    if runtime.postprocessors is not None:
        available = runtime.postprocessors.available()
        forms.update(name for name in available if name in horde_names.POST_PROCESSORS)
    return forms


class AlchemySource(JobSource):
    """Pops `interrogate/pop` for the configured forms this worker can serve."""

    name: ClassVar[str] = "alchemy"
    family: ClassVar[str] = ALCHEMY

    def __init__(
        self, *, max_tiles: int = DEFAULT_MAX_TILES, tiles: TileBudget | None = None,
        accepted: AcceptedNamesCache | None = None,
    ) -> None:  # fmt: skip
        """`tiles`: max_tiles follows this machine's measured upscaling speed; without it, `max_tiles`.
        `accepted`: the names the server's API description lists (read at the first pop, then hourly)."""
        self.max_tiles = max_tiles
        self.tiles = tiles
        self.accepted = accepted or AcceptedNamesCache()
        self.withheld = WithheldReport()
        self._unready_logged: tuple[str, ...] | None = None
        self._refused_logged: tuple[str, ...] | None = None
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}

    def ready_forms(self, runtime: Runtime, accepted: AcceptedNames | None = None) -> list[str]:
        """The configured forms (config `forms`, in its order) that are servable now: weights present, fast
        enough for the TTL, (with admission control) models that fit the machine, and names the server
        accepts (`accepted`, from its API description; None: not checked)."""
        servable = servable_forms(runtime)
        configured: Sequence[str] = configured_forms(runtime.config)
        missing = tuple(f for f in configured if f not in servable)
        if missing and missing != self._unready_logged:
            logger.warning("alchemy forms not offered (model or weights missing): %s", ", ".join(missing))
        self._unready_logged = missing
        refused = self._refused(configured, accepted)
        forms = [form for form in configured if form in servable and form not in refused]
        if self.tiles is not None:
            forms = [form for form in forms if self.tiles.fast_enough(form)]
        if runtime.admission is not None:
            forms = runtime.admission.servable_forms(forms, self._form_sizes(runtime, forms))
        return forms

    def _refused(self, configured: Sequence[str], accepted: AcceptedNames | None) -> tuple[str, ...]:
        if accepted is None:
            return ()
        refused = tuple(f for f in configured if f not in accepted.forms)
        if refused and refused != self._refused_logged:
            logger.warning("alchemy forms not offered: the horde's API description does not list %s",
                           ", ".join(refused))
        self._refused_logged = refused
        return refused

    def tiles_for(self, forms: Sequence[str]) -> int:
        return self.tiles.max_tiles(forms) if self.tiles is not None else self.max_tiles

    def _form_sizes(self, runtime: Runtime, forms: Sequence[str]) -> dict[str, tuple[int, int]]:
        """form -> (weights, working memory), read from the files once per max_tiles."""
        table, dtype, tiles = runtime.admission.table, runtime.device.dtype, self.tiles_for(forms)
        missing = [f for f in forms if (f, tiles) not in self._sizes]
        if missing:
            found = interrogator_sizes(runtime.interrogators, table, dtype)
            if runtime.postprocessors is not None:
                names = [f for f in missing if f in horde_names.POST_PROCESSORS]
                found.update(post_processor_sizes(runtime.postprocessors, names, table, dtype, tiles))
            for form in missing:
                self._sizes[(form, tiles)] = found.get(form, (0, 0))
        return {form: self._sizes[(form, tiles)] for form in forms}

    def ready(self, runtime: Runtime) -> bool:
        return bool(self.ready_forms(runtime))

    def request(self, runtime: Runtime, forms: list[str], capacity: int) -> InterrogationPopRequest:
        config = runtime.config
        return InterrogationPopRequest(
            name=config.alchemist_name,
            priority_usernames=list(config.priority_usernames),
            forms=forms,
            amount=max(1, capacity),
            bridge_agent=config.bridge_agent,
            threads=config.max_threads,
            max_tiles=self.tiles_for(forms),
        )

    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[AlchemyJob]:
        if capacity <= 0 or not self.ready_forms(runtime):
            return []
        forms = self.ready_forms(runtime, self.accepted.current(client))
        # An empty `forms` means ["caption"] to the horde: never pop without a form we can serve.
        if not forms:
            return []
        request = self.request(runtime, forms, capacity)
        try:
            reply = client.pop_interrogation(request)
        except HordeError as err:
            refused = refused_forms(err, forms)
            if refused is None:
                raise
            # A name the server no longer accepts must cost this one pop, not stop the worker.
            logger.warning("the horde refused the pop over form name(s) %s: not offering them; re-reading "
                           "its API description (%s)", ", ".join(refused) or "(unnamed)", err.errors)
            self.accepted.reload(refused)
            return []
        if reply.is_idle:
            if reply.skipped:
                logger.debug("no alchemy form for us; skipped: %s", server_text(reply.skipped))
                self.withheld.observe(reply.skipped, runtime.config)
            return []
        return self._jobs(reply.forms, forms, request.amount)

    def _jobs(self, handed: Sequence[AlchemyForm], forms: Sequence[str], asked: int) -> list[AlchemyJob]:
        """A job per form asked for; any beyond are faulted at once (run, they would wait past their ttl)."""
        jobs = [self.job_for(form, forms) for form in handed[:asked]]
        extra = handed[asked:]
        if extra:
            reason = f"over-delivered: this worker asked for {asked} form(s) and was handed {len(handed)}"
            logger.warning("interrogate/pop %s: faulting the %d extra form(s) at once", reason, len(extra))
            jobs += [UnservableJob(form, reason) for form in extra]
        for job in jobs:
            if isinstance(job, PostProcessJob):
                job.tiles = self.tiles
        return jobs

    @staticmethod
    def job_for(form: AlchemyForm, ready: Sequence[str]) -> AlchemyJob:
        if form.unreadable:
            return UnservableJob(form, f"the horde sent field(s) of the wrong type: "
                                       f"{'; '.join(f'{k} ({v})' for k, v in form.unreadable.items())}")
        if form.form not in ready:
            name = server_text(form.form, limit=60)
            return UnservableJob(form, f"form {name!r} is not served by this worker")
        if form.form in horde_names.POST_PROCESSORS:
            return PostProcessJob(form)
        job_class = FORM_JOBS.get(form.form)
        if job_class is None:
            return UnservableJob(form, f"form {form.form!r} has no job class on this worker")
        return job_class(form)
