"""The Qwen-VL families' video processors (spec ``video.kind`` ``qwen2_vl`` and
``qwen3_vl``): transformers' Qwen2VLVideoProcessor and Qwen3VLVideoProcessor (torchvision
backend).

Frames are resized with torch's antialiased bicubic uint8 kernel (``video_resize``) to
``smart_resize`` of the frame size under the video's own min/max pixels, rescaled and
normalised in one float32 step ((x - 255 mean) / (255 std)), padded to a multiple of the
temporal patch size by repeating the last frame, and cut into patches laid out
(t, gh/m, gw/m, m, m | C, T, p, p): each temporal patch merges ``temporal_patch_size``
consecutive frames. Qwen3-VL samples differently (``linspace``, 2 fps by default), bounds
the pixels of the whole clip (t x h x w) rather than of one frame, and its prompt carries
each temporal patch's time (``timestamps``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ...errors import InputError, SourceError
from .image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessedImages
from .qwen_vl_processor import smart_resize
from .image_processing import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from .video import Sampler, Video, qwen2_vl_sampler, qwen3_vl_sampler, value_table
from .video_resize import resize_frames

DEFAULT_FPS = 2.0  # vlmc's sampling rate when neither the request nor the checkpoint sets one

# Qwen2VLVideoProcessor's class defaults (transformers 5.24)
DEFAULTS: dict[str, Any] = {
    "min_pixels": 128 * 28 * 28, "max_pixels": 28 * 28 * 768, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "min_frames": 4, "max_frames": 768, "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD, "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True,
    "do_normalize": True,
}


# Qwen3VLVideoProcessor's class defaults (transformers 5.24): pixel bounds are of the whole clip
QWEN3_DEFAULTS: dict[str, Any] = {
    **DEFAULTS, "min_pixels": 128 * 32 * 32, "max_pixels": 32 * 32 * 768, "patch_size": 16,
    "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD, "do_sample_frames": True, "fps": 2,
}


def video_spec_from_config(cfg: dict[str, Any] | None, kind: str = "qwen2_vl",
                           defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The video spec from a checkpoint's ``video_preprocessor_config.json`` (or, as
    transformers falls back to it, ``preprocessor_config.json``); absent fields take the
    video processor class's defaults. ``fps`` is the checkpoint's sampling rate when it
    samples frames by default (``do_sample_frames``), else vlmc's ``DEFAULT_FPS``."""
    d = dict(defaults or (QWEN3_DEFAULTS if kind == "qwen3_vl" else DEFAULTS))
    cfg = {k: v for k, v in dict(cfg or {}).items() if v is not None}
    size = cfg.get("size") or {}
    if not isinstance(size, dict):
        raise SourceError(f"video processor size must be a dict, got {size!r}")
    if kind == "qwen3_vl":  # Qwen3VLVideoProcessor reads size alone
        min_pixels = size.get("shortest_edge", d["min_pixels"])
        max_pixels = size.get("longest_edge", d["max_pixels"])
    else:  # as Qwen2VLVideoProcessor.__init__: top-level min/max_pixels win over size's edges
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", d["min_pixels"]))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", d["max_pixels"]))
    spec = {"kind": kind, "min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}
    for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"):
        spec[key] = int(cfg.get(key, d[key]))
    for key in ("image_mean", "image_std"):
        spec[key] = [float(v) for v in cfg.get(key, d[key])]
    spec["rescale_factor"] = float(cfg.get("rescale_factor", d["rescale_factor"]))
    for key in ("do_resize", "do_rescale", "do_normalize"):
        spec[key] = bool(cfg.get(key, d[key]))
    sample = cfg.get("do_sample_frames", d.get("do_sample_frames", False))
    fps = cfg.get("fps", d.get("fps")) if sample else None
    spec["fps"] = float(fps) if fps else DEFAULT_FPS
    if cfg.get("cap_pixels_per_frame"):
        raise SourceError("the video processor config sets cap_pixels_per_frame, which vlmc does not support")
    if spec["min_pixels"] > spec["max_pixels"] or min(spec[k] for k in ("patch_size", "temporal_patch_size",
                                                                          "merge_size")) <= 0:
        raise SourceError(f"video processor config is incoherent: {spec}")
    return spec


class QwenVideoProcessor:
    """Sampled frames -> packed video patches, grids and token counts, as transformers'
    Qwen2VLVideoProcessor makes them."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.patch = int(spec["patch_size"])
        self.temporal = int(spec["temporal_patch_size"])
        self.merge = int(spec["merge_size"])
        self.factor = self.patch * self.merge
        self._table = self._lookup_table()

    def sampler(self, fps: float | None = None, max_frames: int | None = None,
                num_frames: int | None = None) -> Sampler:
        """Which frames to keep: ``num_frames`` of them, or ``fps`` per second (the spec's rate
        when neither is given), at most ``max_frames`` (the spec's cap when not given)."""
        if num_frames is None and fps is None:
            fps = float(self.spec["fps"])
        cap = int(self.spec["max_frames"]) if max_frames is None else int(max_frames)
        return qwen2_vl_sampler(fps, num_frames, temporal_patch_size=self.temporal,
                                min_frames=min(int(self.spec["min_frames"]), cap), max_frames=cap)

    def _lookup_table(self) -> np.ndarray:
        return value_table(self.spec)

    def target_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        if self.spec["do_resize"]:
            return smart_resize(height, width, self.factor, int(self.spec["min_pixels"]), int(self.spec["max_pixels"]))
        if height % self.factor or width % self.factor:
            raise InputError(f"video frames of {width}x{height} are not a multiple of {self.factor} and the "
                             "video processor does not resize")
        return height, width

    def process(self, videos: Sequence[Video]) -> ProcessedImages:
        rows, grids, sizes = [], [], []
        for video in videos:
            frames = video.frames
            t, height, width = frames.shape[:3]
            sizes.append((height, width))
            new_h, new_w = self.target_size(height, width, t)
            if (new_h, new_w) != (height, width):
                frames = resize_frames(frames, new_h, new_w)
            if pad := -t % self.temporal:
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            values = self._table[frames, np.arange(3)]            # [T, H, W, C] float32
            flat, grid = self._patchify(values)
            rows.append(flat)
            grids.append(grid)
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        return ProcessedImages(
            pixel_values=np.concatenate(rows) if rows else np.zeros((0, 3 * self.temporal * self.patch**2), np.float32),
            grid_thw=grid_thw,
            num_tokens=[int(np.prod(g)) // self.merge**2 for g in grid_thw],
            image_sizes=sizes,
        )

    def _patchify(self, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """[T, H, W, C] -> (t*gh*gw, C*T'*p*p) ordered (t, gh/m, gw/m, m, m | C, T', p, p)."""
        p, m, tp = self.patch, self.merge, self.temporal
        frames, height, width, channels = x.shape
        gt, gh, gw = frames // tp, height // p, width // p
        x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, channels)
        x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (t, gh/m, gw/m, m, m, C, T', p, p)
        return np.ascontiguousarray(x).reshape(gt * gh * gw, channels * tp * p * p), [gt, gh, gw]


class Qwen3VideoProcessor(QwenVideoProcessor):
    """transformers' Qwen3VLVideoProcessor."""

    def sampler(self, fps: float | None = None, max_frames: int | None = None,
                num_frames: int | None = None) -> Sampler:
        if num_frames is None and fps is None:
            fps = float(self.spec["fps"])
        cap = int(self.spec["max_frames"]) if max_frames is None else int(max_frames)
        return qwen3_vl_sampler(fps, num_frames, min_frames=min(int(self.spec["min_frames"]), cap), max_frames=cap)

    def target_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """Qwen3-VL's smart_resize: the clip's volume (frames rounded to the temporal patch) within
        [min_pixels, max_pixels]; frames smaller than a merged patch are scaled up first."""
        if not self.spec["do_resize"]:
            return super().target_size(height, width, frames)
        factor, tf = self.factor, self.temporal
        if frames < tf:
            raise InputError(f"a video needs at least {tf} frames here, got {frames}")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        if max(height, width) / min(height, width) > 200:
            raise InputError(f"video aspect ratio must be smaller than 200 ({width}x{height})")
        lo, hi = int(self.spec["min_pixels"]), int(self.spec["max_pixels"])
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        t_bar = round(frames / tf) * tf
        if t_bar * h_bar * w_bar > hi:
            beta = math.sqrt(frames * height * width / hi)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif t_bar * h_bar * w_bar < lo:
            beta = math.sqrt(lo / (frames * height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar


def patch_timestamps(indices: Sequence[int], fps: float, temporal: int) -> list[float]:
    """Seconds of each temporal patch, as Qwen3VLProcessor puts them in the prompt: the frame
    indices padded with the last to a multiple of ``temporal``, each group's first and last
    frame times averaged."""
    idx = [int(i) for i in indices]
    if len(idx) % temporal:
        idx += [idx[-1]] * (temporal - len(idx) % temporal)
    times = [i / fps for i in idx]
    return [(times[k] + times[k + temporal - 1]) / 2 for k in range(0, len(times), temporal)]
