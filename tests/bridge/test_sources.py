"""SourceFetcher over real HTTP (the local horde's object store) and from base64, with its guards."""

from __future__ import annotations

import base64
import io
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from bridge.images import encode_webp, encode_webp_base64
from bridge.sources import SourceFetcher, SourceImageError, is_public_address
from local_horde import CORRUPT_IMAGE_BYTES, LocalHorde, RecordingHost, huge_image_bytes


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


# ---- no SSRF (issue 17) -------------------------------------------------------------------------------
# The tests' whole internet is loopback: 127.0.0.1 (the local horde) stands for a public host, every other
# address keeps the real rule. RecordingHost listens on 127.0.0.2: a private address never to be reached.


def loopback_is_the_internet(address: Any) -> bool:
    return str(address) == "127.0.0.1" or is_public_address(address)


@pytest.fixture
def guarded() -> SourceFetcher:
    return SourceFetcher(timeout=2.0, address_allowed=loopback_is_the_internet)


@pytest.fixture
def private_host() -> Iterator[RecordingHost]:
    with RecordingHost(body=png(), content_type="image/png") as host:
        yield host


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254",
        "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "::1", "fe80::1", "fc00::1", "fd12::1",
        "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:c0a8:101::1", "::",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_by_default_the_local_network_is_off_limits(horde: LocalHorde) -> None:
    url = horde.host_image(png())
    with pytest.raises(SourceImageError) as err:
        SourceFetcher(timeout=2.0).fetch(url)
    assert err.value.kind == "download_failed" and "allow_private_sources" in str(err.value)
    assert SourceFetcher(timeout=2.0, allow_private=True).fetch(url).size == (40, 30)


def test_private_hosts_are_never_contacted(guarded: SourceFetcher, private_host: RecordingHost) -> None:
    assert kind_of(guarded, private_host.url("/camera.png")) == "download_failed"
    by_name = SourceFetcher(timeout=2.0, address_allowed=loopback_is_the_internet,
                            resolver=lambda host, port: ["127.0.0.2"])
    assert kind_of(by_name, f"http://router.lan:{private_host.port}/admin.png") == "download_failed"
    assert private_host.seen == []


@pytest.mark.parametrize("target", ["private", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x",
                                    "http://10.0.0.1/x", "http://100.64.0.1/x", "file:///etc/passwd"])
def test_every_redirect_hop_is_checked(
    horde: LocalHorde, guarded: SourceFetcher, private_host: RecordingHost, target: str
) -> None:
    url = horde.host_image(png(), "jump.png")
    location = private_host.url("/lan.png") if target == "private" else target
    horde.faults.redirect("/r2/hosted/jump.png", location, status=302, method="GET")
    with pytest.raises(SourceImageError) as err:
        guarded.fetch(url)
    assert err.value.kind == "download_failed"
    assert private_host.seen == []
    horde.faults.redirect("/r2/hosted/jump.png", horde.host_image(png((8, 8)), "public.png"), method="GET")
    assert guarded.fetch(url).size == (8, 8)  # a redirect to a public host is followed


def test_the_connection_goes_to_the_checked_address(horde: LocalHorde, private_host: RecordingHost) -> None:
    """DNS rebinding: a name that answers public first and private second is looked up once per hop."""
    answers = [["127.0.0.1"], ["127.0.0.2"]]
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[min(len(lookups) - 1, 1)]

    fetcher = SourceFetcher(timeout=2.0, address_allowed=loopback_is_the_internet, resolver=rebinding)
    port = horde.base_url.rsplit(":", 1)[1]
    url = horde.host_image(png()).replace(f"127.0.0.1:{port}", f"images.example:{port}")
    assert fetcher.fetch(url).size == (40, 30)
    assert lookups == ["images.example"] and private_host.seen == []
    mixed = SourceFetcher(timeout=2.0, address_allowed=loopback_is_the_internet,
                          resolver=lambda host, port: ["127.0.0.1", "10.1.1.1"])
    assert kind_of(mixed, url) == "download_failed"  # one private answer is enough to refuse


# ---- one deadline for the whole request -----------------------------------------------------------------


def test_trickled_headers_end_at_the_deadline(horde: LocalHorde, fetcher: SourceFetcher) -> None:
    url = horde.host_image(png(), "trickle.png")
    horde.faults.trickle("/r2/hosted/trickle.png", seconds=20, interval_s=0.05)
    started = time.monotonic()
    with pytest.raises(SourceImageError) as err:
        SourceFetcher(timeout=0.8, allow_private=True).fetch(url)
    assert time.monotonic() - started < 2.0
    assert err.value.kind == "download_failed" and "slower than" in str(err.value)


def test_a_jobs_deadline_shortens_the_fetch(horde: LocalHorde) -> None:
    url = horde.host_image(png(), "late.png")
    horde.faults.hang("/r2/hosted/late.png", 10)
    started = time.monotonic()
    with pytest.raises(SourceImageError):
        SourceFetcher(timeout=10, allow_private=True).fetch(url, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 1.5


def test_a_slow_name_lookup_ends_at_the_deadline() -> None:
    fetcher = SourceFetcher(timeout=0.5, address_allowed=lambda a: True,
                            resolver=lambda host, port: time.sleep(3) or ["8.8.8.8"])
    started = time.monotonic()
    with pytest.raises(SourceImageError, match="name lookup"):
        fetcher.fetch("http://slow-dns.example/x.png")
    assert time.monotonic() - started < 1.5


# ---- every mode PIL decodes ----------------------------------------------------------------------------


def saved(mode: str, fmt: str, color: Any = None) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 12), color).save(buffer, format=fmt)
    return buffer.getvalue()


def premultiplied_tiff(mode: str) -> bytes:
    """A TIFF whose alpha is marked associated (ExtraSamples 1): PIL decodes LA data as mode "La"."""
    data = saved(mode, "TIFF", (100, 128) if mode == "LA" else (100, 50, 0, 128))
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"
    assert unassociated in data
    return data.replace(unassociated, b"\x52\x01\x03\x00\x01\x00\x00\x00\x01\x00")


MODE_SOURCES = {
    "1 png": saved("1", "PNG", 1), "L png": saved("L", "PNG", 90), "LA png": saved("LA", "PNG", (90, 128)),
    "P png": saved("P", "PNG", 3), "I;16 png": saved("I;16", "PNG", 40000), "RGBA png": saved("RGBA", "PNG"),
    "CMYK jpeg": saved("CMYK", "JPEG", (0, 0, 0, 0)), "CMYK tiff": saved("CMYK", "TIFF", (0, 255, 0, 0)),
    "YCbCr tiff": saved("YCbCr", "TIFF", (128, 128, 128)), "LAB tiff": saved("LAB", "TIFF", (128, 128, 128)),
    "I tiff": saved("I", "TIFF", 70000), "F tiff": saved("F", "TIFF", 0.5), "PA tiff": saved("PA", "TIFF"),
    "I;16B tiff": saved("I;16B", "TIFF", 300), "La tiff": premultiplied_tiff("LA"),
    "RGBa tiff": premultiplied_tiff("RGBA"), "P gif": saved("P", "GIF", 7), "1 bmp": saved("1", "BMP", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODE_SOURCES))
def test_every_decodable_mode_becomes_rgb_or_rgba(
    horde: LocalHorde, fetcher: SourceFetcher, name: str
) -> None:
    image = fetcher.fetch(horde.host_image(MODE_SOURCES[name]))
    assert image.size == (16, 12)
    assert image.mode == ("RGBA" if name.split()[0] in ("LA", "La", "PA", "RGBA", "RGBa") else "RGB")
    image.convert("L")  # what masks and pipelines do next works


def test_scaled_not_clipped_and_alpha_unpremultiplied(fetcher: SourceFetcher) -> None:
    sixteen_bit = fetcher.decode(MODE_SOURCES["I;16 png"]).getpixel((0, 0))
    assert sixteen_bit[0] in (155, 156)  # 40000 / 65535 of full scale, not 255 (clipped)
    assert fetcher.decode(MODE_SOURCES["La tiff"]).getpixel((0, 0)) == (199, 199, 199, 128)
    assert fetcher.decode(MODE_SOURCES["LAB tiff"]).getpixel((0, 0))[0] in range(110, 130)  # grey, not blue


def test_https_is_verified_against_the_name_while_pinned_to_the_address(tmp_path, monkeypatch) -> None:
    """TLS to the checked address: the certificate must still match the host name the URL gave."""
    import shutil
    import ssl
    import subprocess

    import bridge.sources as sources

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Png", (_Png,), {}))
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    server.socket = server_side.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(sources._PinnedHTTPS, "_context_cache", ssl.create_default_context(cafile=cert))
        fetcher = SourceFetcher(timeout=3.0, address_allowed=lambda a: True,
                                resolver=lambda host, port: ["127.0.0.1"])
        port = server.server_address[1]
        assert fetcher.fetch(f"https://images.test:{port}/x.png").size == (40, 30)
        assert kind_of(fetcher, f"https://elsewhere.test:{port}/x.png") == "download_failed"  # wrong name
    finally:
        server.shutdown()
        server.server_close()


class _Png(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
