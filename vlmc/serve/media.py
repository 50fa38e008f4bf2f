"""The server's media policy: which image references a request may use, and their limits.

``http(s)`` URLs (with a timeout and a byte cap) and ``data:`` URIs are always allowed.
Local paths (plain or ``file://``) only under ``--allowed-local-media-path``: a server
must not read whatever file a client names.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..runtime.images import load_image


@dataclass
class MediaLimits:
    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    fetch_timeout: float = 10.0
    allowed_local_dir: Path | None = None


def load_request_images(refs: list[Any], limits: MediaLimits) -> list[Image.Image]:
    if len(refs) > limits.max_images:
        raise InputError(f"the request has {len(refs)} images; this server takes at most {limits.max_images} "
                         f"per request (--max-images)")
    images = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            raise InputError(f"image {i + 1}: the reference must be a URL, a data: URI or an allowed local path")
        ref = ref.strip()
        if not ref.startswith(("http://", "https://", "data:")):
            ref = _local_path(ref, limits.allowed_local_dir, i)
        try:
            images.append(load_image(ref, timeout=limits.fetch_timeout, max_bytes=limits.max_image_bytes,
                                     max_pixels=limits.max_image_pixels))
        except InputError as e:
            raise InputError(f"image {i + 1}: {e}") from None
    return images


def _local_path(ref: str, allowed: Path | None, i: int) -> str:
    if ref.startswith("file://"):
        ref = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
    elif "://" in ref:
        raise InputError(f"image {i + 1}: unsupported URL scheme in {ref[:40]!r} (use http(s), data: or a local path)")
    if allowed is None:
        raise InputError(f"image {i + 1}: local image paths are not allowed on this server "
                         f"(start it with --allowed-local-media-path DIR)")
    path = Path(ref).expanduser().resolve()
    root = allowed.resolve()
    if path != root and root not in path.parents:
        raise InputError(f"image {i + 1}: {ref!r} is outside the allowed media folder")
    return str(path)
