"""The server's media policy: which image and video references a request may use, and their limits.

``http(s)`` URLs go through ``fetch.Fetcher`` (public addresses only unless allowed, a
deadline and a byte cap); ``data:`` URIs are always allowed. Local paths (plain or
``file:///``) only under ``--allowed-local-media-path``, and only regular files: a server
must not read whatever a client names.

Loading never holds a worker while it waits on the network: the fetch is asynchronous,
and only decoding takes one of ``DECODE_SLOTS`` threads. A request's images are decoded
one at a time, their pixels summed against ``max_request_pixels`` from the headers before
any is decoded, so one request holds at most that many pixels however many images it has.
A video (a ``VideoRef``) is read the same ways under its own byte cap and limits; its kept
frames' pixels count against the same request budget, checked from the container's header
and the sampler before any frame is decoded.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..models.common.video import Sampler, Video
from ..runtime.images import decode_data_uri, file_url_path, image_size, load_image, read_image_file
from ..runtime.video import VideoLimits, VideoRef, decode_video
from .fetch import CLIENT_MESSAGE, FetchFailed, Fetcher, FetchPolicy
from .middleware import release_soon

VIDEO_CLIENT_MESSAGE = "the video URL could not be fetched as a video (the server log says why)"
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
    max_videos: int = 2
    max_video_bytes: int = 64 * 2**20
    max_video_frames: int = 256           # sampled frames per video
    max_video_duration: float = 1800.0    # seconds
    max_video_frame_pixels: int = 1920 * 1088
    video_fetch_timeout: float = 30.0

    def video_limits(self, budget: int) -> VideoLimits:
        return VideoLimits(max_bytes=self.max_video_bytes, max_duration=self.max_video_duration,
                           max_frame_pixels=self.max_video_frame_pixels, max_frames=self.max_video_frames,
                           timeout=self.video_fetch_timeout, max_sampled_pixels=max(budget, 0))

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
        videos = sum(1 for r in refs if isinstance(r, VideoRef))
        if len(refs) - videos > self.limits.max_images:
            raise InputError(f"the request has {len(refs) - videos} images; this server takes at most "
                             f"{self.limits.max_images} per request (--max-images)")
        if videos > self.limits.max_videos:
            raise InputError(f"the request has {videos} videos; this server takes at most {self.limits.max_videos} "
                             f"per request (--max-videos)")

    @contextlib.asynccontextmanager
    async def slot(self):
        """One of the DECODE_SLOTS, for work on decoded images."""
        if self._slots is None:  # made inside the server's event loop
            self._slots = asyncio.Semaphore(DECODE_SLOTS)
        async with self._slots:
            yield

    async def load(self, refs: list[Any], video_sampler: Any = None) -> list[Image.Image | Video]:
        """The request's images and videos, in order. ``video_sampler(fps, max_frames,
        num_frames)``: the model's frame sampler (``Inputs.video_sampler``)."""
        self.check_count(refs)
        samplers: dict[int, Sampler] = {}
        for i, ref in enumerate(refs):  # a model without videos, or bad settings: refused before any fetch
            if isinstance(ref, VideoRef):
                if video_sampler is None:
                    raise InputError("this model takes no videos")
                samplers[i] = video_sampler(ref.fps, ref.max_frames, ref.num_frames)
        images: list[Image.Image | Video] = []
        budget = self.limits.max_request_pixels
        try:
            for i, ref in enumerate(refs):
                if isinstance(ref, VideoRef):
                    images.append(await self._load_video(ref, i, budget, samplers[i]))
                    budget -= images[-1].frames.shape[0] * images[-1].frames.shape[1] * images[-1].frames.shape[2]
                    continue
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

    async def _load_video(self, ref: VideoRef, i: int, budget: int, sampler: Sampler) -> Video:
        src = ref.source
        if not isinstance(src, str) or not src.strip():
            raise InputError(f"video {i + 1}: the reference must be a URL, a data: URI or an allowed local path")
        src = src.strip()
        limits = self.limits.video_limits(budget)
        remote = src[:8].lower().startswith(("http://", "https://"))
        if remote:
            try:
                data: Any = await self.fetcher.get(src, max_bytes=limits.max_bytes, what="video",
                                                   timeout=limits.timeout)
            except FetchFailed:
                raise InputError(f"video {i + 1}: {VIDEO_CLIENT_MESSAGE}") from None
        elif src[:5].lower() == "data:":
            data = src
        else:
            data = Path(self._local_path(src, i, "video"))
        async with self.slot():
            self.decoding += 1
            try:
                return await asyncio.to_thread(self._decode_video, data, i, limits, sampler, remote)
            finally:
                self.decoding -= 1

    def _decode_video(self, data: bytes | str | Path, i: int, limits: VideoLimits, sampler: Sampler,
                      remote: bool) -> Video:
        try:
            if isinstance(data, Path):
                data = read_image_file(data, limits.max_bytes, what="video")
            elif isinstance(data, str):
                data = decode_data_uri(data, limits.max_bytes, what="video")
            return decode_video(data, "data", sampler, limits)
        except InputError as e:
            if remote and "limit" not in str(e):  # what came back from a URL is not described
                raise InputError(f"video {i + 1}: {VIDEO_CLIENT_MESSAGE}") from None
            raise InputError(f"video {i + 1}: {e}") from None

    def _local_path(self, ref: str, i: int, what: str = "image") -> str:
        if ref[:7].lower() == "file://":
            try:
                ref = file_url_path(ref)
            except InputError as e:
                raise InputError(f"{what} {i + 1}: {e}") from None
        elif "://" in ref:
            raise InputError(f"{what} {i + 1}: unsupported URL scheme in {ref[:40]!r} (use http(s), data: or a local path)")
        allowed = self.limits.allowed_local_dir
        if allowed is None:
            raise InputError(f"{what} {i + 1}: local {what} paths are not allowed on this server "
                             f"(start it with --allowed-local-media-path DIR)")
        if "\0" in ref:
            raise InputError(f"{what} {i + 1}: the path holds a NUL character")
        try:
            path = Path(ref).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise InputError(f"{what} {i + 1}: cannot resolve the path ({e})") from None
        root = allowed.resolve()
        if path != root and root not in path.parents:
            raise InputError(f"{what} {i + 1}: {ref[:200]!r} is outside the allowed media folder")
        return str(path)
