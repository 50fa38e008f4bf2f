"""The server's media policy: which image references a request may use, and their limits.

``http(s)`` URLs go through ``fetch.Fetcher`` (public addresses only unless allowed, a
deadline and a byte cap); ``data:`` URIs are always allowed. Local paths (plain or
``file:///``) only under ``--allowed-local-media-path``, and only regular files: a server
must not read whatever a client names.

Loading never holds a worker while it waits on the network: the fetch is asynchronous,
and only decoding takes one of ``DECODE_SLOTS`` threads. A request's images are decoded
one at a time, their pixels summed against ``max_request_pixels`` from the headers before
any is decoded, so one request holds at most that many pixels however many images it has.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..runtime.images import decode_data_uri, file_url_path, image_size, load_image, read_image_file
from .fetch import CLIENT_MESSAGE, FetchFailed, Fetcher, FetchPolicy
from .middleware import release_soon

DECODE_SLOTS = 2  # image decodes at once, server-wide: they are CPU-bound and briefly large


@dataclass
class MediaLimits:
    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    fetch_timeout: float = 10.0
    allowed_local_dir: Path | None = None
    allow_private_fetch: bool = False
    allowed_fetch_networks: tuple = field(default_factory=tuple)

    def policy(self) -> FetchPolicy:
        return FetchPolicy(timeout=self.fetch_timeout, max_bytes=self.max_image_bytes,
                           allow_private=self.allow_private_fetch, allowed_networks=tuple(self.allowed_fetch_networks))


class MediaLoader:
    """Loads a request's images under ``MediaLimits``; one per server."""

    def __init__(self, limits: MediaLimits):
        self.limits = limits
        self.fetcher = Fetcher(limits.policy())
        self._slots: asyncio.Semaphore | None = None
        self.decoding = 0

    def check_count(self, refs: list[Any]) -> None:
        if len(refs) > self.limits.max_images:
            raise InputError(f"the request has {len(refs)} images; this server takes at most {self.limits.max_images} "
                             f"per request (--max-images)")

    @contextlib.asynccontextmanager
    async def slot(self):
        """One of the DECODE_SLOTS, for work on decoded images."""
        if self._slots is None:  # made inside the server's event loop
            self._slots = asyncio.Semaphore(DECODE_SLOTS)
        async with self._slots:
            yield

    async def load(self, refs: list[Any]) -> list[Image.Image]:
        self.check_count(refs)
        images: list[Image.Image] = []
        budget = self.limits.max_request_pixels
        try:
            for i, ref in enumerate(refs):
                images.append(await self._load_one(ref, i, budget))
                budget -= images[-1].width * images[-1].height
        finally:
            if self.limits.max_request_pixels - budget > 4_000_000:
                release_soon()  # big images' decoding buffers were freed on a worker thread's heap
        return images

    async def _load_one(self, ref: Any, i: int, budget: int) -> Image.Image:
        if not isinstance(ref, str) or not ref.strip():
            raise InputError(f"image {i + 1}: the reference must be a URL, a data: URI or an allowed local path")
        ref = ref.strip()
        remote = ref[:8].lower().startswith(("http://", "https://"))
        if remote:
            try:
                data = await self.fetcher.get(ref)
            except FetchFailed:
                raise InputError(f"image {i + 1}: {CLIENT_MESSAGE}") from None
        elif ref[:5].lower() == "data:":
            data = ref
        else:
            data = Path(self._local_path(ref, i))
        async with self.slot():
            self.decoding += 1
            try:
                return await asyncio.to_thread(self._decode, data, i, budget, remote)
            finally:
                self.decoding -= 1

    def _decode(self, data: bytes | str | Path, i: int, budget: int, remote: bool) -> Image.Image:
        """An RGB image; the request's pixel budget is checked from the header, before decoding."""
        limits = self.limits
        try:
            if isinstance(data, Path):
                data = read_image_file(data, limits.max_image_bytes)
            elif isinstance(data, str):
                data = decode_data_uri(data, limits.max_image_bytes)
            size = image_size(data)
            if size is not None and size[0] * size[1] > budget and size[0] * size[1] <= limits.max_image_pixels:
                raise InputError(f"the request's images have more than {limits.max_request_pixels} pixels in all "
                                 f"(this one is {size[0]}x{size[1]}); this server takes at most that many per "
                                 f"request (--max-request-pixels)")
            image = load_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
        except InputError as e:
            if remote and "pixels" not in str(e):  # what came back from a URL is not described
                raise InputError(f"image {i + 1}: {CLIENT_MESSAGE}") from None
            raise InputError(f"image {i + 1}: {e}") from None
        return image

    def _local_path(self, ref: str, i: int) -> str:
        if ref[:7].lower() == "file://":
            try:
                ref = file_url_path(ref)
            except InputError as e:
                raise InputError(f"image {i + 1}: {e}") from None
        elif "://" in ref:
            raise InputError(f"image {i + 1}: unsupported URL scheme in {ref[:40]!r} (use http(s), data: or a local path)")
        allowed = self.limits.allowed_local_dir
        if allowed is None:
            raise InputError(f"image {i + 1}: local image paths are not allowed on this server "
                             f"(start it with --allowed-local-media-path DIR)")
        if "\0" in ref:
            raise InputError(f"image {i + 1}: the path holds a NUL character")
        try:
            path = Path(ref).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise InputError(f"image {i + 1}: cannot resolve the path ({e})") from None
        root = allowed.resolve()
        if path != root and root not in path.parents:
            raise InputError(f"image {i + 1}: {ref[:200]!r} is outside the allowed media folder")
        return str(path)
