"""Image preprocessing from a processor spec, parity-tested against transformers' PIL processors.

A *processor spec* is a plain, JSON-serialisable dict the compiler stores in the artifact
(``processor.json``): its ``kind`` names the processor (``processors``: the Qwen-VL
dynamic-resolution one, CLIP/SigLIP fixed-resolution, Idefics3's tiles), and every other field is explicit:
``processors.spec_from_preprocessor_config`` fills what a checkpoint's
``preprocessor_config.json`` leaves out with the defaults of the transformers class that
would have read it. This module holds what every processor shares.

How the numbers stay equal to transformers' PIL backend (transformers 5.x):

* RGB conversion is ``convert_rgb`` (alpha composited onto white).
* Resizing is PIL's ``Image.resize((w, h), resample)`` on the *uint8* RGB image, exactly the
  call transformers makes (it turns its uint8 array back into a PIL image to resize).
* Rescale is ``float32(float64(v) * rescale_factor)``, normalisation is
  ``(x - float32(mean)) / float32(std)`` in float32. Because the input is uint8 and both steps
  are per-channel and elementwise, they are evaluated once per channel on the 256 possible
  values (the same numpy operations, so bit-identical results) and gathered from that table.
* Center crop (which pads with zeros when the crop is larger) runs on uint8 before rescale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import InputError, SourceError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]

BICUBIC = int(Image.Resampling.BICUBIC)

# Class defaults of the transformers processors (transformers 5.24), used for absent or null fields.
COMMON_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "resample": BICUBIC,
}
FLAG_FIELDS = ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")
COMMON_FIELDS = ("kind", "resample", *FLAG_FIELDS, "rescale_factor", "image_mean", "image_std")

# Config switches for processing steps these kinds do not implement: refuse rather than ignore.
UNSUPPORTED_SWITCHES = ("do_pad", "do_pan_and_scan", "do_image_splitting")

# --------------------------------------------------------------------------- spec


def take(cfg: dict, defaults: dict, key: str) -> Any:
    return cfg[key] if key in cfg else defaults[key]


def _channels(value: Any, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    values = [float(v) for v in value]
    if len(values) != 3:
        raise SourceError(f"preprocessor_config.json: {name} must have 3 values, got {len(values)}")
    return values


def common_fields(cfg: dict, defaults: dict) -> dict:
    """The fields every processor kind has (flags, rescale, resample, mean/std)."""
    out = {key: bool(take(cfg, defaults, key)) for key in FLAG_FIELDS}
    out["rescale_factor"] = float(take(cfg, defaults, "rescale_factor"))
    out["resample"] = int(take(cfg, defaults, "resample"))
    out["image_mean"] = _channels(take(cfg, defaults, "image_mean"), "image_mean")
    out["image_std"] = _channels(take(cfg, defaults, "image_std"), "image_std")
    return out


# --------------------------------------------------------------------------- processors


@dataclass
class ProcessedImages:
    """What the vision encoder and the prompt builder need from a batch of images.

    pixel_values: float32, as the family's vision tower takes them (e.g. packed patches of
        all images, or one (3, H, W) array per image).
    grid_thw: int64 (n, 3) patch grid per image for dynamic-resolution processors, else None.
    num_tokens: how many placeholder tokens each image occupies in the prompt.
    image_sizes: (height, width) of each image as given, before resizing.
    content_keys: per-image content hashes, filled on first use by
        ``vision_cache.image_keys`` (the vision and prefix caches both key on them).
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray | None
    num_tokens: list[int]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    content_keys: list[str] | None = field(default=None, repr=False, compare=False)


class ImageProcessor:
    """Shared steps: RGB conversion, resize with PIL, rescale+normalise by lookup table.

    A subclass names its spec ``kind`` and extra ``fields``, builds a spec from a config
    (``spec_from_config``), checks its own fields (``validate_spec``) and ``process``es."""

    kind = ""
    fields: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()  # UNSUPPORTED_SWITCHES this kind does implement

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        """Raise ArtifactError for a bad value of this kind's own fields."""

    def __init__(self, spec: dict) -> None:
        self.spec = dict(spec)
        self.resample = Image.Resampling(int(spec["resample"]))
        self._table = _value_table(spec)

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rgb(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__} (use vlmc.runtime.images.load_image)")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InputError(f"image has zero size ({width}x{height})")
        if self.spec["do_convert_rgb"]:
            return convert_rgb(image)
        if image.mode != "RGB":
            raise InputError(f"image mode {image.mode!r} needs RGB conversion, but the processor spec has do_convert_rgb=false")
        return image

    def _resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        return image.resize((width, height), resample=self.resample)

    def _to_chw(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, H, W), rescaled and normalised per the spec."""
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self._table[c], pixels[:, :, c], out=out[c])
        return out


def _value_table(spec: dict) -> np.ndarray:
    """(3, 256) float32: each uint8 value after transformers' rescale and normalise steps."""
    values = np.arange(256, dtype=np.uint8)
    if spec["do_rescale"]:
        x = (values.astype(np.float64) * float(spec["rescale_factor"])).astype(np.float32)
    else:
        x = values.astype(np.float32)
    table = np.repeat(x[None, :], 3, axis=0)
    if spec["do_normalize"]:
        mean = np.asarray(spec["image_mean"], dtype=np.float32)[:, None]
        std = np.asarray(spec["image_std"], dtype=np.float32)[:, None]
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)


def convert_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as transformers' image processors do it.

    Transparent images (an "A" band, or palette/greyscale/RGB with a `transparency`
    entry) are composited onto opaque white; every other mode is `convert("RGB")`.
    Always returns a new image.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop an (H, W, C) array; where the crop is larger than the image, the missing
    border is zero, placed as transformers' center_crop places it."""
    height, width = pixels.shape[:2]
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    canvas = np.zeros((new_h, new_w, *pixels.shape[2:]), dtype=pixels.dtype)
    pad_top = math.ceil((new_h - height) / 2)
    pad_left = math.ceil((new_w - width) / 2)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top += pad_top
    left += pad_left
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
