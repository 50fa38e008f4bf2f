"""Videos as the families see them: sampled RGB frames with their timing, and the frame
samplers of transformers' video processors (transformers 5.24).

A sampler maps a video's metadata to the indices of the frames to keep; the runtime decodes
only up to the last of them (``vlmc.runtime.video``). Each family names the sampler its
transformers video processor uses, so the same frames reach the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import InputError


@dataclass(frozen=True)
class VideoMeta:
    """What the container says before any frame is decoded (transformers' ``VideoMetadata``:
    the stream's frame count and average rate)."""

    total_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0


@dataclass
class Video:
    """Sampled frames [T, H, W, 3] uint8 and the indices they had in the whole video."""

    frames: np.ndarray
    meta: VideoMeta
    indices: np.ndarray

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (transformers' ``VideoMetadata.sampled_fps``)."""
        if not self.meta.total_frames or not self.meta.fps:
            return self.meta.fps or 24.0
        return len(self.indices) / self.meta.total_frames * self.meta.fps

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of each sampled frame."""
        return [int(i) / self.meta.fps for i in self.indices]


Sampler = Callable[[VideoMeta], np.ndarray]


def value_table(s: dict) -> np.ndarray:
    """[256, 3] float32: each uint8 value of each channel after a video processor's rescale
    and normalise (``s``: do_rescale, do_normalize, rescale_factor, image_mean, image_std).
    Both on: torch's fused step, mean and std as float32 tensors times 1/rescale_factor,
    then (x - mean) / std."""
    x = np.arange(256, dtype=np.float32)[:, None]
    if s["do_rescale"] and s["do_normalize"]:
        mean = np.asarray(s["image_mean"], np.float32) * np.float32(1.0 / s["rescale_factor"])
        std = np.asarray(s["image_std"], np.float32) * np.float32(1.0 / s["rescale_factor"])
        return ((x - mean) / std).astype(np.float32)
    if s["do_normalize"]:
        return ((x - np.asarray(s["image_mean"], np.float32)) / np.asarray(s["image_std"], np.float32))
    if s["do_rescale"]:
        return np.repeat(x * np.float32(s["rescale_factor"]), 3, axis=1)
    return np.repeat(x, 3, axis=1)


def _check_count(num_frames: int, meta: VideoMeta) -> None:
    if num_frames > meta.total_frames:
        raise InputError(f"cannot sample {num_frames} frames from a video of {meta.total_frames} frames; "
                         "ask for fewer frames or a lower fps")
    if num_frames <= 0:
        raise InputError(f"the sampling settings select no frame of this {meta.duration:.2f} s video")


def uniform_sampler(fps: float | None = None, num_frames: int | None = None) -> Sampler:
    """transformers' ``default_sample_indices_fn``: ``num_frames`` evenly spaced frames, or
    ``fps`` frames per second of video (at least one), or every frame."""
    if fps is not None and num_frames is not None:
        raise InputError("give fps or num_frames for a video, not both")

    def sample(meta: VideoMeta) -> np.ndarray:
        n = num_frames
        if n is None and fps is not None:
            n = max(1, int(meta.total_frames / meta.fps * fps))
        if n is None:
            return np.arange(meta.total_frames, dtype=np.int64)
        _check_count(n, meta)
        return np.arange(n, dtype=np.int64) * meta.total_frames // n
    return sample


def qwen2_vl_sampler(fps: float | None = None, num_frames: int | None = None, *, temporal_patch_size: int = 2,
                     min_frames: int = 4, max_frames: int = 768) -> Sampler:
    """Qwen2VLVideoProcessor.sample_frames: a frame count that is a multiple of the temporal
    patch size, from ``num_frames`` (rounded to it) or from ``fps`` (clamped to
    [min_frames, max_frames] and to the video, then floored to it), spaced by
    ``total / count`` (float32 steps truncated, as ``torch.arange(..).int()``)."""
    if fps is not None and num_frames is not None:
        raise InputError("give fps or num_frames for a video, not both")
    tps = temporal_patch_size

    def sample(meta: VideoMeta) -> np.ndarray:
        total = meta.total_frames
        if num_frames is not None:
            n = round(num_frames / tps) * tps
        elif fps is not None:
            top = math.floor(min(max_frames, total) / tps) * tps
            n = min(max(total / meta.fps * fps, min_frames), top, total)
            n = math.floor(n / tps) * tps
        else:
            return np.arange(total, dtype=np.int64)
        _check_count(n, meta)
        return _torch_arange_int(total, total / n)
    return sample


def _torch_arange_int(end: int, step: float) -> np.ndarray:
    """``torch.arange(0, end, step).int()`` for a float step: torch computes the length as
    ceil(end / step) in double and the values as start + i * step in float32's default dtype."""
    length = math.ceil(end / step)
    values = (np.arange(length, dtype=np.float64) * np.float64(step)).astype(np.float32)
    return values.astype(np.int64)


def qwen3_vl_sampler(fps: float | None = None, num_frames: int | None = None, *, min_frames: int = 4,
                     max_frames: int = 768) -> Sampler:
    """Qwen3VLVideoProcessor.sample_frames: ``num_frames`` as given, or ``fps`` frames per
    second clamped to [min_frames, max_frames] and to the video (every frame, within those
    bounds, when neither is given), spread by ``linspace(0, total - 1, n).round()``."""
    if fps is not None and num_frames is not None:
        raise InputError("give fps or num_frames for a video, not both")

    def sample(meta: VideoMeta) -> np.ndarray:
        total = meta.total_frames
        n = num_frames
        if n is None and fps is not None:
            n = min(max(int(total / meta.fps * fps), min_frames), max_frames, total)
        if n is None:
            n = min(max(total, min_frames), max_frames)
        if n <= 0:
            raise InputError(f"the sampling settings select no frame of this {meta.duration:.2f} s video")
        return np.linspace(0, total - 1, n).round().astype(np.int64)
    return sample


def smolvlm_sampler(fps: float, num_frames: int, skip_secs: float = 1.0) -> Sampler:
    """SmolVLMVideoProcessor.sample_frames: round(fps x duration) frames, at most
    ``num_frames``, at least one, spread by ``linspace`` (duplicates dropped) over the clip,
    less ``skip_secs`` at each end when the clip is long enough."""

    def sample(meta: VideoMeta) -> np.ndarray:
        total, duration = meta.total_frames, meta.duration
        desired = max(min(int(round(fps * duration)), num_frames), 1)
        start, end = 0, total - 1
        if skip_secs > 0 and (duration - 2 * skip_secs) > (num_frames * fps):
            start, end = int(skip_secs * meta.fps), int(total - skip_secs * meta.fps)
        start, end = max(0, start), min(end, total - 1)
        if start >= end:
            start, end = 0, total - 1
        return np.unique(np.linspace(start, end, desired, dtype=int)).astype(np.int64)
    return sample
