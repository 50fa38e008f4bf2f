"""The fixed-resolution image processors of CLIP and SigLIP towers (spec kind ``clip``):
CLIPImageProcessor's and SiglipImageProcessor's PIL paths.

A ``siglip`` config, or a ``clip`` one whose ``image_processor_type`` names a SigLIP
processor, takes SiglipImageProcessor's defaults (exact height x width resize, no crop,
mean/std 0.5); otherwise CLIPImageProcessor's (shortest edge 224, center crop 224, OpenAI
mean/std). Both make a spec of kind ``clip``; the family adds ``tokens_per_image``.

Gemma 3's processor adds pan-and-scan (``pan_and_scan`` in the spec, set by the family from
``do_pan_and_scan``): an image whose aspect ratio passes ``min_ratio_to_activate`` is also
cut into 2 to ``max_num_crops`` equal crops along its long side, each processed like an
image; the item's rows are the image then its crops (``grid_thw`` holds (rows, 1, 1)).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import ArtifactError, InputError, SourceError
from .image_processing import (COMMON_DEFAULTS, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                               OPENAI_CLIP_STD, ImageProcessor, ProcessedImages, center_crop, common_fields,
                               take)

CLIP_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
SIGLIP_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "crop_size": None,
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
}
# Gemma3Processor's image keyword defaults (transformers 5.24), for null config fields
PAN_AND_SCAN_DEFAULTS = {"min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2}


def pan_and_scan_spec(cfg: dict) -> dict | None:
    """The ``pan_and_scan`` spec field from a Gemma 3 preprocessor config (None: off)."""
    if not cfg.get("do_pan_and_scan"):
        return None
    out = {}
    for key, default in PAN_AND_SCAN_DEFAULTS.items():
        value = cfg.get(f"pan_and_scan_{key}")
        out[key] = type(default)(default if value is None else value)
    return out


def pan_and_scan_boxes(height: int, width: int, spec: dict) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each crop, as transformers' Gemma3ImageProcessor.pan_and_scan
    cuts them (none when the image is not elongated enough or the crops would be too small)."""
    long, short = (width, height) if width >= height else (height, width)
    if long / short < spec["min_ratio_to_activate"]:
        return []
    n = int(math.floor(long / short + 0.5))
    n = min(int(math.floor(long / spec["min_crop_size"])), n)
    n = min(spec["max_num_crops"], max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < spec["min_crop_size"]:
        return []
    return [(top, left, crop_h, crop_w) for top, left in
            itertools.product([crop_h * i for i in range(n_h)], [crop_w * i for i in range(n_w)])]


def _size_dict(value: Any, name: str, square_int: bool) -> dict:
    """transformers' get_size_dict: int -> shortest edge (CLIP/SigLIP size) or a square
    (crop_size); [h, w] -> height/width; dicts pass through."""
    if isinstance(value, bool):
        raise SourceError(f"preprocessor_config.json: bad {name} {value!r}")
    if isinstance(value, int):
        return {"height": value, "width": value} if square_int else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    raise SourceError(f"preprocessor_config.json: cannot understand {name} {value!r}")


class ClipImageProcessor(ImageProcessor):
    """Fixed resolution: resize (shortest edge or exact size), optional center crop."""

    kind = "clip"
    fields = ("size", "do_center_crop", "crop_size", "tokens_per_image")

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:
        siglip = kind == "siglip" or str(cfg.get("image_processor_type", "")).lower().startswith("siglip")
        d = SIGLIP_DEFAULTS if siglip else CLIP_DEFAULTS
        size = _size_dict(take(cfg, d, "size"), "size", square_int=False)
        if set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise SourceError(f"preprocessor_config.json: size {size} is not supported; expected "
                              "{'shortest_edge'} or {'height', 'width'}")
        crop_raw = take(cfg, d, "crop_size")
        crop_size = _size_dict(crop_raw, "crop_size", square_int=True) if crop_raw is not None else None
        return {"kind": cls.kind, "size": size, "do_center_crop": bool(take(cfg, d, "do_center_crop")),
                "crop_size": crop_size, **common_fields(cfg, d)}

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        pas = spec.get("pan_and_scan")
        if pas is not None and (not isinstance(pas, dict) or set(pas) != set(PAN_AND_SCAN_DEFAULTS)
                                or pas["min_crop_size"] < 1 or pas["max_num_crops"] < 2
                                or not pas["min_ratio_to_activate"] > 0):
            raise ArtifactError(f"processor spec pan_and_scan {pas!r} is not {{min_crop_size >= 1, "
                                "max_num_crops >= 2, min_ratio_to_activate > 0}")
        size = spec["size"]
        if set(size) not in ({"shortest_edge"}, {"height", "width"}) or min(size.values()) <= 0:
            raise ArtifactError(f"processor spec size {size} is not a positive shortest_edge or height/width")
        if spec["do_center_crop"]:
            crop = spec["crop_size"]
            if not isinstance(crop, dict) or set(crop) != {"height", "width"} or min(crop.values()) <= 0:
                raise ArtifactError(f"processor spec crop_size {crop} must be a positive height/width")
        tokens = spec["tokens_per_image"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise ArtifactError(f"processor spec tokens_per_image must be a positive int, got {tokens!r}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the processed image for an input of this size."""
        if self.spec["do_resize"]:
            height, width = self._resized_size(height, width)
        if self.spec["do_center_crop"]:
            crop = self.spec["crop_size"]
            height, width = int(crop["height"]), int(crop["width"])
        return height, width

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.spec["size"]
        if "shortest_edge" in size:
            # transformers' get_resize_output_image_size(default_to_square=False): the long
            # side is int(short_target * long / short), truncated.
            target = int(size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            return (new_long, target) if width <= height else (target, new_long)
        return int(size["height"]), int(size["width"])

    def _one(self, rgb: Image.Image) -> np.ndarray:
        if self.spec["do_resize"]:
            rgb = self._resize(rgb, *self._resized_size(rgb.size[1], rgb.size[0]))
        pixels = np.asarray(rgb)
        if self.spec["do_center_crop"]:
            crop = self.spec["crop_size"]
            pixels = center_crop(pixels, int(crop["height"]), int(crop["width"]))
        return self._to_chw(pixels)

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:
        arrays: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        rows: list[int] = []
        pas = self.spec.get("pan_and_scan")
        for image in images:
            rgb = self._rgb(image)
            width, height = rgb.size
            sizes.append((height, width))
            arrays.append(self._one(rgb))
            boxes = pan_and_scan_boxes(height, width, pas) if pas else []
            if boxes:  # transformers crops the uint8 image, then resizes each crop through PIL
                whole = np.asarray(rgb)
                arrays += [self._one(Image.fromarray(whole[t:t + h, x:x + w])) for t, x, h, w in boxes]
            rows.append(1 + len(boxes))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                f"images processed to different sizes {sorted(s[1:] for s in shapes)}; "
                "this processor spec needs do_resize with a fixed size or a center crop to batch them"
            )
        if arrays:
            pixel_values = np.stack(arrays)
        else:
            pixel_values = np.zeros((0, 3, *self.output_size(1, 1)), np.float32)
        tokens = int(self.spec["tokens_per_image"])
        if not pas:
            return ProcessedImages(pixel_values=pixel_values, grid_thw=None, num_tokens=[tokens] * len(arrays),
                                   image_sizes=sizes)
        grid = np.array([[n, 1, 1] for n in rows], dtype=np.int64).reshape(-1, 3)
        return ProcessedImages(pixel_values=pixel_values, grid_thw=grid, num_tokens=[tokens * n for n in rows],
                               image_sizes=sizes)
