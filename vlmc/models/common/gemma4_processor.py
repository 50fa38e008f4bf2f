"""Gemma 4's image processor (spec kind ``gemma4``): Gemma4ImageProcessorPil.

Each image keeps its aspect ratio: it is resized (PIL, on uint8) to the largest size with
at most ``max_soft_tokens * pooling_kernel_size^2`` patches of ``patch_size`` whose sides
are multiples of ``pooling_kernel_size * patch_size``; rescaled (no normalisation by
default: the tower maps [0, 1] to [-1, 1] itself); cut into patches of (row, column,
channel) order. transformers pads every image to the patch budget (padding marked by
position -1); here each image's real patches are packed one after another, with its
patch grid in ``grid_thw`` ([1, rows, columns]), which is all the padded rows say.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ...errors import ArtifactError, InputError
from .image_processing import COMMON_DEFAULTS, ImageProcessor, ProcessedImages, common_fields

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULTS = {**COMMON_DEFAULTS, "do_normalize": False, "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
            "patch_size": 16, "max_soft_tokens": 280, "pooling_kernel_size": 3}


def target_size(height: int, width: int, patch: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """(height, width) Gemma 4 resizes an image of this size to."""
    target_px = max_patches * patch ** 2
    factor = math.sqrt(target_px / (height * width))
    side = kernel * patch
    new_h = int(math.floor(factor * height / side)) * side
    new_w = int(math.floor(factor * width / side)) * side
    if new_h == 0 and new_w == 0:
        raise InputError(f"image of {width}x{height} pixels cannot be resized to whole {side}-pixel cells")
    longest = (max_patches // kernel ** 2) * side
    if new_h == 0:
        new_h, new_w = side, min(int(math.floor(width / height)) * side, longest)
    elif new_w == 0:
        new_w, new_h = side, min(int(math.floor(height / width)) * side, longest)
    if new_h * new_w > target_px:
        raise InputError(f"image of {width}x{height} pixels is too elongated: it would need more than "
                         f"{max_patches} patches")
    return new_h, new_w


class Gemma4ImageProcessor(ImageProcessor):
    kind = "gemma4"
    fields = ("patch_size", "max_soft_tokens", "pooling_kernel_size")

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:
        return {"kind": cls.kind, **{k: int(cfg.get(k, DEFAULTS[k])) for k in cls.fields},
                **common_fields(cfg, DEFAULTS)}

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        for key in cls.fields:
            if int(spec[key]) <= 0:
                raise ArtifactError(f"processor spec {key} must be positive, got {spec[key]}")
        if int(spec["max_soft_tokens"]) not in SUPPORTED_SOFT_TOKENS:
            raise ArtifactError(f"processor spec max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, "
                                f"got {spec['max_soft_tokens']}")

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.patch = int(spec["patch_size"])
        self.kernel = int(spec["pooling_kernel_size"])
        self.max_patches = int(spec["max_soft_tokens"]) * self.kernel ** 2

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:
        patches, grids, sizes = [], [], []
        p = self.patch
        for image in images:
            rgb = self._rgb(image)
            width, height = rgb.size
            sizes.append((height, width))
            new_h, new_w = (target_size(height, width, p, self.max_patches, self.kernel) if self.spec["do_resize"]
                            else (height, width))
            if (new_h, new_w) != (height, width):
                rgb = self._resize(rgb, new_h, new_w)
            chw = self._to_chw(np.asarray(rgb))
            gh, gw = new_h // p, new_w // p
            if gh % self.kernel or gw % self.kernel:
                raise InputError(f"image of {new_w}x{new_h} pixels does not pool into whole "
                                 f"{self.kernel}x{self.kernel} patch cells")
            x = chw[:, :gh * p, :gw * p].reshape(3, gh, p, gw, p).transpose(1, 3, 2, 4, 0)
            patches.append(np.ascontiguousarray(x.reshape(gh * gw, p * p * 3)))
            grids.append([1, gh, gw])
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        return ProcessedImages(
            pixel_values=np.concatenate(patches, axis=0) if patches else np.zeros((0, 3 * p * p), np.float32),
            grid_thw=grid_thw, num_tokens=[int(h * w) // self.kernel ** 2 for _, h, w in grid_thw],
            image_sizes=sizes)
