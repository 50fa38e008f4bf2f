"""Gemma 4's video processor (spec ``video.kind`` ``gemma4``): transformers' Gemma4VideoProcessor
(torchvision backend) and the prompt Gemma4Processor writes for a video.

Frames are sampled uniformly (``default_sample_indices_fn``: ``num_frames`` of them, 32 by
default). Every frame is resized like an image (same aspect-preserving size rule as
``gemma4_processor.target_size``) under the video's own soft-token budget
(``max_soft_tokens``, 70 by default: 9 x 70 patches), with torch's antialiased bicubic
kernel on uint8, rescaled (and normalised) in one float32 step, and cut into patches of
(row, column, channel) order. A video is one item of ``grid_thw`` [frames, rows, columns];
the encoder sees each frame as an image of its own. In the prompt, each frame is its time
as text (``mm:ss``), a space and ``<|image>`` + ``<|video|>`` x soft tokens + ``<image|>``,
the frames joined by spaces.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import InputError, SourceError
from .gemma4_processor import SUPPORTED_SOFT_TOKENS, target_size
from .image_processing import ProcessedImages
from .video import Sampler, Video, VideoMeta, uniform_sampler, value_table
from .video_resize import resize_frames

# Gemma4VideoProcessor's class defaults (transformers 5.24)
DEFAULTS: dict[str, Any] = {"patch_size": 16, "max_soft_tokens": 70, "pooling_kernel_size": 3, "num_frames": 32,
                            "resample": 3, "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
                            "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True}
RESAMPLE = {3: "bicubic"}  # PIL filter numbers -> torch kernels implemented here


def video_spec_from_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The spec from the checkpoint's video processor config (``processor_config.json``'s
    ``video_processor``, else ``video_preprocessor_config.json``, else the image config, in
    transformers' order); absent fields take Gemma4VideoProcessor's defaults."""
    cfg = {k: v for k, v in dict(cfg or {}).items() if v is not None}
    spec: dict[str, Any] = {"kind": "gemma4"}
    for key in ("patch_size", "max_soft_tokens", "pooling_kernel_size", "num_frames", "resample"):
        value = cfg.get(key, DEFAULTS[key])
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SourceError(f"video processor {key} must be a positive integer, got {value!r}")
        spec[key] = value
    if spec["max_soft_tokens"] not in SUPPORTED_SOFT_TOKENS:
        raise SourceError(f"video processor max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, "
                          f"got {spec['max_soft_tokens']}")
    if spec["resample"] not in RESAMPLE:
        raise SourceError(f"video processor resample {spec['resample']} is not supported (bicubic 3)")
    if cfg.get("do_sample_frames") is False:
        raise SourceError("video processor do_sample_frames=false is not supported (Gemma 4 samples frames)")
    for key in ("image_mean", "image_std"):
        spec[key] = [float(v) for v in cfg.get(key, DEFAULTS[key])]
    spec["rescale_factor"] = float(cfg.get("rescale_factor", DEFAULTS["rescale_factor"]))
    for key in ("do_resize", "do_rescale", "do_normalize"):
        spec[key] = bool(cfg.get(key, DEFAULTS[key]))
    return spec


def frame_stamp(seconds: float) -> str:
    """A frame's time as Gemma4Processor writes it: minutes and whole seconds, ``mm:ss``."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_prompt(timestamps: Sequence[float], frame_text: str) -> str:
    """The text Gemma4Processor puts in place of ``<|video|>``; ``frame_text``: one frame's
    ``<|image>`` + soft tokens + ``<image|>``."""
    return " ".join(f"{frame_stamp(t)} {frame_text}" for t in timestamps)


class Gemma4VideoProcessor:
    """Sampled frames -> each frame's real patches, packed frame after frame."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.patch = int(spec["patch_size"])
        self.kernel = int(spec["pooling_kernel_size"])
        self.max_patches = int(spec["max_soft_tokens"]) * self.kernel ** 2
        self._table = value_table(spec)

    def sampler(self, fps: float | None = None, max_frames: int | None = None,
                num_frames: int | None = None) -> Sampler:
        """``num_frames`` evenly spaced frames, or ``fps`` per second (at most ``max_frames``),
        or by default the checkpoint's ``num_frames`` (at most ``max_frames``, and every frame
        of a shorter clip: transformers refuses such a clip unless asked for fewer frames)."""
        if fps is not None and num_frames is not None:
            raise InputError("give fps or num_frames for a video, not both")
        if num_frames is not None:
            return uniform_sampler(num_frames=num_frames)
        cap = None if max_frames is None else int(max_frames)

        def sample(meta: VideoMeta) -> np.ndarray:
            if fps is not None:
                n = max(1, int(meta.total_frames / meta.fps * fps))
            else:
                n = min(int(self.spec["num_frames"]), meta.total_frames)
            return uniform_sampler(num_frames=n if cap is None else min(n, cap))(meta)
        return sample

    def process(self, videos: Sequence[Video]) -> ProcessedImages:
        rows, grids, sizes, tokens = [], [], [], []
        p = self.patch
        for video in videos:
            frames = video.frames
            t, height, width = frames.shape[:3]
            sizes.append((height, width))
            new_h, new_w = (target_size(height, width, p, self.max_patches, self.kernel) if self.spec["do_resize"]
                            else (height, width))
            if (new_h, new_w) != (height, width):
                frames = resize_frames(frames, new_h, new_w, RESAMPLE[int(self.spec["resample"])])
            gh, gw = new_h // p, new_w // p
            if gh % self.kernel or gw % self.kernel:
                raise InputError(f"video frames of {new_w}x{new_h} pixels do not pool into whole "
                                 f"{self.kernel}x{self.kernel} patch cells")
            values = self._table[frames[:, :gh * p, :gw * p], np.arange(3)]      # [T, H, W, C] float32
            x = values.reshape(t, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)   # (T, rows, cols, p, p, C)
            rows.append(np.ascontiguousarray(x).reshape(t * gh * gw, p * p * 3))
            grids.append([t, gh, gw])
            tokens.append(t * (gh * gw // self.kernel ** 2))
        return ProcessedImages(
            pixel_values=np.concatenate(rows) if rows else np.zeros((0, 3 * p * p), np.float32),
            grid_thw=np.array(grids, dtype=np.int64).reshape(-1, 3), num_tokens=tokens, image_sizes=sizes)
