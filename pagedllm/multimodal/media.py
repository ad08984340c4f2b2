"""Images from what users send: PIL images, raw bytes, ``data:`` URLs, and, when the server allows
them, ``file://`` and ``http(s)://`` URLs.

Everything a client sends is untrusted: local files are read only under
``--allowed-local-media-path`` (symlinks resolved), remote images are fetched only from
``--allowed-media-domains`` (redirects included), downloads are capped in size and time, and an
image is fully decoded here so that a corrupt one fails now, as a ``MediaError`` (a ValueError)
whose message the server returns as HTTP 400, never later inside the engine.

Unlike vLLM, which fetches from any domain unless ``--allowed-media-domains`` is set, pagedllm
fetches nothing remote unless the domain is listed: a server should not be a proxy into its own
network by default.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import logging
import os
import time
import urllib.error
import urllib.request
from email.message import Message
from typing import IO
from urllib.parse import urlsplit

from PIL import Image

from pagedllm.multimodal.image_processor import to_rgb
from pagedllm.multimodal.image_tokens import MAX_ASPECT_RATIO

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # vLLM's VLLM_IMAGE_FETCH_TIMEOUT
MAX_MEDIA_BYTES = 32 * 1024 * 1024  # encoded bytes, from any source
MAX_IMAGE_PIXELS = 89_478_485  # decoded width * height: Pillow's own decompression-bomb threshold
# The formats chat APIs accept; Pillow's rarer decoders (EPS runs Ghostscript) stay unreachable.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_CHUNK = 1 << 16

ImageSource = Image.Image | bytes | bytearray | str


class MediaError(ValueError):
    """An image that cannot be used; the message is safe to return to the client (HTTP 400)."""


def load_image(source: ImageSource, *, allowed_local_media_path: str | None = None,
               allowed_media_domains: list[str] | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> Image.Image:
    """A fully decoded RGB image from a PIL image, encoded bytes or a URL string.

    ``file://`` URLs need ``allowed_local_media_path`` (the file's real path must lie inside
    it); ``http(s)://`` URLs need their host in ``allowed_media_domains``. Blocking (network and
    decoding): call it from a worker thread in an async server. Raises MediaError.
    """
    if isinstance(source, Image.Image):
        return _finish(source)
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source))
    if not isinstance(source, str):
        raise MediaError(f"an image must be a URL string, bytes or a PIL image, "
                         f"got {type(source).__name__}")
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme == "data":
        data = _read_data_url(source)
    elif scheme == "file":
        data = _read_file_url(source, allowed_local_media_path)
    elif scheme in ("http", "https"):
        data = _fetch(source, allowed_media_domains or [], timeout)
    else:
        raise MediaError(f"unsupported image URL {_short(source)}: use a data:image/...;base64 "
                         f"URL, or an http(s):// or file:// URL where the server allows them")
    return _decode(data)


def _short(text: str, limit: int = 80) -> str:
    """A URL for an error message: data URLs can be megabytes long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_length(size: int, what: str) -> None:
    if size > MAX_MEDIA_BYTES:
        raise MediaError(f"{what} is {size:,} bytes, more than the limit of "
                         f"{MAX_MEDIA_BYTES:,} bytes")


def _read_data_url(url: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or not params[0].startswith("image/") or "base64" not in params[1:]:
        raise MediaError(f"malformed data URL {_short(url)}: expected "
                         f"data:image/<format>;base64,<data>")
    payload = "".join(payload.split())  # clients may wrap base64 lines
    _check_length(len(payload) * 3 // 4, "the data URL's image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"the data URL's base64 is malformed: {err}") from err


def _read_file_url(url: str, allowed_root: str | None) -> bytes:
    if allowed_root is None:
        raise MediaError("file:// image URLs are disabled; the server allows them with "
                         "--allowed-local-media-path")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file:// URL {_short(url)} names a remote host")
    path = urllib.request.url2pathname(parts.path)
    root = os.path.realpath(allowed_root)
    real = os.path.realpath(path)  # symlinks and '..' resolved before the check
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"image file {path!r} is outside the allowed local media path")
    if not os.path.isfile(real):
        raise MediaError(f"image file {path!r} does not exist or is not a regular file")
    _check_length(os.path.getsize(real), f"image file {path!r}")
    with open(real, "rb") as f:
        return f.read(MAX_MEDIA_BYTES + 1)


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, so a listed domain cannot bounce the server
    to an internal address."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> urllib.request.Request | None:
        try:
            _check_host(newurl, self.allowed)
        except MediaError:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_host(url: str, allowed: set[str]) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise MediaError(f"image URL {_short(url)} is not an http(s) URL with a host")
    if host not in allowed:
        listed = f" ({', '.join(sorted(allowed))})" if allowed else ""
        raise MediaError(f"image URL host {host!r} is not allowed: the server fetches images "
                         f"only from --allowed-media-domains{listed}")
    return host


def _fetch(url: str, domains: list[str], timeout: float) -> bytes:
    """GET an allowed URL: at most MAX_MEDIA_BYTES, within ``timeout`` seconds in all."""
    allowed = {d.strip().lower().rstrip(".") for d in domains}
    host = _check_host(url, allowed)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_AllowListRedirects(allowed))
    request = urllib.request.Request(url, headers={"User-Agent": "pagedllm"})
    try:
        with opener.open(request, timeout=timeout) as response:
            _check_length(int(response.headers.get("Content-Length") or 0), "the image download")
            chunks, size = [], 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                _check_length(size, "the image download")
                if time.monotonic() > deadline:
                    raise MediaError(f"fetching the image from {host} took over {timeout} s")
                chunks.append(chunk)
    except MediaError:
        raise
    except urllib.error.HTTPError as err:
        raise MediaError(f"fetching the image from {host} failed: HTTP {err.code}") from err
    except urllib.error.URLError as err:
        raise MediaError(f"cannot fetch the image from {host}: {err.reason}") from err
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise MediaError(f"cannot fetch the image from {host}: {err!r}") from err
    logger.debug("fetched %d image bytes from %s", size, host)
    return b"".join(chunks)


def _decode(data: bytes) -> Image.Image:
    _check_length(len(data), "the image")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise MediaError(f"the image is too large: {err}") from err
    except Exception as err:  # Pillow's parsers raise many types on hostile input
        raise MediaError(f"not an image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)})") from err
    return _finish(image)


def _finish(image: Image.Image) -> Image.Image:
    """Check the size before decoding pixels, decode them all, return RGB."""
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"the image is empty ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"the image's aspect ratio ({width}x{height}) exceeds "
                         f"{MAX_ASPECT_RATIO}:1")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"the image is {width}x{height}, more than {MAX_IMAGE_PIXELS:,} pixels")
    try:
        image.load()
        return to_rgb(image)
    except Exception as err:  # truncated data, bad checksums, decoder errors of any type
        raise MediaError(f"the image is corrupt or truncated: {err}") from err
