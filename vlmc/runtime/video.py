"""Read a video that a request names: bytes from a path, URL or data URI, decoded with PyAV.

Only the frames a family's sampler picks are kept (``vlmc.models.common.video``), and
decoding stops after the last of them. Every failure a user can cause (a missing file, an
unreachable URL, bytes that are not a video, a truncated stream, a clip beyond the limits) is
one ``InputError`` line, and the container is closed on every path.

The frame count and rate are the video stream's own (``frames``, ``average_rate``), as
transformers' PyAV reader takes them, so the sampled indices are the same; a stream that
does not state its frame count (some WebM and GIF files) is counted packet by packet.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..models.common.video import Sampler, Video, VideoMeta, uniform_sampler
from .images import decode_data_uri, download, file_url_path, read_image_file


@dataclass(frozen=True)
class VideoRef:
    """A video in a prompt: its source (path, URL, data URI, bytes, or an already decoded
    ``Video``) and how to sample it; None leaves a setting to the model's defaults."""

    source: Any
    fps: float | None = None
    max_frames: int | None = None
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 240):
            raise InputError(f"video fps must be a number in (0, 240], got {self.fps!r}")
        for name in ("max_frames", "num_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"video {name} must be a positive integer, got {value!r}")
        if self.fps is not None and self.num_frames is not None:
            raise InputError("give fps or num_frames for a video, not both")


@dataclass
class VideoLimits:
    """What one video may cost: encoded bytes, length, frame size, and sampled frames."""

    max_bytes: int = 512 * 2**20
    max_duration: float = 3600.0          # seconds of video
    max_total_frames: int = 500_000       # frames in the stream (decoding walks up to the last sampled one)
    max_frame_pixels: int = 3840 * 2160   # width * height of one frame
    max_frames: int = 768                 # sampled frames kept
    timeout: float = 30.0                 # seconds to fetch a URL
    max_sampled_pixels: int | None = None  # kept frames x frame pixels (bounds the decoded frames' memory)


def load_video(src: Any, sampler: Sampler | None = None, limits: VideoLimits | None = None) -> Video:
    """Decode ``src`` (a path, ``file://`` or ``http(s)://`` URL, ``data:video/...;base64,`` URI,
    or encoded bytes) and keep the frames ``sampler`` picks (default: every frame)."""
    limits = limits or VideoLimits()
    sampler = sampler or uniform_sampler()
    if isinstance(src, Video):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > limits.max_bytes:
            raise InputError(f"video bytes are {len(data)} bytes, over the limit of {limits.max_bytes}")
        return decode_video(data, "<bytes>", sampler, limits)
    if isinstance(src, os.PathLike):
        src = str(src)
    if not isinstance(src, str):
        raise InputError(f"unsupported video source of type {type(src).__name__}: "
                         "expected a path, URL, data URI or bytes")
    lowered = src[:16].lower()
    desc = src if len(src) <= 60 else src[:57] + "..."
    if lowered.startswith(("http://", "https://")):
        data = download(src, timeout=limits.timeout, max_bytes=limits.max_bytes, what="video")
    elif lowered.startswith("data:"):
        data = decode_data_uri(src, limits.max_bytes, what="video")
    else:
        if lowered.startswith("file://"):
            src = file_url_path(src)
        elif "://" in src[:16]:
            raise InputError(f"unsupported video URL scheme {src.split('://', 1)[0]!r} in {desc}")
        data = read_image_file(Path(src), limits.max_bytes, what="video")
    return decode_video(data, desc, sampler, limits)


def decode_video(data: bytes, desc: str, sampler: Sampler, limits: VideoLimits) -> Video:
    """Sampled RGB frames of encoded video ``data``; ``desc`` names it in errors."""
    import av  # PyAV bundles FFmpeg; imported here so image-only use never loads it

    meta = _probe(av, data, desc)
    if meta.width * meta.height > limits.max_frame_pixels:
        raise InputError(f"video {desc} frames are {meta.width}x{meta.height}, over the limit of "
                         f"{limits.max_frame_pixels} pixels per frame")
    if meta.duration > limits.max_duration:
        raise InputError(f"video {desc} is {meta.duration:.1f} s long, over the limit of {limits.max_duration:g} s")
    if meta.total_frames > limits.max_total_frames:
        raise InputError(f"video {desc} has {meta.total_frames} frames, over the limit of {limits.max_total_frames}")
    indices = np.asarray(sampler(meta), dtype=np.int64)
    if indices.size > limits.max_frames:
        raise InputError(f"sampling video {desc} keeps {indices.size} frames, over the limit of {limits.max_frames} "
                         "(lower fps or max frames)")
    if indices.size == 0 or indices.min() < 0 or indices.max() >= meta.total_frames:
        raise InputError(f"the sampling settings select no valid frame of video {desc}")
    if limits.max_sampled_pixels is not None and indices.size * meta.width * meta.height > limits.max_sampled_pixels:
        raise InputError(f"video {desc} would decode to {indices.size} frames of {meta.width}x{meta.height}, "
                         f"over the limit of {limits.max_sampled_pixels} pixels (lower fps or max frames)")
    wanted = set(indices.tolist())
    last = int(indices.max())
    kept: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"   # frame threads: same frames, decoded sooner
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
        raise InputError(f"cannot decode video {desc}: {_reason(exc)}") from None
    if len(kept) < len(wanted):
        raise InputError(f"cannot decode video {desc}: the stream ends after {max(kept, default=-1) + 1} of its "
                         f"{meta.total_frames} frames (truncated or damaged)")
    shapes = {f.shape for f in kept.values()}
    if len(shapes) != 1:
        raise InputError(f"cannot decode video {desc}: its frames change size mid-stream")
    frames = np.stack([kept[i] for i in indices.tolist()])
    return Video(frames, meta, indices)


def _probe(av: Any, data: bytes, desc: str) -> VideoMeta:
    """The stream's frame count, rate and size, read from the container (no frame decoded)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InputError(f"{desc} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = int(stream.frames or 0)
            if total <= 0:  # not stated by the container: count the stream's packets
                total = sum(1 for packet in container.demux(stream) if packet.size)
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read video {desc}: {_reason(exc)}") from None
    if not rate or float(rate) <= 0:
        raise InputError(f"cannot read video {desc}: it states no frame rate")
    if total <= 0 or width <= 0 or height <= 0:
        raise InputError(f"video {desc} has no frames")
    return VideoMeta(total_frames=total, fps=float(rate), width=width, height=height)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "Invalid data found" in text:
        return "not a recognised video format, or damaged"
    return text.splitlines()[0][:200]
