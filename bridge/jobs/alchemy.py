"""Alchemy: one small Job class per form kind, and the source that pops them from `interrogate/pop`.

Every form is one horde id with one source image. `prepare` downloads the source; `execute` runs the form and
returns its single Submission; `send` submits `{"<form>": result}` (post-processor forms first PUT their webp
to the presigned `r2_upload` and submit `{"<form>": "R2"}`). A form this worker cannot serve, or whose
source cannot be fetched or decoded, is submitted `faulted` so that the horde hands it to another worker at
once instead of waiting out the 3-minute TTL.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from bridge import horde_names
from bridge.accepted_names import AcceptedNames, AcceptedNamesCache, refused_forms
from bridge.api_models import AlchemyForm, InterrogationPopRequest, InterrogationSubmit
from bridge.config import configured_forms
from bridge.errors import HordeError
from bridge.identity import WithheldReport
from bridge.images import RESULT_QUALITY, encode_webp
from bridge.jobs import weightless
from bridge.jobs.base import Job, JobSource, Submission
from bridge.sources import SourceImageError

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient
    from bridge.runtime import Runtime

logger = logging.getLogger(__name__)

FORM_TTL = 180.0  # the horde aborts a form 3 minutes after the pop
# Upscale forms of sources with more 512x512 tiles than this are not offered to us. The horde's parser
# default (80 tiles: a 4.5-megapixel source x4) takes minutes per form on a CPU; 16 tiles (a 2048x2048
# source) keeps an x4 upscale within the form's TTL on a few cores.
DEFAULT_MAX_TILES = 16
INTERROGATOR_FORMS = horde_names.INTERROGATOR_FORMS


class AlchemyJob(Job):
    """One popped form. Subclasses implement `run(runtime, image) -> Submission`."""

    kind: ClassVar[str] = "alchemy"

    def __init__(self, form: AlchemyForm) -> None:
        super().__init__()
        self.form = form
        self.image: Image.Image | None = None
        self.problem: str | None = None

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

    def prepare(self, runtime: Runtime) -> None:
        if self.image is not None or self.problem is not None:
            return
        if not self.form.source_image:
            self.problem = "the form came without a source image"
            return
        started = time.monotonic()
        try:
            self.image = runtime.fetcher.fetch(self.form.source_image)
        except SourceImageError as exc:
            self.problem = f"source image {exc.kind}: {exc}"
        except Exception as exc:  # prepare must never raise: the failure becomes this form's fault
            logger.exception("fetching the source of %s failed", self.describe())
            self.problem = f"source image download_failed: {type(exc).__name__}: {exc}"
        finally:
            self.timings.source_download = time.monotonic() - started

    def execute(self, runtime: Runtime) -> list[Submission]:
        self.prepare(runtime)  # a no-op after the loop's prepare; lets a caller skip it
        if self.image is None:
            return self.fault(self.problem or "no source image")
        return [self.run(runtime, self.image)]

    @abc.abstractmethod
    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        """Compute the form's result. May raise: the loop turns an exception into `fault`."""

    def ok(self, result: dict[str, Any], **extra: Any) -> Submission:
        return Submission(job_id=self.form.id, state="ok", result=result, **extra)

    def fault(self, reason: str) -> list[Submission]:
        # The interrogation submit has no gen_metadata: the reason can only go to our log.
        logger.warning("alchemy form %s %s faulted: %s", self.form.form, self.form.id[:8], reason)
        return [Submission(job_id=self.form.id, state="faulted", result={})]

    def send(self, client: HordeClient, submission: Submission) -> float:
        if submission.state != "faulted" and submission.image is not None:
            if not submission.upload_url:
                raise ValueError(f"{self.describe()}: an image result without an r2_upload URL")
            started = time.monotonic()
            client.upload(submission.upload_url, submission.image)
            self.timings.upload += time.monotonic() - started
        submit = InterrogationSubmit(
            id=submission.job_id, result=submission.result or {}, state=submission.state
        )
        return client.submit_interrogation(submit)


class _InterrogatorJob(AlchemyJob):
    """A form answered by one of runtime.interrogators (attribute named like the form)."""

    def interrogator(self, runtime: Runtime) -> Any:
        found = getattr(runtime.interrogators, self.form.form, None) if runtime.interrogators else None
        if found is None:
            raise RuntimeError(f"no {self.form.form} interrogator on this worker")
        return found

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
    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return interrogator.caption(image, self.payload)


class InterrogationJob(_InterrogatorJob):
    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return interrogator.interrogate(image, self.payload)


class NsfwJob(_InterrogatorJob):
    def compute(self, interrogator: Any, image: Image.Image) -> dict[str, Any]:
        return {"nsfw": interrogator.is_nsfw([image])[0]}


class PostProcessJob(AlchemyJob):
    """Every post-processor form: apply it, PUT the webp (quality 95) to r2_upload, submit "R2"."""

    def run(self, runtime: Runtime, image: Image.Image) -> Submission:
        if runtime.postprocessors is None:
            raise RuntimeError("no post-processors on this worker")
        if not self.form.r2_upload:
            # The result can only reach the requester through R2; without a URL the form cannot succeed.
            return self.fault("the form came without an r2_upload URL")[0]
        strength = _float_or_none(self.payload.get("facefixer_strength"))
        started = time.monotonic()
        processed = runtime.postprocessors.apply(image, [self.form.form], strength=strength)
        self.timings.post_processing += time.monotonic() - started
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

    def __init__(
        self, *, max_tiles: int = DEFAULT_MAX_TILES, accepted: AcceptedNamesCache | None = None
    ) -> None:
        self.max_tiles = max_tiles
        self.accepted = accepted or AcceptedNamesCache()
        self.withheld = WithheldReport()
        self._unready_logged: tuple[str, ...] | None = None
        self._refused_logged: tuple[str, ...] | None = None

    def ready_forms(self, runtime: Runtime, accepted: AcceptedNames | None = None) -> list[str]:
        """The configured forms (config `forms`, in its order) that are servable now and that the server
        accepts (`accepted`, from its API description; None: not checked)."""
        servable = servable_forms(runtime)
        configured: Sequence[str] = configured_forms(runtime.config)
        missing = tuple(f for f in configured if f not in servable)
        if missing and missing != self._unready_logged:
            logger.warning("alchemy forms not offered (model or weights missing): %s", ", ".join(missing))
        self._unready_logged = missing
        refused: tuple[str, ...] = ()
        if accepted is not None:
            refused = tuple(f for f in configured if f not in accepted.forms)
            if refused and refused != self._refused_logged:
                logger.warning("alchemy forms not offered: the horde's API description does not list %s",
                               ", ".join(refused))
            self._refused_logged = refused
        return [form for form in configured if form in servable and form not in refused]

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
            max_tiles=self.max_tiles,
        )

    def pop(self, client: HordeClient, runtime: Runtime, capacity: int) -> list[AlchemyJob]:
        if capacity <= 0 or not self.ready_forms(runtime):
            return []
        forms = self.ready_forms(runtime, self.accepted.current(client))
        # An empty `forms` means ["caption"] to the horde: never pop without a form we can serve.
        if not forms:
            return []
        try:
            reply = client.pop_interrogation(self.request(runtime, forms, capacity))
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
                logger.debug("no alchemy form for us; skipped: %s", reply.skipped)
                self.withheld.observe(reply.skipped, runtime.config)
            return []
        return [self.job_for(form, forms) for form in reply.forms]

    @staticmethod
    def job_for(form: AlchemyForm, ready: Sequence[str]) -> AlchemyJob:
        if form.form not in ready:
            return UnservableJob(form, f"form {form.form!r} is not served by this worker")
        if form.form in horde_names.POST_PROCESSORS:
            return PostProcessJob(form)
        job_class = FORM_JOBS.get(form.form)
        if job_class is None:
            return UnservableJob(form, f"form {form.form!r} has no job class on this worker")
        return job_class(form)
