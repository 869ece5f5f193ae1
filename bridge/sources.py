"""Source images of popped jobs: presigned http(s) URLs or raw base64, with network, size and bomb guards.

Everything here is hostile input: the URL is chosen by a requester, the bytes are whatever that host serves.

* Only http(s) is fetched, and only from public addresses (no SSRF into the volunteer's network): the host is
  resolved once, every address it resolves to must be public (not loopback, RFC 1918, carrier-grade NAT,
  link-local/cloud metadata, unique-local, multicast, reserved; IPv6 forms that embed such an IPv4 address
  count as that address), and the connection goes to the address that was checked (no second lookup that a
  DNS rebinding could answer differently). Redirects are followed by hand, each hop checked again. The
  operator key `allow_private_sources` lifts the address check (a local horde on loopback, tests, the demo).
* One deadline covers the whole request: name resolution, connecting, the status line and headers (a host
  trickling header bytes is cut off like a slow body), every redirect hop and the body.
* Downloads are streamed against a byte cap; only raster formats without external helpers are opened; the
  pixel count is checked from the header before a single pixel is decoded; whatever mode decodes is turned
  into RGB, or RGBA when it has alpha (inpainting masks live there), or refused as parse_failed.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import http.client
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image

from bridge.safe_text import server_text

logger = logging.getLogger(__name__)

# Formats PIL decodes in-process. EPS (ghostscript) and friends are left out on purpose.
ALLOWED_FORMATS = ("WEBP", "PNG", "JPEG", "GIF", "BMP", "TIFF")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_CHUNK = 64 * 1024
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "horde-bridge-py source fetcher"
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class SourceImageError(Exception):
    """A source image that cannot be used. `kind` is the gen_metadata value to report."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ("download_failed", "parse_failed"):
            raise ValueError(f"unknown source image error kind {kind!r}")
        super().__init__(message)
        self.kind = kind


# ---- which addresses a source may reach ---------------------------------------------------------------


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses (checked again for an IPv4 address inside IPv6)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if any(address in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified
    )  # fmt: skip


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="source-dns")


# ---- connections pinned to the checked address --------------------------------------------------------


class _PinnedHTTP(http.client.HTTPConnection):
    """Talks to `host` (Host header) at `address`, the one that was checked; never resolves `host` again."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._raw: socket.socket | None = None
        self.aborted = False

    def _raw_socket(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._raw = sock
        return sock

    def connect(self) -> None:
        self.sock = self._raw_socket()

    def abort(self) -> None:
        """From another thread: end the exchange now, whatever read it is blocked in (a TLS handshake too)."""
        self.aborted = True
        sock = self._raw
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _tls_context() -> ssl.SSLContext:
    """The trust store requests uses (certifi's, installed with it), so sources verify as API calls do."""
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


class _PinnedHTTPS(_PinnedHTTP):
    _context_cache: ssl.SSLContext | None = None

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, address, port, timeout)
        if _PinnedHTTPS._context_cache is None:
            _PinnedHTTPS._context_cache = _tls_context()
        self._tls = _PinnedHTTPS._context_cache

    def connect(self) -> None:
        # The certificate is checked against the host name (SNI too), while the socket is the checked address.
        self.sock = self._tls.wrap_socket(self._raw_socket(), server_hostname=self.host)


# ---- the fetcher --------------------------------------------------------------------------------------


class SourceFetcher:
    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_bytes: int = 10 * 1024 * 1024,
        max_pixels: int = 4096 * 4096,
        allow_private: bool = False,
        address_allowed: Callable[[IPAddress], bool] | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        """`allow_private`: the operator key allow_private_sources. `address_allowed` replaces the address
        rule as a whole (tests, whose whole internet is loopback, name the addresses that stand for public
        hosts); `resolver` replaces the system's name lookup (host, port) -> addresses."""
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.allow_private = allow_private
        self.address_allowed = address_allowed or (lambda a: allow_private or is_public_address(a))
        self.resolver = resolver

    def fetch(self, source: str, *, deadline: float | None = None) -> Image.Image:
        """The decoded image (fully loaded, RGB or RGBA). `deadline` (monotonic) can only shorten the
        fetcher's own timeout (a job's ttl). Raises SourceImageError."""
        data = self.fetch_bytes(source, deadline=deadline)
        return self.decode(data)

    def fetch_bytes(self, source: str, *, deadline: float | None = None) -> bytes:
        source = (source or "").strip() if isinstance(source, str) else ""
        if not source:
            raise SourceImageError("parse_failed", "empty source image")
        match = _SCHEME.match(source)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("http", "https"):
            own = time.monotonic() + self.timeout
            return self._download(source, own if deadline is None else min(own, deadline))
        if scheme == "data":
            return self._from_base64(source.split(",", 1)[-1])
        if match:
            # Base64 has no ':', so anything with a scheme is a URL of a kind we do not fetch.
            raise SourceImageError(
                "download_failed", f"refusing to fetch a {server_text(scheme, limit=20)!r} URL: only http(s)"
            )
        return self._from_base64(source)

    # ---- network --------------------------------------------------------------------------------------

    def _download(self, url: str, deadline: float) -> bytes:
        first = _shown(url)
        for _ in range(MAX_REDIRECTS + 1):
            status, location, data = self._get(url, deadline)
            if status in REDIRECTS:
                if not location:
                    raise SourceImageError("download_failed", f"{_shown(url)}: HTTP {status}, no Location")
                url = urljoin(url, location)
                continue
            if status != 200:
                raise SourceImageError("download_failed", f"{_shown(url)}: HTTP {status}")
            logger.debug("downloaded %d bytes from %s", len(data), _shown(url))
            return data
        raise SourceImageError("download_failed", f"{first}: more than {MAX_REDIRECTS} redirects")

    def _address(self, host: str, port: int, deadline: float, shown: str) -> str:
        """The address to connect to: every address `host` resolves to must be allowed."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
            addresses = [str(literal)]
        except ValueError:
            future = _RESOLVERS.submit(self.resolver, host, port)
            try:
                addresses = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise SourceImageError("download_failed", f"{shown}: name lookup slower than the deadline") \
                    from None
            except (OSError, UnicodeError) as exc:
                raise SourceImageError("download_failed", f"{shown}: name lookup failed ({exc})") from exc
        if not addresses:
            raise SourceImageError("download_failed", f"{shown}: the name resolves to no address")
        for text in addresses:
            if not self.address_allowed(ipaddress.ip_address(text)):
                raise SourceImageError(
                    "download_failed",
                    f"{shown}: refused, {host} resolves to the non-public address {text} "
                    "(set allow_private_sources: true to fetch from private networks)",
                )
        return addresses[0]

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        """One hop: (status, Location, body). The body is read only for a 200."""
        shown = _shown(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise SourceImageError("download_failed", f"{shown}: redirected to a non-http(s) URL")
        try:
            host, port = parts.hostname or "", parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise SourceImageError("download_failed", f"{shown}: bad URL ({exc})") from exc
        if not host:
            raise SourceImageError("download_failed", f"{shown}: no host in the URL")
        address = self._address(host, port, deadline, shown)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SourceImageError("download_failed", f"{shown}: slower than {self.timeout} s")
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(host, address, port, timeout=remaining)
        # The socket timeout is per read: a host dripping bytes (headers included) would never trip it.
        watchdog = threading.Timer(remaining, conn.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            response = conn.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            data = self._read_body(response, deadline, shown)
            if conn.aborted:  # the watchdog's shutdown reads as the end of a close-delimited body
                raise SourceImageError("download_failed", f"{shown}: slower than {self.timeout} s")
            return 200, None, data
        except SourceImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if conn.aborted or time.monotonic() >= deadline:
                raise SourceImageError("download_failed", f"{shown}: slower than {self.timeout} s") from exc
            raise SourceImageError("download_failed", f"{shown}: {type(exc).__name__}") from exc
        finally:
            watchdog.cancel()
            conn.close()

    def _read_body(self, response: http.client.HTTPResponse, deadline: float, shown: str) -> bytes:
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise SourceImageError("download_failed", f"{shown}: {declared.strip()} bytes > {self.max_bytes}")
        data = bytearray()
        while chunk := response.read1(_CHUNK):
            data += chunk
            if len(data) > self.max_bytes:
                raise SourceImageError("download_failed", f"{shown}: more than {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise SourceImageError("download_failed", f"{shown}: slower than {self.timeout} s")
        return bytes(data)

    # ---- bytes -> image -------------------------------------------------------------------------------

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
        """Bytes to a loaded RGB/RGBA image, refusing anything over max_pixels before decoding it."""
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
        return rgb_or_rgba(image)


# ---- image modes --------------------------------------------------------------------------------------

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> L, scaled rather than clipped (PIL's convert clips at 255)."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(array.max()) if array.size else 0.0
    if image.mode == "F" and 0.0 < peak <= 1.0:
        scale = 255.0
    elif image.mode.startswith("I;16") or peak > 255:
        scale = 255.0 / 65535.0 if peak <= 65535 else 255.0 / peak
    else:
        scale = 1.0
    return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")


def _unpremultiplied(image: Image.Image) -> Image.Image:
    """La / RGBa (colour already multiplied by alpha) -> LA / RGBA: PIL cannot convert La at all."""
    array = np.asarray(image, dtype=np.float64)
    alpha = array[..., -1:]
    colour = np.where(alpha > 0, array[..., :-1] * 255.0 / np.maximum(alpha, 1), 0)
    out = np.concatenate([np.clip(colour, 0, 255), alpha], axis=-1).astype(np.uint8)
    if out.shape[-1] == 2:  # LA -> RGBA
        out = np.concatenate([out[..., :1]] * 3 + [out[..., 1:]], axis=-1)
    return Image.fromarray(out, "RGBA")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's plain convert copies LAB channels as if they were RGB: a colour transform is needed.
    from PIL import ImageCms

    try:
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    except ImageCms.PyCMSError as exc:
        raise ValueError(f"LAB colour transform failed: {exc}") from exc


def rgb_or_rgba(image: Image.Image) -> Image.Image:
    """Any mode PIL decodes -> RGB, or RGBA when the image carries alpha. SourceImageError if impossible."""
    if image.mode in ("RGB", "RGBA"):
        return image
    source_format = image.format
    try:
        if image.mode in ("La", "RGBa"):
            converted = _unpremultiplied(image)
        elif image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
            converted = image.convert("RGBA")
        elif image.mode == "F" or image.mode.startswith("I"):
            converted = _scaled_to_8_bits(image).convert("RGB")
        elif image.mode == "LAB":
            converted = _lab_to_rgb(image)
        else:
            converted = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise SourceImageError("parse_failed", f"image mode {image.mode} cannot be converted: {exc}") from exc
    converted.format = source_format
    return converted


def _shown(url: str) -> str:
    """Host and path only: the query of a presigned URL is a credential."""
    parts = urlsplit(url)
    return server_text(f"{parts.scheme}://{parts.netloc}{parts.path}", limit=200)
