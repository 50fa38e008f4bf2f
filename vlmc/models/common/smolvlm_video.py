"""SmolVLM2's video processor (spec ``video.kind`` ``smolvlm``): transformers'
SmolVLMVideoProcessor (torchvision backend) and the prompt SmolVLMProcessor writes for a
video.

Every sampled frame becomes one global image: resized (Lanczos by default, torch's uint8
kernel) so its longest edge is ``size``, then to a ``max_image_size`` square, rescaled and
normalised in one float32 step. In the prompt the video is an introduction ("You are
provided the following series of <count in words> frames from a <H:MM:SS> [H:MM:SS]
video."), then per frame "\\nFrame from MM:SS:" and the frame's image tokens, then "\\n\\n".
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

import numpy as np

from ...errors import SourceError
from .image_processing import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from .video import Sampler, Video, smolvlm_sampler
from .video_resize import resize_frames

MAX_IMAGE_SIZE = 4096
RESAMPLE = {1: "lanczos", 3: "bicubic"}  # PIL filter numbers -> torch kernels implemented here
# SmolVLMVideoProcessor's class defaults (transformers 5.24), and SmolVLM2's sampling when a
# checkpoint states none (its hub configs: 1 fps, at most 64 frames)
DEFAULTS: dict[str, Any] = {"size": 4 * 364, "max_image_size": 364, "resample": 1, "image_mean": IMAGENET_STANDARD_MEAN,
                            "image_std": IMAGENET_STANDARD_STD, "rescale_factor": 1 / 255, "fps": 1.0,
                            "num_frames": 64}
INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME = "\nFrame from {stamp}:"
OUTRO = "\n\n"


def video_spec_from_config(cfg: dict[str, Any], tile_tokens: int) -> dict[str, Any]:
    """The spec from ``video_preprocessor_config.json`` (or ``preprocessor_config.json``, which
    transformers falls back to); ``video_sampling`` (fps, max_frames, video_size) wins, as in
    SmolVLMVideoProcessor.__init__."""
    cfg = {k: v for k, v in dict(cfg or {}).items() if v is not None}
    sampling = cfg.get("video_sampling") or {}

    def edge(value: Any, name: str) -> int:
        if isinstance(value, dict):
            value = value.get("longest_edge")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SourceError(f"video processor {name} must be {{'longest_edge': <positive int>}}, got {value!r}")
        return value

    size = edge(sampling.get("video_size", cfg.get("size", DEFAULTS["size"])), "size")
    resample = int(cfg.get("resample", DEFAULTS["resample"]))
    if resample not in RESAMPLE:
        raise SourceError(f"video processor resample {resample} is not supported (Lanczos 1 or bicubic 3)")
    for switch in ("do_resize", "do_rescale", "do_normalize"):
        if cfg.get(switch) is False:
            raise SourceError(f"video processor {switch}=false is not supported")
    return {"kind": "smolvlm", "size": size,
            "max_image_size": edge(cfg.get("max_image_size", DEFAULTS["max_image_size"]), "max_image_size"),
            "resample": resample, "image_mean": [float(v) for v in cfg.get("image_mean", DEFAULTS["image_mean"])],
            "image_std": [float(v) for v in cfg.get("image_std", DEFAULTS["image_std"])],
            "rescale_factor": float(cfg.get("rescale_factor", DEFAULTS["rescale_factor"])),
            "fps": float(sampling.get("fps", DEFAULTS["fps"])),
            "num_frames": int(sampling.get("max_frames", DEFAULTS["num_frames"])), "tile_tokens": int(tile_tokens)}


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SmolVLMVideoProcessor's first resize: the longest edge becomes ``longest`` (at most
    4096), the other follows the aspect ratio, truncated and made even."""
    longest = min(MAX_IMAGE_SIZE, longest)
    ratio = width / height
    if width >= height:
        width, height = longest, int(longest / ratio)
        height += height % 2
    else:
        height, width = longest, int(longest * ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English cardinal words as num2words writes them ("twenty-one", "one hundred and five",
    "two thousand, three hundred and forty"), for 0 <= n < 1,000,000."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        head = number_words(n // 1000) + " thousand"
        if rest == 0:
            return head
        return head + (" and " if rest < 100 else ", ") + number_words(rest)
    raise ValueError(f"{n} frames")


def video_prompt(frame_times: Sequence[float], duration: float, frame_text: str) -> str:
    """The text SmolVLMProcessor puts in place of ``<video>``; ``frame_text``: one frame's image tokens."""
    out = INTRO.format(count=number_words(len(frame_times)), duration=str(timedelta(seconds=int(duration))))
    for second in frame_times:
        out += FRAME.format(stamp=f"{int(second // 60):02d}:{int(second % 60):02d}") + frame_text
    return out + OUTRO


class SmolVLMVideoProcessor:
    """Sampled frames -> one normalised ``max_image_size`` square per frame."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.kind = RESAMPLE[int(spec["resample"])]
        mean = np.asarray(spec["image_mean"], np.float32) * np.float32(1.0 / spec["rescale_factor"])
        std = np.asarray(spec["image_std"], np.float32) * np.float32(1.0 / spec["rescale_factor"])
        self._table = ((np.arange(256, dtype=np.float32)[:, None] - mean) / std).astype(np.float32)

    def sampler(self, fps: float | None = None, max_frames: int | None = None,
                num_frames: int | None = None) -> Sampler:
        """SmolVLM2 samples about ``fps`` frames per second, at most ``num_frames`` (or
        ``max_frames``; the checkpoint's when neither is given)."""
        cap = num_frames if num_frames is not None else max_frames
        return smolvlm_sampler(float(self.spec["fps"]) if fps is None else fps,
                               int(self.spec["num_frames"]) if cap is None else int(cap))

    def frames(self, video: Video) -> np.ndarray:
        """[T, 3, S, S] float32 pixels of the video's frames."""
        frames = video.frames
        t, height, width = frames.shape[:3]
        h, w = longest_edge_size(height, width, int(self.spec["size"]))
        if (h, w) != (height, width):
            frames = resize_frames(frames, h, w, self.kind)
        side = int(self.spec["max_image_size"])
        if (side, side) != (h, w):
            frames = resize_frames(frames, side, side, self.kind)
        return np.ascontiguousarray(self._table[frames, np.arange(3)].transpose(0, 3, 1, 2))
