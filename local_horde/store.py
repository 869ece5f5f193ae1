"""An S3/R2-like object store behind presigned-style URLs on the same server (`/r2/{key}?...&sig=`).

A signature binds method, key and expiry, so a worker that PUTs to a GET URL (or edits the URL) fails the
way it would against R2 (403), and an expired URL is refused too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote

PRESIGN_TTL_S = 1800.0


class StoreError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def xml(self) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>{self}</Message></Error>"
        ).encode()


@dataclass
class StoredObject:
    data: bytes
    stored_at: float


class ObjectStore:
    def __init__(self) -> None:
        self._secret = secrets.token_bytes(16)
        self._objects: dict[str, StoredObject] = {}
        self._lock = threading.Lock()
        self.base_url = ""  # set once the server knows its port

    def _sign(self, method: str, key: str, expires: int) -> str:
        msg = f"{method}\n{key}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def presign(self, method: str, key: str, ttl: float = PRESIGN_TTL_S) -> str:
        expires = int(time.time() + ttl)
        sig = self._sign(method, key, expires)
        return f"{self.base_url}/r2/{quote(key)}?X-Amz-Expires={expires}&X-Amz-Signature={sig}"

    def check(self, method: str, raw_key: str, query: str) -> str:
        """The object key if the URL's signature is valid for `method`, else StoreError (403)."""
        key = unquote(raw_key)
        params = parse_qs(query)
        try:
            expires = int(params["X-Amz-Expires"][0])
            sig = params["X-Amz-Signature"][0]
        except (KeyError, ValueError, IndexError):
            raise StoreError(403, "AccessDenied", "Request is not presigned") from None
        if not hmac.compare_digest(sig, self._sign(method, key, expires)):
            raise StoreError(403, "SignatureDoesNotMatch", "The request signature does not match")
        if time.time() > expires:
            raise StoreError(403, "AccessDenied", "Request has expired")
        return key

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[key] = StoredObject(data, time.time())

    def get(self, key: str) -> bytes | None:
        with self._lock:
            obj = self._objects.get(key)
        return obj.data if obj else None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._objects)
