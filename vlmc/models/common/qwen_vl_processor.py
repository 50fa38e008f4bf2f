"""The dynamic-resolution image processor of the Qwen-VL families (spec kind ``qwen2_vl``):
Qwen2VLImageProcessor's PIL path.

``smart_resize`` uses Python's ``round`` (half to even), then floor/ceil against
min/max pixels; patches are laid out (gh/m, gw/m, m, m, C, T, p, p) with the single
image repeated T = temporal_patch_size times.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ...errors import ArtifactError, InputError, SourceError
from .image_processing import (COMMON_DEFAULTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, ProcessedImages,
                               common_fields, take)

MAX_ASPECT_RATIO = 200
DEFAULTS = {
    **COMMON_DEFAULTS,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL target size: both sides multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if height <= 0 or width <= 0:
        raise InputError(f"image has zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio:g} ({width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLImageProcessor(ImageProcessor):
    """Dynamic resolution: resize to multiples of patch*merge, then flatten into patches."""

    kind = "qwen2_vl"
    fields = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:
        d = DEFAULTS
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise SourceError(f"preprocessor_config.json: Qwen2-VL size must be a dict, got {size!r}")
        # As Qwen2VLImageProcessor.__init__: top-level min/max_pixels win over size.*_edge.
        # (size.min_pixels/max_pixels is an older layout; accepted as a fallback.)
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", d["min_pixels"])))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels", d["max_pixels"])))
        return {"kind": cls.kind, "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
                "patch_size": int(take(cfg, d, "patch_size")),
                "temporal_patch_size": int(take(cfg, d, "temporal_patch_size")),
                "merge_size": int(take(cfg, d, "merge_size")), **common_fields(cfg, d)}

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        for key in cls.fields:
            if int(spec[key]) <= 0:
                raise ArtifactError(f"processor spec {key} must be positive, got {spec[key]}")
        if spec["min_pixels"] > spec["max_pixels"]:
            raise ArtifactError(f"processor spec min_pixels {spec['min_pixels']} > max_pixels {spec['max_pixels']}")

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.patch_size = int(spec["patch_size"])
        self.merge_size = int(spec["merge_size"])
        self.temporal_patch_size = int(spec["temporal_patch_size"])
        self.factor = self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if self.spec["do_resize"]:
            return smart_resize(height, width, self.factor, int(self.spec["min_pixels"]), int(self.spec["max_pixels"]))
        if height % self.factor or width % self.factor:
            raise InputError(
                f"image of {width}x{height} is not a multiple of {self.factor} and the processor spec has do_resize=false"
            )
        return height, width

    def num_tokens_for(self, height: int, width: int) -> int:
        """Prompt tokens for an image of this original size, without processing it."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:
        patches: list[np.ndarray] = []
        grids: list[list[int]] = []
        sizes: list[tuple[int, int]] = []
        for image in images:
            rgb = self._rgb(image)
            width, height = rgb.size
            sizes.append((height, width))
            new_h, new_w = self.target_size(height, width)
            if self.spec["do_resize"]:
                rgb = self._resize(rgb, new_h, new_w)
            flat, grid_h, grid_w = self._patchify(self._to_chw(np.asarray(rgb)))
            patches.append(flat)
            grids.append([1, grid_h, grid_w])
        merge = self.merge_size**2
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        return ProcessedImages(
            pixel_values=np.concatenate(patches, axis=0) if patches else np.zeros((0, self.patch_dim), np.float32),
            grid_thw=grid_thw,
            num_tokens=[int(t * h * w) // merge for t, h, w in grid_thw],
            image_sizes=sizes,
        )

    def _patchify(self, chw: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(C, H, W) -> (gh*gw, C*T*p*p) ordered (gh/m, gw/m, m, m | C, T, p, p)."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        channels, height, width = chw.shape
        grid_h, grid_w = height // p, width // p
        x = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return x.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w
