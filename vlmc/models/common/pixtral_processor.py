"""Pixtral's variable-size image processor (spec kind ``pixtral``): PixtralImageProcessor's
PIL path as PixtralProcessor drives it.

No square resize: an image whose longer side exceeds ``longest_edge`` is scaled down by
``max(h, w) / longest_edge`` (sides floored), then each side is rounded *up* to a whole
number of ``patch_size * merge_size`` pixels (PixtralProcessor passes that product as the
image processor's patch size), so small images grow only to the next multiple. Patches
of ``patch_size`` are packed in merge-block order ``(gh/m, gw/m, m, m | C, p, p)``: a
merged token's m x m patches are adjacent rows, so the patch merger is a reshape.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ...errors import ArtifactError, InputError, SourceError
from .image_processing import (COMMON_DEFAULTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, ProcessedImages,
                               common_fields)

DEFAULTS = {**COMMON_DEFAULTS, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
            "longest_edge": 1024, "patch_size": 16, "merge_size": 1}


def target_size(height: int, width: int, longest_edge: int, factor: int) -> tuple[int, int]:
    """(height, width) Pixtral resizes an image of this size to."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    if height <= 0 or width <= 0:
        raise InputError(f"image aspect ratio is too extreme: it shrinks to {width}x{height} pixels "
                         f"under the longest edge {longest_edge}")
    return ((height - 1) // factor + 1) * factor, ((width - 1) // factor + 1) * factor


class PixtralImageProcessor(ImageProcessor):
    """Longest-edge limit, sides rounded up to whole merged patches, packed patches."""

    kind = "pixtral"
    fields = ("longest_edge", "patch_size", "merge_size")
    switches = ("do_pad",)  # batch padding: each image's patches are packed unpadded instead

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:
        size = cfg.get("size") or {"longest_edge": DEFAULTS["longest_edge"]}
        if not isinstance(size, dict) or "longest_edge" not in size:
            raise SourceError(f"preprocessor_config.json: Pixtral size must be {{'longest_edge': N}}, got {size!r}")
        patch = cfg.get("patch_size", DEFAULTS["patch_size"])
        if isinstance(patch, dict):
            if patch.get("height") != patch.get("width"):
                raise SourceError(f"preprocessor_config.json: patch_size {patch!r} is not square")
            patch = patch["height"]
        return {"kind": cls.kind, "longest_edge": int(size["longest_edge"]), "patch_size": int(patch),
                "merge_size": DEFAULTS["merge_size"], **common_fields(cfg, DEFAULTS)}

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        for key in cls.fields:
            if int(spec[key]) <= 0:
                raise ArtifactError(f"processor spec {key} must be positive, got {spec[key]}")

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.patch_size = int(spec["patch_size"])
        self.merge_size = int(spec["merge_size"])
        self.factor = self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.spec["do_resize"]:
            return target_size(height, width, int(self.spec["longest_edge"]), self.factor)
        if height % self.factor or width % self.factor:
            raise InputError(f"image of {width}x{height} is not a multiple of {self.factor} pixels and the "
                             "processor spec has do_resize=false")
        return height, width

    def num_tokens_for(self, height: int, width: int) -> int:
        """Image feature tokens (``[IMG]``) for an image of this original size."""
        h, w = self.target_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:
        patches, grids, sizes = [], [], []
        for image in images:
            rgb = self._rgb(image)
            width, height = rgb.size
            sizes.append((height, width))
            new_h, new_w = self.target_size(height, width)
            if (new_h, new_w) != (height, width):
                rgb = self._resize(rgb, new_h, new_w)
            patches.append(self._patchify(self._to_chw(np.asarray(rgb))))
            grids.append([1, new_h // self.patch_size, new_w // self.patch_size])
        dim = 3 * self.patch_size ** 2
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        return ProcessedImages(
            pixel_values=np.concatenate(patches, axis=0) if patches else np.zeros((0, dim), np.float32),
            grid_thw=grid_thw, num_tokens=[int(h * w) // self.merge_size ** 2 for _, h, w in grid_thw],
            image_sizes=sizes)

    def _patchify(self, chw: np.ndarray) -> np.ndarray:
        """(C, H, W) -> (gh*gw, C*p*p) in merge-block order."""
        p, m = self.patch_size, self.merge_size
        c, h, w = chw.shape
        x = chw.reshape(c, h // (p * m), m, p, w // (p * m), m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        return np.ascontiguousarray(x.reshape((h // p) * (w // p), c * p * p))


def unpack_patches(rows: np.ndarray, grid_h: int, grid_w: int, patch: int, merge: int) -> np.ndarray:
    """One image's packed patch rows back to (C, H, W) (for comparing with padded batches)."""
    c = rows.shape[1] // (patch * patch)
    x = rows.reshape(grid_h // merge, grid_w // merge, merge, merge, c, patch, patch)
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(c, grid_h * patch, grid_w * patch)


def pixtral_spec(preprocessor_config: dict, meta: dict) -> dict:
    """The spec of a model with a Pixtral tower: the tower's patch size and the model's merge
    size (PixtralProcessor resizes to multiples of their product, whatever patch size the
    image processor's own config names)."""
    from .processors import spec_from_preprocessor_config
    inp = meta["inputs"]
    return spec_from_preprocessor_config(preprocessor_config, "pixtral", patch_size=int(inp["patch_size"]),
                                         merge_size=int(inp["merge_size"]))
