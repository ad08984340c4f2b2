"""Loading user images safely: data URLs, local files under an allowed root, allowed domains."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pagedllm.multimodal import media
from pagedllm.multimodal.media import MediaError, load_image


def noise_image(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds no pixels: what a decompression bomb looks like
    before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


# --- what a client sends inline ---------------------------------------------------------------

def test_png_data_url_decodes_to_the_same_rgb_pixels() -> None:
    image = noise_image()
    loaded = load_image(data_url(encode(image)))
    assert loaded.mode == "RGB" and same_pixels(loaded, image)


def test_jpeg_data_url_and_wrapped_base64() -> None:
    jpeg = encode(noise_image(80, 60), "JPEG")
    loaded = load_image(data_url(jpeg, "image/jpeg"))
    assert (loaded.mode, loaded.size) == ("RGB", (80, 60))
    b64 = base64.encodebytes(jpeg).decode()  # MIME style: a newline every 76 characters
    assert "\n" in b64
    assert same_pixels(load_image(f"data:image/jpeg;base64,{b64}"), loaded)


def test_transparency_is_composited_onto_white() -> None:
    clear = Image.new("RGBA", (30, 20), (10, 200, 30, 0))
    loaded = load_image(encode(clear))
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)


def test_pil_images_and_raw_bytes_are_accepted() -> None:
    image = noise_image()
    assert same_pixels(load_image(image), image)
    assert same_pixels(load_image(encode(image, "BMP")), image)
    assert same_pixels(load_image(bytearray(encode(image))), image)
    webp = encode(image, "WEBP")
    assert same_pixels(load_image(webp), Image.open(io.BytesIO(webp)).convert("RGB"))
    assert load_image(image.convert("L")).mode == "RGB"


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,@@not-base64@@", "base64"),
    ("data:image/png;base64,iVBORw0KGgo", "base64"),  # bad padding
    ("data:image/png,iVBORw0KGgo=", "malformed data URL"),  # not base64-encoded
    ("data:text/plain;base64,aGVsbG8=", "malformed data URL"),
    ("data:image/png;base64", "malformed data URL"),  # no comma
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "supported format"),  # "hello world"
])
def test_bad_data_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load_image(url)


def test_non_image_and_unsupported_format_bytes_are_refused() -> None:
    with pytest.raises(MediaError, match="supported format"):
        load_image(b"GIF89a but not really")
    with pytest.raises(MediaError, match="supported format"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # EPS: Ghostscript
    with pytest.raises(MediaError, match="supported format"):
        load_image(b"")


def test_truncated_and_corrupt_images_fail_here_not_later() -> None:
    png = encode(noise_image(200, 150))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(data_url(png[: len(png) // 2]))
    jpeg = encode(noise_image(200, 150), "JPEG")
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(jpeg[: len(jpeg) * 2 // 3])
    corrupt = bytearray(png)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 64] = bytes(64)  # zeroed compressed data inside IDAT
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(bytes(corrupt))


def test_size_limits() -> None:
    with pytest.raises(MediaError, match="too large"):
        load_image(png_header_only(100_000, 100_000))  # refused from the header alone
    with pytest.raises(MediaError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(MediaError, match="aspect ratio"):
        load_image(encode(Image.new("RGB", (402, 2))))
    assert load_image(encode(Image.new("RGB", (400, 2)))).size == (400, 2)  # 200:1 is fine


def test_pixel_and_byte_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 40 * 40)
    with pytest.raises(MediaError, match="more than 1,600 pixels"):
        load_image(encode(noise_image(41, 40)))
    assert load_image(encode(noise_image(40, 40))).size == (40, 40)
    png = encode(noise_image(40, 40))
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", len(png) - 1)
    with pytest.raises(MediaError, match="bytes, more than the limit"):
        load_image(data_url(png))
    with pytest.raises(MediaError, match="bytes, more than the limit"):
        load_image(png)


@pytest.mark.parametrize("source", [
    "ftp://example.com/cat.png", "gopher://example.com/cat.png", "javascript:alert(1)",
    "/etc/passwd", "cat.png", "", "HTTPS//example.com/cat.png",
])
def test_other_schemes_are_refused(source: str) -> None:
    with pytest.raises(MediaError, match="unsupported image URL"):
        load_image(source, allowed_local_media_path="/", allowed_media_domains=["example.com"])


def test_other_source_types_are_refused() -> None:
    with pytest.raises(MediaError, match="got int"):
        load_image(123)  # type: ignore[arg-type]


# --- local files ------------------------------------------------------------------------------

@pytest.fixture
def media_dirs() -> Iterator[tuple[Path, Path]]:
    """(allowed root, a sibling outside it), each holding an image."""
    with tempfile.TemporaryDirectory(prefix="qmm_") as folder:
        root, outside = Path(folder) / "allowed", Path(folder) / "secret"
        (root / "sub").mkdir(parents=True)
        outside.mkdir()
        noise_image(seed=1).save(root / "in.png")
        noise_image(seed=2).save(root / "sub" / "my cat.png")
        noise_image(seed=3).save(outside / "out.png")
        yield root, outside


def file_url(path: Path | str) -> str:
    return "file://" + urllib.request.pathname2url(str(path))


def test_file_inside_the_allowed_path_loads(media_dirs: tuple[Path, Path]) -> None:
    root, _ = media_dirs
    loaded = load_image(file_url(root / "in.png"), allowed_local_media_path=str(root))
    assert same_pixels(loaded, noise_image(seed=1))
    nested = load_image(file_url(root / "sub" / "my cat.png"), allowed_local_media_path=str(root))
    assert same_pixels(nested, noise_image(seed=2))
    dotted = f"file://{root}/sub/../in.png"  # '..' that stays inside is fine
    assert same_pixels(load_image(dotted, allowed_local_media_path=str(root)), loaded)
    localhost = f"file://localhost{root}/in.png"
    assert same_pixels(load_image(localhost, allowed_local_media_path=str(root) + "/"), loaded)


def test_files_are_refused_without_an_allowed_path(media_dirs: tuple[Path, Path]) -> None:
    root, _ = media_dirs
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        load_image(file_url(root / "in.png"))


def test_files_outside_the_allowed_path_are_refused(media_dirs: tuple[Path, Path]) -> None:
    root, outside = media_dirs
    os.symlink(outside / "out.png", root / "link.png")  # a symlink escaping the root
    os.symlink(outside, root / "linkdir")
    escapes = [file_url(outside / "out.png"), f"file://{root}/../secret/out.png",
               file_url(root / "link.png"), file_url(root / "linkdir" / "out.png"),
               f"file://{root}sibling/x.png", "file:///etc/passwd"]
    for url in escapes:
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            load_image(url, allowed_local_media_path=str(root))


def test_missing_and_special_files(media_dirs: tuple[Path, Path]) -> None:
    root, _ = media_dirs
    for url in (file_url(root / "nope.png"), file_url(root / "sub")):
        with pytest.raises(MediaError, match="not a regular file"):
            load_image(url, allowed_local_media_path=str(root))
    with pytest.raises(MediaError, match="remote host"):
        load_image(f"file://fileserver{root}/in.png", allowed_local_media_path=str(root))
    (root / "notes.png").write_text("not an image")
    with pytest.raises(MediaError, match="supported format"):
        load_image(file_url(root / "notes.png"), allowed_local_media_path=str(root))


def test_allowed_root_behind_a_symlink(media_dirs: tuple[Path, Path]) -> None:
    root, outside = media_dirs
    alias = outside / "alias"
    os.symlink(root, alias)
    loaded = load_image(file_url(alias / "in.png"), allowed_local_media_path=str(alias))
    assert same_pixels(loaded, noise_image(seed=1))


def test_large_files_are_refused(media_dirs: tuple[Path, Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = media_dirs
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 100)
    with pytest.raises(MediaError, match="more than the limit of 100 bytes"):
        load_image(file_url(root / "in.png"), allowed_local_media_path=str(root))


# --- remote URLs ------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("url, domains", [
    ("http://example.com/cat.png", None),
    ("https://example.com/cat.png", []),
    ("http://evil.com/cat.png", ["example.com"]),
    ("http://cdn.example.com/cat.png", ["example.com"]),  # exact host names, no subdomains
    ("http://example.com@evil.com/cat.png", ["example.com"]),  # user info is not the host
    ("http://169.254.169.254/latest/meta-data", ["example.com"]),
])
def test_hosts_not_allowed_are_refused_offline(no_network: None, url: str,
                                               domains: list[str] | None) -> None:
    with pytest.raises(MediaError, match="--allowed-media-domains"):
        load_image(url, allowed_media_domains=domains)


class ImageServer:
    """A local HTTP server with canned routes: path -> (status, headers, body, delay)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                status, headers, body, delay = routes.get(self.path, (404, {}, b"", 0.0))
                time.sleep(delay)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, path: str, body: bytes, status: int = 200, delay: float = 0.0,
            headers: dict[str, str] | None = None) -> str:
        if headers is None:
            headers = {"Content-Type": "image/png", "Content-Length": str(len(body))}
        self.routes[path] = (status, headers, body, delay)
        return self.base + path


@pytest.fixture
def image_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageServer]:
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = ImageServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


LOCAL = ["127.0.0.1"]


def test_allowed_domain_is_fetched(image_server: ImageServer) -> None:
    image = noise_image(seed=4)
    url = image_server.add("/cat.png", encode(image))
    loaded = load_image(url, allowed_media_domains=LOCAL)
    assert loaded.mode == "RGB" and same_pixels(loaded, image)
    # the host check ignores case and a trailing dot in the allow-list
    assert same_pixels(load_image(url, allowed_media_domains=["127.0.0.1."]), image)


def test_redirects_stay_on_allowed_hosts(image_server: ImageServer) -> None:
    image = noise_image(seed=5)
    target = image_server.add("/cat.png", encode(image))
    same_host = image_server.add("/moved", b"", 302, headers={"Location": "/cat.png"})
    assert same_pixels(load_image(same_host, allowed_media_domains=LOCAL), image)
    elsewhere = target.replace("127.0.0.1", "localhost")
    away = image_server.add("/away", b"", 302, headers={"Location": elsewhere})
    image_server.hits.clear()
    with pytest.raises(MediaError, match="'localhost' is not allowed"):
        load_image(away, allowed_media_domains=LOCAL)
    assert image_server.hits == ["/away"]  # the redirect target was never requested


def test_http_errors_and_bad_content(image_server: ImageServer) -> None:
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(image_server.base + "/missing.png", allowed_media_domains=LOCAL)
    url = image_server.add("/page.html", b"<html>hello</html>")
    with pytest.raises(MediaError, match="supported format"):
        load_image(url, allowed_media_domains=LOCAL)
    png = encode(noise_image(200, 150))
    url = image_server.add("/half.png", png[: len(png) // 2])
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(url, allowed_media_domains=LOCAL)


def test_downloads_are_capped(image_server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    body = encode(noise_image(100, 100))
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 1000)
    declared = image_server.add("/big.png", body)
    with pytest.raises(MediaError, match="more than the limit of 1,000 bytes"):
        load_image(declared, allowed_media_domains=LOCAL)
    undeclared = image_server.add("/stream.png", body, headers={})  # no Content-Length: read on
    with pytest.raises(MediaError, match="more than the limit of 1,000 bytes"):
        load_image(undeclared, allowed_media_domains=LOCAL)


def test_slow_servers_time_out(image_server: ImageServer) -> None:
    url = image_server.add("/slow.png", encode(noise_image()), delay=1.0)
    started = time.monotonic()
    with pytest.raises(MediaError, match="cannot fetch"):
        load_image(url, allowed_media_domains=LOCAL, timeout=0.2)
    assert time.monotonic() - started < 1.0


def test_unreachable_allowed_host_is_a_media_error(image_server: ImageServer) -> None:
    port = urllib.parse.urlsplit(image_server.base).port
    image_server.server.shutdown()
    image_server.server.server_close()
    with pytest.raises(MediaError, match="cannot fetch"):
        load_image(f"http://127.0.0.1:{port}/cat.png", allowed_media_domains=LOCAL)
