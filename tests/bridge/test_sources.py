"""SourceFetcher over real HTTP (the local horde's object store) and from base64, with its guards."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from bridge.images import encode_webp, encode_webp_base64
from bridge.sources import SourceFetcher, SourceImageError
from local_horde import CORRUPT_IMAGE_BYTES, LocalHorde, huge_image_bytes


def png(size: tuple[int, int] = (40, 30), color: str = "blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def horde() -> Iterator[LocalHorde]:
    with LocalHorde() as local:
        yield local


@pytest.fixture
def fetcher() -> SourceFetcher:
    return SourceFetcher(timeout=2.0, max_bytes=256 * 1024, max_pixels=1024 * 1024, allow_private=True)


def kind_of(fetcher: SourceFetcher, source: str) -> str:
    with pytest.raises(SourceImageError) as err:
        fetcher.fetch(source)
    return err.value.kind


# ---- URLs ---------------------------------------------------------------------------------------------


def test_presigned_url_is_downloaded_and_decoded(horde: LocalHorde, fetcher: SourceFetcher) -> None:
    image = fetcher.fetch(horde.host_image(encode_webp(Image.new("RGBA", (48, 32), (255, 0, 0, 128)))))
    assert image.size == (48, 32) and image.mode == "RGBA"
    assert image.getpixel((5, 5))[3] in range(120, 137)  # alpha survives (inpainting masks live there)


def test_http_errors_are_download_failures(horde: LocalHorde, fetcher: SourceFetcher) -> None:
    missing = horde.registry.store.presign("GET", "no/such/object")
    assert kind_of(fetcher, missing) == "download_failed"  # 404 NoSuchKey
    url = horde.host_image(png())
    horde.faults.http_error("/r2/*", 503, method="GET")
    assert kind_of(fetcher, url) == "download_failed"
    assert fetcher.fetch(url).size == (40, 30)  # the fault was one-shot: the same URL now works


def test_timeout_and_dropped_connection(horde: LocalHorde) -> None:
    fetcher = SourceFetcher(timeout=0.3, allow_private=True)
    url = horde.host_image(png())
    horde.faults.hang("/r2/*", 3.0)
    started = time.monotonic()
    assert kind_of(fetcher, url) == "download_failed"
    assert time.monotonic() - started < 2.5
    horde.faults.drop("/r2/*")
    assert kind_of(fetcher, url) == "download_failed"


def test_declared_size_over_the_cap_is_refused(horde: LocalHorde, fetcher: SourceFetcher) -> None:
    noise = Image.effect_noise((512, 512), 100).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > fetcher.max_bytes
    with pytest.raises(SourceImageError) as err:
        fetcher.fetch(horde.host_image(buffer.getvalue()))
    assert err.value.kind == "download_failed" and "bytes" in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.org/a.png",
        "gopher://x/y",
        "javascript:alert(1)",
        "FILE:///etc/hosts",
    ],
)
def test_only_http_schemes_are_fetched(fetcher: SourceFetcher, url: str) -> None:
    with pytest.raises(SourceImageError) as err:
        fetcher.fetch(url)
    assert err.value.kind == "download_failed" and "only http(s)" in str(err.value)


class _Streaming(BaseHTTPRequestHandler):
    """Close-delimited bodies with no Content-Length: only the streaming cap and deadline can stop them."""

    protocol_version = "HTTP/1.0"
    drip = False

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(400):
                self.wfile.write(b"\0" * (16 if self.drip else 64 * 1024))
                self.wfile.flush()
                if self.drip:
                    time.sleep(0.05)
        except OSError:
            pass  # the client gave up: that is the point

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def streaming() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Streaming)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_undeclared_size_is_capped_while_streaming(streaming: str, fetcher: SourceFetcher) -> None:
    with pytest.raises(SourceImageError) as err:
        fetcher.fetch(streaming + "/big.png")
    assert err.value.kind == "download_failed" and "more than" in str(err.value)


def test_slow_drip_hits_the_total_deadline(streaming: str) -> None:
    _Streaming.drip = True
    try:
        fetcher = SourceFetcher(timeout=0.5, allow_private=True)
        started = time.monotonic()
        with pytest.raises(SourceImageError) as err:
            fetcher.fetch(streaming + "/slow.png")
        assert time.monotonic() - started < 2.0  # each read is quick, so only the deadline ends it
        assert err.value.kind == "download_failed" and "slower than" in str(err.value)
    finally:
        _Streaming.drip = False


def test_unreachable_host(fetcher: SourceFetcher) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert kind_of(fetcher, f"http://127.0.0.1:{port}/x.png") == "download_failed"


# ---- base64 -------------------------------------------------------------------------------------------


def test_raw_base64_and_data_prefix(fetcher: SourceFetcher) -> None:
    raw = encode_webp_base64(Image.new("RGB", (20, 10), "green"), quality=50)
    assert fetcher.fetch(raw).size == (20, 10)
    assert fetcher.fetch(f"data:image/webp;base64,{raw}").size == (20, 10)
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    assert fetcher.fetch(wrapped).size == (20, 10)  # MIME line breaks are tolerated
    assert fetcher.fetch(raw.rstrip("=")).size == (20, 10)  # so is missing padding


def test_bad_base64_and_non_images_are_parse_failures(fetcher: SourceFetcher) -> None:
    assert kind_of(fetcher, "this is not base64 !!") == "parse_failed"
    assert kind_of(fetcher, base64.b64encode(b"hello, not an image").decode()) == "parse_failed"
    assert kind_of(fetcher, base64.b64encode(CORRUPT_IMAGE_BYTES).decode()) == "parse_failed"
    assert kind_of(fetcher, "") == "parse_failed"


def test_truncated_image_is_a_parse_failure(fetcher: SourceFetcher) -> None:
    data = png((200, 200))
    assert kind_of(fetcher, base64.b64encode(data[: len(data) // 2]).decode()) == "parse_failed"


def test_formats_that_need_external_helpers_are_not_opened(fetcher: SourceFetcher) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert kind_of(fetcher, base64.b64encode(eps).decode()) == "parse_failed"


def test_oversized_base64_is_refused_before_decoding(fetcher: SourceFetcher) -> None:
    huge = "A" * (fetcher.max_bytes * 2)
    assert kind_of(fetcher, huge) == "download_failed"


# ---- decompression bombs ------------------------------------------------------------------------------


def test_bomb_is_refused_from_its_header(horde: LocalHorde, fetcher: SourceFetcher) -> None:
    bomb = huge_image_bytes()  # 20000x20000 pixels in a few kB
    limit_before = Image.MAX_IMAGE_PIXELS
    started = time.monotonic()
    for source in (horde.host_image(bomb), base64.b64encode(bomb).decode()):
        with pytest.raises(SourceImageError) as err:
            fetcher.fetch(source)
        assert err.value.kind == "parse_failed"
    assert time.monotonic() - started < 2.0  # nothing was decoded
    assert limit_before == Image.MAX_IMAGE_PIXELS  # no global PIL state touched


def test_max_pixels_is_the_fetchers_own_limit() -> None:
    strict = SourceFetcher(max_pixels=1000)
    data = base64.b64encode(png((40, 30))).decode()  # 1200 pixels
    with pytest.raises(SourceImageError) as err:
        strict.fetch(data)
    assert err.value.kind == "parse_failed" and "40x30" in str(err.value)
    assert SourceFetcher(max_pixels=1200).fetch(data).size == (40, 30)


# ---- webp helpers -------------------------------------------------------------------------------------


def test_encode_webp_converts_modes_and_keeps_alpha(fetcher: SourceFetcher) -> None:
    palette = Image.new("P", (16, 16), 0)
    palette.info["transparency"] = 0
    decoded = fetcher.decode(encode_webp(palette))
    assert decoded.format == "WEBP" and decoded.mode == "RGBA"
    assert fetcher.decode(encode_webp(Image.new("L", (16, 16), 128))).mode == "RGB"
    small = encode_webp(Image.effect_noise((64, 64), 50).convert("RGB"), quality=10)
    large = encode_webp(Image.effect_noise((64, 64), 50).convert("RGB"), quality=95)
    assert len(small) < len(large)
    with pytest.raises(ValueError):
        encode_webp(Image.new("RGB", (4, 4)), quality=101)


def test_source_image_error_kinds_are_closed() -> None:
    with pytest.raises(ValueError):
        SourceImageError("network", "x")
