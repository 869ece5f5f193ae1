"""Fault kinds the local horde can inject, and the thread-safe injector that decides when they fire.

All fault kinds live here so a test reads one small module to know what a worker may meet on the wire.
A fault matches a request by an fnmatch pattern on the URL path (no query string), e.g.
`/api/v2/generate/submit`, `*/pop`, `/r2/*`. Requests made by the LocalHorde's own requester helpers are
never faulted, so a test's bookkeeping stays reliable while the worker side misbehaves.
"""

from __future__ import annotations

import copy
import enum
import fnmatch
import functools
import logging
import random
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class FaultKind(enum.StrEnum):
    STATUS = "status"  # answer with an HTTP error status (500/502/503/...) and a JSON body
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After, like flask-limiter
    HANG = "hang"  # sleep before answering: the client's read timeout fires first
    DROP = "drop"  # close the socket without writing any response
    MALFORMED = "malformed"  # 200 with a body that is not valid JSON
    EXPIRE = "expire"  # submit endpoints only: the job is aborted (ttl) just before the submit is handled
    REDIRECT = "redirect"  # answer 3xx with a Location (another origin, a private address...)
    TRICKLE = "trickle"  # send the status line and headers a byte at a time, never finishing them
    REWRITE = "rewrite"  # the real answer, edited by a function (wrong-type fields, moderator messages...)
    OVER_DELIVER = "over_deliver"  # a pop handled as if it had asked for `extra` more jobs than it did

# A CDN's or proxy's error page: HTML, no JSON, no rc.
HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{status} Error</title></head>\n<body><h1>{status}</h1>"
    "<p>The request was blocked by the content delivery network.</p></body></html>\n"
)


@dataclass
class Fault:
    """One injected fault. `remaining` None means unlimited; `probability` draws from the injector's RNG.

    `after=True` applies the request first and then loses/garbles the answer: the horde changed state but the
    client cannot know (a retried submit then meets DuplicateGen).
    """

    kind: FaultKind
    pattern: str
    method: str | None = None
    remaining: int | None = 1
    probability: float = 1.0
    status: int = 500
    rc: str | None = None
    message: str | None = None
    retry_after: float = 1.0
    hang_s: float = 5.0
    after: bool = False
    html: bool = False  # STATUS: an HTML page instead of the horde's JSON
    location: str = ""  # REDIRECT target
    interval_s: float = 0.5  # TRICKLE: seconds between header bytes
    extra: int = 0  # OVER_DELIVER
    edit: Callable[[Any], Any] | None = None  # REWRITE: body -> new body, or None when it does not apply
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return fnmatch.fnmatchcase(path, self.pattern)

    def body(self, api_key: str = "", query: str = "") -> dict:
        """`{apikey}` / `{query}` in the message become the key / the URL query the request carried (a server
        echoing credentials back: the horde quoting the key, an object store quoting the signature)."""
        message = (self.message or _default_message(self.status)).replace("{apikey}", api_key)
        message = message.replace("{query}", query)
        body: dict = {"message": message}
        if self.rc:
            body["rc"] = self.rc
        return body


def _default_message(status: int) -> str:
    return {
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }.get(status, f"HTTP {status}")


MALFORMED_BODY = b'{"payload": {"prompt": "a cat", "ddim_steps": 3'  # truncated mid-object on purpose


@dataclass
class FiredFault:
    kind: FaultKind
    method: str
    path: str


@dataclass
class FaultInjector:
    """Per-endpoint faults plus global latency and an upload bandwidth cap. Thread-safe.

        horde.faults.http_error("*/generate/submit", 502, count=2)     # the next two submits get 502
        horde.faults.rate_limit("*/pop", retry_after=0.5)              # 429 + Retry-After: 0.5
        horde.faults.hang("*/pop", seconds=3)                          # client read timeout; nothing popped
        horde.faults.drop("*/submit", after=True)                      # submit applied, answer lost
        horde.faults.malformed("*/interrogate/pop", probability=0.2)   # 20% of pops, seeded RNG, no limit
        horde.faults.expire_on_submit()                                # next submit -> AbortedGen + requeue
        horde.faults.redirect("*/generate/pop", "http://127.0.0.2:9/")  # 307 to another origin
        horde.faults.trickle("/r2/hosted/*", seconds=30)               # headers dripping, never finished
        horde.faults.wrong_type("payload.ddim_steps", "many")          # next job reply carries a bad field
        horde.faults.over_deliver("*/pop", extra=2)                    # more jobs than the worker asked for
        horde.faults.latency_s = 0.1; horde.faults.upload_bandwidth = 50_000

    `count` is how many times a fault fires (None: unlimited). Given a `probability` and the default count,
    the fault keeps drawing forever. The first matching fault in insertion order fires. A HANG before
    handling never handles the request (like a proxy timeout); with `after=True` it is handled, then
    answered late.
    """

    seed: int = 0
    latency_s: float = 0.0  # added to every API call (not to the object store)
    upload_bandwidth: float | None = None  # bytes/s cap on PUTs to the object store
    faults: list[Fault] = field(default_factory=list)
    history: list[FiredFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)

    # ---- adding faults -------------------------------------------------------------------------------
    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _new(
        self, kind: FaultKind, pattern: str, count: int | None, probability: float | None, **kw
    ) -> Fault:
        if probability is not None and count == 1:
            count = None  # a probability with the default count means "keep drawing"
        return self.add(
            Fault(
                kind=kind,
                pattern=pattern,
                remaining=count,
                probability=1.0 if probability is None else probability,
                **kw,
            )
        )

    def http_error(
        self,
        pattern: str,
        status: int = 500,
        *,
        count: int | None = 1,
        probability: float | None = None,
        rc: str | None = None,
        message: str | None = None,
        method: str | None = None,
        after: bool = False,
        html: bool = False,
    ) -> Fault:
        """`html`: a CDN's HTML error page instead of the horde's JSON; `{apikey}` and `{query}` in `message`
        are replaced by the key and the URL query the request carried."""
        return self._new(
            FaultKind.STATUS,
            pattern,
            count,
            probability,
            status=status,
            rc=rc,
            message=message,
            method=method,
            after=after,
            html=html,
        )

    def rate_limit(
        self,
        pattern: str,
        *,
        retry_after: float = 1.0,
        count: int | None = 1,
        probability: float | None = None,
        method: str | None = None,
    ) -> Fault:
        return self._new(
            FaultKind.RATE_LIMIT,
            pattern,
            count,
            probability,
            status=429,
            retry_after=retry_after,
            method=method,
        )

    def hang(
        self,
        pattern: str,
        seconds: float,
        *,
        count: int | None = 1,
        probability: float | None = None,
        method: str | None = None,
        after: bool = False,
    ) -> Fault:
        return self._new(
            FaultKind.HANG, pattern, count, probability, hang_s=seconds, method=method, after=after
        )

    def drop(
        self,
        pattern: str,
        *,
        count: int | None = 1,
        probability: float | None = None,
        method: str | None = None,
        after: bool = False,
    ) -> Fault:
        return self._new(FaultKind.DROP, pattern, count, probability, method=method, after=after)

    def malformed(
        self,
        pattern: str,
        *,
        count: int | None = 1,
        probability: float | None = None,
        method: str | None = None,
        after: bool = False,
    ) -> Fault:
        return self._new(FaultKind.MALFORMED, pattern, count, probability, method=method, after=after)

    def redirect(
        self, pattern: str, location: str, *, status: int = 307, count: int | None = 1,
        probability: float | None = None, method: str | None = None,
    ) -> Fault:
        """Answer `status` with `Location: location` instead of handling the request."""
        return self._new(FaultKind.REDIRECT, pattern, count, probability, status=status, location=location,
                         method=method)

    def trickle(
        self, pattern: str, seconds: float, *, interval_s: float = 0.5, count: int | None = 1,
        probability: float | None = None, method: str | None = None,
    ) -> Fault:
        """Send a status line and headers one byte per `interval_s`, for `seconds`, never ending them: the
        client's per-read timeout never fires."""
        return self._new(FaultKind.TRICKLE, pattern, count, probability, hang_s=seconds,
                         interval_s=interval_s, method=method)

    def rewrite(
        self, pattern: str, edit: Callable[[Any], Any], *, count: int | None = 1, method: str | None = None
    ) -> Fault:
        """Handle the request, then answer `edit(body)` (a deep copy). `edit` returns None when the answer
        is not one to edit (an idle pop, say): such answers pass unchanged and do not use up `count`."""
        return self.add(Fault(FaultKind.REWRITE, pattern, method=method, remaining=count, edit=edit))

    def wrong_type(self, field: str, value: Any, *, count: int | None = 1) -> Fault:
        """The next generate/pop reply carrying a job gets `value` for `field` ("ttl", "payload.ddim_steps").
        For alchemy forms, `form.<key>` ("form.payload", "form.id") sets it in the first form."""
        head, _, key = field.partition(".")

        def edit(body: Any) -> Any:
            if head == "form":
                forms = body.get("forms") if isinstance(body, dict) else None
                if not forms:
                    return None
                forms[0][key] = value
                return body
            if not isinstance(body, dict) or not body.get("ids"):
                return None
            if head == "payload" and key:
                body["payload"][key] = value
            else:
                body[field] = value
            return body

        pattern = "*/interrogate/pop" if head == "form" else "*/generate/pop"
        return self.rewrite(pattern, edit, count=count)

    def messages(self, *texts: str, pattern: str = "*/generate/pop", count: int | None = 1) -> Fault:
        """Pop replies carry these moderator messages (the horde relays them on every pop)."""
        messages = [{"id": f"m{i}", "message": t, "origin": "moderator"} for i, t in enumerate(texts)]

        def edit(body: Any) -> Any:
            if not isinstance(body, dict) or "messages" not in body:
                return None
            body["messages"] = list(messages)
            return body

        return self.rewrite(pattern, edit, count=count)

    def over_deliver(
        self, pattern: str = "*/pop", *, extra: int = 2, count: int | None = 1,
        probability: float | None = None,
    ) -> Fault:
        """The next matching pop is served as if `amount` were `extra` more than the worker asked for."""
        return self._new(FaultKind.OVER_DELIVER, pattern, count, probability, method="POST", extra=extra)

    def expire_on_submit(
        self, pattern: str = "*/submit", *, count: int | None = 1, probability: float | None = None
    ) -> Fault:
        """The next matching submit finds its job already aborted by the ttl reaper (AbortedGen)."""
        return self._new(FaultKind.EXPIRE, pattern, count, probability, method="POST")

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.latency_s = 0.0
            self.upload_bandwidth = None

    # ---- firing --------------------------------------------------------------------------------------
    def take(self, method: str, path: str, *, kinds: tuple[FaultKind, ...] | None = None) -> Fault | None:
        """The first matching fault that fires for this request (consuming one of its count), or None."""
        with self._lock:
            for fault in self.faults:
                if kinds is not None and fault.kind not in kinds:
                    continue
                if fault.remaining is not None and fault.remaining <= 0:
                    continue
                if not fault.matches(method, path):
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                fault.fired += 1
                self.history.append(FiredFault(fault.kind, method, path))
                logger.info("local horde: injecting %s on %s %s", fault.kind.value, method, path)
                return fault
        return None

    def edited(self, method: str, path: str, body: Any) -> Any:
        """`body` as the first applicable REWRITE fault edits it (consuming one of its count), else `body`."""
        with self._lock:
            candidates = [f for f in self.faults if f.kind == FaultKind.REWRITE and f.matches(method, path)
                          and (f.remaining is None or f.remaining > 0)]
        for fault in candidates:
            assert fault.edit is not None
            new = fault.edit(copy.deepcopy(body))
            if new is None:
                continue
            with self._lock:
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                fault.fired += 1
                self.history.append(FiredFault(fault.kind, method, path))
            logger.info("local horde: rewriting the answer to %s %s", method, path)
            return new
        return body

    def fired(self, kind: FaultKind | None = None) -> list[FiredFault]:
        with self._lock:
            return [f for f in self.history if kind is None or f.kind == kind]


@functools.lru_cache(maxsize=4)
def huge_image_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A complete, valid 1-bit PNG with huge dimensions but a small file: a decompression-bomb-shaped source.

    Written by hand (zlib over zero rows) so building it never holds the decoded image in memory.
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * min(256, height - i)) for i in range(0, height, 256)]
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


CORRUPT_IMAGE_BYTES = b"RIFF\x00\x10\x00\x00WEBPVP8 this is not really an image"
