"""Turn whatever a request names as an image into a fully decoded RGB PIL image.

Every failure a user can cause (missing file, unreachable URL, bad base64, truncated or
non-image bytes, a decompression bomb) is raised here as one `InputError` line, so nothing
downstream ever sees a half-decoded image or a PIL traceback.

Parity with transformers (5.x), and where we deliberately differ:

* EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as
  `transformers.image_utils.load_image` does for every source, so a phone photo is upright.
  (transformers' image *processors* do not transpose; they expect `load_image`'s output.)
* RGB conversion follows the processors' `convert_to_rgb`: an image with an alpha band or a
  `transparency` entry is composited onto opaque white, anything else goes through
  `Image.convert("RGB")`. `transformers.image_utils.load_image` instead calls
  `convert("RGB")` directly, which drops alpha and exposes whatever colour hides under
  transparent pixels; handing our output to a transformers processor is a no-op conversion,
  so our pixels equal `processor(original_image)`.
* Only the first frame of an animated image is used (PIL's default frame), like transformers.
* A bare base64 string is not accepted (transformers guesses); use a `data:` URI.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

from vlmc.errors import InputError
from vlmc.models.common.image_processing import convert_rgb

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_CHUNK = 1 << 16


def load_image(
    src: ImageSource,
    *,
    timeout: float = 10.0,
    max_bytes: int = 50 * 2**20,
    max_pixels: int = 100_000_000,
) -> Image.Image:
    """Load `src` and return a fully decoded, upright RGB image.

    `src` may be a local path (str or PathLike, or a `file://` URL), an `http(s)://` URL,
    a `data:<mime>;base64,<payload>` URI, raw encoded bytes, or a PIL image.

    `timeout` bounds each network operation and, roughly, the whole download (a server
    that trickles bytes is cut off once `timeout` seconds have passed in total).
    `max_bytes` caps the encoded size of a download, data URI, file or raw bytes. A local
    path must name a regular file.
    `max_pixels` caps width*height; it is checked from the header, before any pixel is
    decoded. PIL's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, about 179 M
    pixels as a hard error) applies on top of it.
    """
    if isinstance(src, Image.Image):
        return _finish(src, "<PIL image>", max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise InputError(f"image bytes are {len(data)} bytes, over the limit of {max_bytes}")
        return _decode(data, "<bytes>", max_pixels)
    if isinstance(src, os.PathLike):
        return _load_path(Path(src), max_pixels, max_bytes)
    if not isinstance(src, str):
        raise InputError(
            f"unsupported image source of type {type(src).__name__}: "
            "expected a path, URL, data URI, bytes or PIL image"
        )

    lowered = src[:16].lower()
    if lowered.startswith(("http://", "https://")):
        data = download(src, timeout=timeout, max_bytes=max_bytes)
        return _decode(data, src, max_pixels)
    if lowered.startswith("data:"):
        return _decode(decode_data_uri(src, max_bytes), _short(src), max_pixels)
    if lowered.startswith("file://"):
        return _load_path(Path(file_url_path(src)), max_pixels, max_bytes)
    if "://" in src[:16]:
        scheme = src.split("://", 1)[0]
        raise InputError(f"unsupported image URL scheme {scheme!r} in {_short(src)}")
    return _load_path(Path(src), max_pixels, max_bytes)


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header of encoded image bytes, without decoding pixels;
    None if they are not an image (``load_image`` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - untrusted bytes: any parser failure means "not an image"
        return None


# --------------------------------------------------------------------------- sources


def file_url_path(url: str) -> str:
    """The local path of a ``file:`` URL; one naming another host is not local."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InputError(f"file URL {_short(url)} names the host {parsed.netloc!r}; only local files "
                         "(file:///path) can be read")
    return urllib.parse.unquote(parsed.path)


def read_image_file(path: str | os.PathLike, max_bytes: int, what: str = "image") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. Anything else (a FIFO, a
    device, a folder) is refused without blocking on it: a FIFO without a writer would
    block ``open`` forever, a device like /dev/zero never ends. ``what`` names the media
    in messages ("image", "video")."""
    desc = _short(str(path), 120)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except ValueError:  # a NUL byte in the path
        raise InputError(f"{what} path {desc!r} is not a valid path") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise InputError(f"{what} file not found: {desc}") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise InputError(f"{what} path {desc} is too long") from None
        raise InputError(f"cannot read {what} file {desc}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{what} path is a directory, not a file: {desc}")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} path {desc} is not a regular file")
        if info.st_size > max_bytes:
            raise InputError(f"{what} file {desc} is {info.st_size} bytes, over the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} file {desc}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:  # it grew while being read
        raise InputError(f"{what} file {desc} is over the limit of {max_bytes} bytes")
    return data


def _load_path(path: Path, max_pixels: int, max_bytes: int) -> Image.Image:
    return _decode(read_image_file(path, max_bytes), str(path), max_pixels)


def decode_data_uri(uri: str, max_bytes: int, what: str = "image") -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError(f"malformed data URI (no ',' after the header): {_short(uri)}")
    params = header[len("data:"):].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InputError(f"data URI is not base64-encoded (expected ';base64,'): {_short(uri)}")
    mime = params[0].strip().lower()
    if mime and not mime.startswith(f"{what}/") and not (what == "video" and mime == "image/gif"):
        raise InputError(f"data URI media type {mime!r} is not a{'n' if what[0] in 'aeiou' else ''} {what} type")
    payload = "".join(payload.split())  # line-wrapped base64 is common
    if len(payload) * 3 // 4 > max_bytes:
        raise InputError(f"data URI payload is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"data URI has invalid base64 payload: {exc}") from None


def download(url: str, *, timeout: float, max_bytes: int, what: str = "image") -> bytes:
    """GET `url` with a per-operation timeout, an overall deadline and a byte cap."""
    request = urllib.request.Request(url, headers={"User-Agent": "vlmc", "Accept": f"{what}/*"})
    # A fresh opener per call so proxy environment variables are read now, not at import.
    opener = urllib.request.build_opener()
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InputError(
                    f"cannot fetch {what} {url}: Content-Length {length} is over the limit of {max_bytes} bytes"
                )
            chunks: list[bytes] = []
            total = 0
            while True:
                if time.monotonic() > deadline:
                    raise InputError(f"cannot fetch {what} {url}: timed out after {timeout:g} s")
                chunk = resp.read1(_CHUNK)  # whatever has arrived, so the deadline is checked often
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise InputError(f"cannot fetch {what} {url}: response is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except InputError:
        raise
    except urllib.error.HTTPError as exc:
        raise InputError(f"cannot fetch {what} {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise InputError(f"cannot fetch {what} {url}: {_reason(exc.reason, timeout)}") from None
    except (TimeoutError, socket.timeout):
        raise InputError(f"cannot fetch {what} {url}: timed out after {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # connection reset, malformed URL, bad status line...
        raise InputError(f"cannot fetch {what} {url}: {_reason(exc, timeout)}") from None


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes | io.BufferedReader, desc: str, max_pixels: int) -> Image.Image:
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        image = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {desc} is too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"cannot decode image {desc}: not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is the input's fault
        raise InputError(f"cannot decode image {desc}: {_decode_reason(exc)}") from None
    with image:
        return _finish(image, desc, max_pixels)


def _finish(image: Image.Image, desc: str, max_pixels: int) -> Image.Image:
    """Check the header size, decode every pixel, orient, and convert to RGB."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"image {desc} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"image {desc} is too large: {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels}"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return convert_rgb(upright)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {desc} is too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot decode image {desc}: {_decode_reason(exc)}") from None


def _decode_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated ({text})"
    return text


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
