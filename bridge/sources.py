"""Source images of popped jobs: presigned http(s) URLs or raw base64, with size and bomb guards.

Everything here is hostile input: the URL is chosen by a requester, the bytes are whatever that host
serves. So only http(s) is fetched, downloads are streamed against a byte cap and a total deadline, only
raster formats without external helpers are opened, and the pixel count is checked from the header
before a single pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import time
from urllib.parse import urlsplit

import requests
import urllib3
from PIL import Image

logger = logging.getLogger(__name__)

# Formats PIL decodes in-process. EPS (ghostscript) and friends are left out on purpose.
ALLOWED_FORMATS = ("WEBP", "PNG", "JPEG", "GIF", "BMP", "TIFF")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_CHUNK = 64 * 1024


class SourceImageError(Exception):
    """A source image that cannot be used. `kind` is the gen_metadata value to report."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ("download_failed", "parse_failed"):
            raise ValueError(f"unknown source image error kind {kind!r}")
        super().__init__(message)
        self.kind = kind


class SourceFetcher:
    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        timeout: float = 10.0,
        max_bytes: int = 10 * 1024 * 1024,
        max_pixels: int = 4096 * 4096,
    ) -> None:
        # A session of its own: never the horde client's, whose headers carry the api key.
        self.session = session or requests.Session()
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def fetch(self, source: str) -> Image.Image:
        """The decoded image (fully loaded, detached from any stream). Raises SourceImageError."""
        data = self.fetch_bytes(source)
        return self.decode(data)

    def fetch_bytes(self, source: str) -> bytes:
        source = (source or "").strip()
        if not source:
            raise SourceImageError("parse_failed", "empty source image")
        match = _SCHEME.match(source)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("http", "https"):
            return self._download(source)
        if scheme == "data":
            return self._from_base64(source.split(",", 1)[-1])
        if match:
            # Base64 has no ':', so anything with a scheme is a URL of a kind we do not fetch.
            raise SourceImageError(
                "download_failed", f"refusing to fetch a {scheme!r} URL: only http(s) allowed"
            )
        return self._from_base64(source)

    def _download(self, url: str) -> bytes:
        shown = _shown(url)
        deadline = time.monotonic() + self.timeout
        try:
            with self.session.get(url, stream=True, timeout=self.timeout, allow_redirects=True) as response:
                if response.status_code != 200:
                    raise SourceImageError("download_failed", f"{shown}: HTTP {response.status_code}")
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise SourceImageError("download_failed", f"{shown}: {declared} bytes > {self.max_bytes}")
                data = bytearray()
                # read1, not iter_content: iter_content blocks until a whole chunk has arrived, so a
                # slow drip would never reach the deadline check below.
                while chunk := response.raw.read1(_CHUNK, decode_content=True):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise SourceImageError(
                            "download_failed", f"{shown}: more than {self.max_bytes} bytes"
                        )
                    # The socket timeout is per read: a slow drip could otherwise hold a slot forever.
                    if time.monotonic() > deadline:
                        raise SourceImageError("download_failed", f"{shown}: slower than {self.timeout} s")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Reading .raw directly surfaces urllib3's own exceptions, not requests' wrappers.
            raise SourceImageError("download_failed", f"{shown}: {type(exc).__name__}") from exc
        logger.debug("downloaded %d bytes from %s", len(data), shown)
        return bytes(data)

    def _from_base64(self, text: str) -> bytes:
        text = "".join(text.split())
        # Decoded size is 3/4 of the text: refuse before allocating for a huge payload.
        if len(text) * 3 // 4 > self.max_bytes:
            raise SourceImageError("download_failed", f"base64 source larger than {self.max_bytes} bytes")
        text = text.replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SourceImageError(
                "parse_failed", f"source is neither an http(s) URL nor base64: {exc}"
            ) from exc

    def decode(self, data: bytes) -> Image.Image:
        """Bytes to a loaded image, refusing anything over max_pixels before decoding it."""
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise SourceImageError("parse_failed", f"image too large: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise SourceImageError("parse_failed", f"not a supported image: {exc}") from exc
        width, height = image.size
        if width <= 0 or height <= 0 or width * height > self.max_pixels:
            image.close()
            raise SourceImageError(
                "parse_failed", f"image of {width}x{height} pixels exceeds the limit of {self.max_pixels}"
            )
        try:
            image.load()
        except Exception as exc:  # PIL raises many types for corrupt data
            raise SourceImageError("parse_failed", f"corrupt image: {type(exc).__name__}: {exc}") from exc
        return image


def _shown(url: str) -> str:
    """Host and path only: the query of a presigned URL is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
