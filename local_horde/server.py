"""HTTP transport: a stdlib ThreadingHTTPServer that applies faults, serves the object store and the API."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from local_horde.api import HORDE_VERSION, ApiRequest, HordeApi, parse_query
from local_horde.civitai import PREFIX as CIVITAI_PREFIX
from local_horde.civitai import CivitaiStandIn
from local_horde.faults import HTML_PAGE, MALFORMED_BODY, Fault, FaultInjector, FaultKind
from local_horde.state import ApiError
from local_horde.store import ObjectStore, StoreError

logger = logging.getLogger(__name__)

# Requests carrying this header (the LocalHorde's own requester helpers) are never faulted nor slowed.
BYPASS_HEADER = "X-Local-Horde-Requester"
TRANSPORT_FAULTS = (
    FaultKind.STATUS,
    FaultKind.RATE_LIMIT,
    FaultKind.HANG,
    FaultKind.DROP,
    FaultKind.MALFORMED,
    FaultKind.REDIRECT,
    FaultKind.TRICKLE,
)
UPLOAD_CHUNK = 16 * 1024


class Response:
    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), headers=headers)


class HordeTransport:
    def __init__(
        self, api: HordeApi, store: ObjectStore, faults: FaultInjector, civitai: CivitaiStandIn | None = None
    ) -> None:
        self.api = api
        self.store = store
        self.faults = faults
        self.civitai = civitai or CivitaiStandIn()
        self.stopping = threading.Event()
        self.node = "localhost:0:" + HORDE_VERSION

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        path, query, method = split.path, split.query, h.command
        bypass = h.headers.get(BYPASS_HEADER) == "1"
        if path.startswith(CIVITAI_PREFIX + "/"):
            self._civitai_call(h, method, path, query)
            return
        fault = None if bypass else self.faults.take(method, path, kinds=TRANSPORT_FAULTS)
        if fault is not None and not fault.after:
            self._read_body(h, throttle=False)
            self._apply(h, fault, None)
            return
        if path.startswith("/r2/"):
            response = self._store_call(h, method, path[len("/r2/") :], query, throttle=not bypass)
        else:
            if not bypass and self.faults.latency_s > 0:
                self.stopping.wait(self.faults.latency_s)
            response = self._api_call(h, method, path, query, bypass)
        if fault is not None:
            self._apply(h, fault, response)
        else:
            self._send(h, response)

    # ---- faults ----------------------------------------------------------------------------------------
    def _apply(self, h: BaseHTTPRequestHandler, fault: Fault, response: Response | None) -> None:
        """Before the request is handled `response` is None; after, it is the answer the fault replaces."""
        kind = fault.kind
        if kind == FaultKind.HANG:
            self.stopping.wait(fault.hang_s)
            if response is not None:
                self._send(h, response)  # late: the client has usually given up by now
            else:
                h.close_connection = True  # like a proxy timing out: never handled, never answered
        elif kind == FaultKind.DROP:
            h.close_connection = True
        elif kind == FaultKind.MALFORMED:
            self._send(h, Response(200, MALFORMED_BODY))
        elif kind == FaultKind.REDIRECT:
            self._send(h, Response(fault.status, b"", "text/plain", {"Location": fault.location}))
        elif kind == FaultKind.TRICKLE:
            self._trickle(h, fault)
        elif kind == FaultKind.RATE_LIMIT:
            headers = {
                "Retry-After": f"{fault.retry_after:g}",
                "X-RateLimit-Limit": "60",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + fault.retry_after:.0f}",
            }
            self._send(h, Response.json(429, {"message": "Too Many Requests: 60 per 1 second"}, headers))
        elif fault.html:
            page = HTML_PAGE.format(status=fault.status).encode()
            self._send(h, Response(fault.status, page, "text/html; charset=utf-8"))
        else:
            body = fault.body(h.headers.get("apikey") or "", urlsplit(h.path).query)
            self._send(h, Response.json(fault.status, body))

    def _trickle(self, h: BaseHTTPRequestHandler, fault: Fault) -> None:
        """A status line, then header bytes one at a time: every read the client makes gets something."""
        h.close_connection = True
        ends = time.monotonic() + fault.hang_s
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/webp\r\nX-Slow: "
        try:
            h.wfile.write(head)
            h.wfile.flush()
            while time.monotonic() < ends and not self.stopping.wait(fault.interval_s):
                h.wfile.write(b"a")
                h.wfile.flush()
        except OSError:
            pass  # the client gave up: that is what it should do

    # ---- API -------------------------------------------------------------------------------------------
    def _api_call(
        self, h: BaseHTTPRequestHandler, method: str, path: str, query: str, bypass: bool
    ) -> Response:
        raw = self._read_body(h, throttle=False)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            return Response.json(400, {"message": "Failed to decode JSON object: the body is not valid JSON"})
        headers = {k.lower(): v for k, v in h.headers.items()}
        if not bypass and isinstance(body, dict):
            over = self.faults.take(method, path, kinds=(FaultKind.OVER_DELIVER,))
            if over is not None:
                body = {**body, "amount": int(body.get("amount") or 1) + over.extra}
        req = ApiRequest(method, path, parse_query(query), headers, body, {})
        try:
            if not bypass and method == "POST" and path.endswith("/submit"):
                self._maybe_expire(path, body)
            status, payload = self.api.dispatch(req)
            if not bypass:
                payload = self.faults.edited(method, path, payload)
            return Response.json(status, payload)
        except ApiError as err:
            return Response.json(err.status, err.body(), err.headers)
        except Exception:  # noqa: BLE001 - a bug in the stand-in must look like a server 500, not kill the thread
            logger.exception("local horde: unhandled error on %s %s", method, path)
            return Response.json(500, {"message": "Internal Server Error"})

    def _maybe_expire(self, path: str, body: Any) -> None:
        if not (isinstance(body, dict) and isinstance(body.get("id"), str)):
            return
        if self.faults.take("POST", path, kinds=(FaultKind.EXPIRE,)) is None:
            return
        queue = self.api.alchemy if "/interrogate/" in path else self.api.gens
        with self.api.reg.lock:
            queue.expire(body["id"])

    # ---- CivitAI stand-in -------------------------------------------------------------------------------
    def _civitai_call(self, h: BaseHTTPRequestHandler, method: str, path: str, query: str) -> None:
        self._read_body(h, throttle=False)
        headers = {k.lower(): v for k, v in h.headers.items()}
        answer = self.civitai.handle(method, path, query, headers)
        declared = answer.headers.pop("X-Declared-Length", None) if answer else None
        if answer is None:
            h.close_connection = True
            return
        if declared is None:
            self._send(h, Response(answer.status, answer.body, answer.content_type, answer.headers))
            return
        # A transfer cut short: the full length announced, part of the body sent, the connection closed.
        h.send_response(answer.status)
        h.send_header("Content-Type", answer.content_type)
        h.send_header("Content-Length", declared)
        h.end_headers()
        h.wfile.write(answer.body)
        h.wfile.flush()
        h.close_connection = True

    # ---- object store ----------------------------------------------------------------------------------
    def _store_call(
        self, h: BaseHTTPRequestHandler, method: str, raw_key: str, query: str, throttle: bool
    ) -> Response:
        try:
            if method == "PUT":
                key = self.store.check("PUT", raw_key, query)
                data = self._read_body(h, throttle=throttle)
                self.store.put(key, data)
                return Response(200, b"", "text/plain", {"ETag": f'"{len(data):x}"'})
            if method in ("GET", "HEAD"):
                self._read_body(h, throttle=False)
                key = self.store.check("GET", raw_key, query)
                data = self.store.get(key)
                if data is None:
                    raise StoreError(404, "NoSuchKey", "The specified key does not exist.")
                return Response(200, data, "image/webp")
            raise StoreError(405, "MethodNotAllowed", "The specified method is not allowed.")
        except StoreError as err:
            return Response(err.status, err.xml(), "application/xml")

    def _read_body(self, h: BaseHTTPRequestHandler, *, throttle: bool) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            return _read_chunked(h)  # e.g. requests uploading a generator; not throttled
        length = int(h.headers.get("Content-Length") or 0)
        cap = self.faults.upload_bandwidth if throttle else None
        if not cap:
            return h.rfile.read(length) if length else b""
        chunks: list[bytes] = []
        start, received = time.monotonic(), 0
        while received < length:
            chunk = h.rfile.read(min(UPLOAD_CHUNK, length - received))
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            # Sleep until the bytes so far fit the cap: the client's send buffer fills and it slows down too.
            delay = received / cap - (time.monotonic() - start)
            if delay > 0:
                self.stopping.wait(delay)
        return b"".join(chunks)

    def _send(self, h: BaseHTTPRequestHandler, response: Response) -> None:
        h.send_response(response.status)
        h.send_header("Content-Type", response.content_type)
        h.send_header("Content-Length", str(len(response.body)))
        h.send_header("Horde-Node", self.node)
        for name, value in response.headers.items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(response.body)


def _read_chunked(h: BaseHTTPRequestHandler) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int(h.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(h.rfile.read(size))
        h.rfile.readline()  # the CRLF after each chunk


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHorde/" + HORDE_VERSION
    sys_version = ""
    timeout = 60  # idle keep-alive connections give their thread back eventually
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without NODELAY, Nagle + delayed ACK add ~40 ms per response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _dispatch(self) -> None:
        try:
            self.server.transport.handle(self)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError) as err:
            logger.debug("local horde: client went away: %s", err)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("local horde: " + format, *args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, transport: HordeTransport) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.transport = transport
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler blocked on a keep-alive connection so its thread ends with the server."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def make_server(port: int, transport: HordeTransport) -> _HttpServer:
    return _HttpServer(port, transport)
