"""Another origin beside the local horde: a host that records every request it gets.

Hostile-network tests need a second place on the wire: where a redirect points (the api key must never arrive
there), a "private" address a source URL leads to (the worker must never connect to it). It listens on its
own loopback address (127.0.0.2 by default: a different host, not just a different port) and answers every
GET with `body`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        seen = SeenRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.server.lock:
            self.server.seen.append(seen)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, body: bytes, content_type: str) -> None:
        super().__init__((host, 0), _Recorder)
        self.lock = threading.Lock()
        self.seen: list[SeenRequest] = []
        self.body = body
        self.content_type = content_type

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gives up mid-answer is what these tests provoke


class RecordingHost:
    """`with RecordingHost(body=webp) as other: other.url("/x.webp")`; `other.seen` lists what arrived."""

    def __init__(
        self, host: str = "127.0.0.2", *, body: bytes = b"{}", content_type: str = "application/json"
    ) -> None:
        self._server = _Server(host, body, content_type)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=f"recording-host-{self.port}", daemon=True)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + path

    @property
    def seen(self) -> list[SeenRequest]:
        with self._server.lock:
            return list(self._server.seen)

    def __enter__(self) -> RecordingHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
