"""Image preprocessing from a processor spec, parity-tested against transformers' PIL processors.

A *processor spec* is a plain, JSON-serialisable dict the compiler stores in the artifact:

    {"kind": "qwen2_vl", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
     "merge_size", "resample", "do_convert_rgb", "do_resize", "do_rescale", "rescale_factor",
     "do_normalize", "image_mean", "image_std"}

    {"kind": "clip", "size": {"shortest_edge": n} | {"height": h, "width": w},
     "do_center_crop", "crop_size": {"height": h, "width": w} | None, "resample",
     "do_convert_rgb", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
     "image_mean", "image_std", "tokens_per_image"}

Every field is explicit: `spec_from_preprocessor_config` fills what a checkpoint's
`preprocessor_config.json` leaves out with the defaults of the transformers class that
would have read it (Qwen2VLImageProcessor, CLIPImageProcessor, SiglipImageProcessor).

How the numbers stay equal to transformers' PIL backend (transformers 5.x):

* RGB conversion is `images.convert_rgb` (alpha composited onto white).
* Resizing is PIL's `Image.resize((w, h), resample)` on the *uint8* RGB image, exactly the
  call transformers makes (it turns its uint8 array back into a PIL image to resize).
* Rescale is `float32(float64(v) * rescale_factor)`, normalisation is
  `(x - float32(mean)) / float32(std)` in float32. Because the input is uint8 and both steps
  are per-channel and elementwise, we evaluate them once per channel on the 256 possible
  values (the same numpy operations, so bit-identical results) and gather from that table.
* Center crop (which pads with zeros when the crop is larger) runs on uint8 before rescale.
* Qwen2-VL `smart_resize` uses Python's `round` (half to even), then floor/ceil against
  min/max pixels; patches are laid out (gh/m, gw/m, m, m, C, T, p, p) with the single
  image repeated T = temporal_patch_size times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vlmc.errors import ArtifactError, InputError, SourceError
from vlmc.runtime.images import convert_rgb

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]

MAX_ASPECT_RATIO = 200
_BICUBIC = int(Image.Resampling.BICUBIC)

# Class defaults of the transformers processors (transformers 5.24), used for absent or null fields.
_COMMON_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "resample": _BICUBIC,
}
_QWEN2_VL_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
_CLIP_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
_SIGLIP_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "crop_size": None,
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
}

# Config switches for processing steps these kinds do not implement: refuse rather than ignore.
_UNSUPPORTED_SWITCHES = ("do_pad", "do_pan_and_scan", "do_image_splitting")

_FLAG_FIELDS = ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")
_QWEN2_VL_FIELDS = (
    "kind", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
    "resample", *_FLAG_FIELDS, "rescale_factor", "image_mean", "image_std",
)
_CLIP_FIELDS = (
    "kind", "size", "do_center_crop", "crop_size", "resample", *_FLAG_FIELDS,
    "rescale_factor", "image_mean", "image_std", "tokens_per_image",
)


# --------------------------------------------------------------------------- spec


def spec_from_preprocessor_config(cfg: dict, kind: str, **extra: Any) -> dict:
    """Normalise a HF `preprocessor_config.json` dict into an explicit processor spec.

    `kind` is "qwen2_vl" (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), "clip" or "siglip". The "siglip"
    kind, and "clip" given a config whose `image_processor_type` names a SigLIP processor,
    take SiglipImageProcessor's defaults (exact height x width resize, no crop, mean/std
    0.5); plain "clip" takes CLIPImageProcessor's (shortest edge 224, center crop 224,
    OpenAI mean/std). Both produce a spec of kind "clip". `extra` adds or overrides fields
    (the compiler passes `tokens_per_image=` for clip specs). Raises SourceError for a
    config this module cannot honour.
    """
    cfg = {k: v for k, v in dict(cfg).items() if v is not None}  # null means "class default"
    for switch in _UNSUPPORTED_SWITCHES:
        if cfg.get(switch):
            raise SourceError(f"preprocessor_config.json sets {switch}=true, which vlmc's {kind} preprocessing does not support")

    if kind == "qwen2_vl":
        spec = _qwen2_vl_spec(cfg)
    elif kind in ("clip", "siglip"):
        ptype = str(cfg.get("image_processor_type", ""))
        siglip = kind == "siglip" or ptype.lower().startswith("siglip")
        spec = _clip_spec(cfg, _SIGLIP_DEFAULTS if siglip else _CLIP_DEFAULTS)
    else:
        raise SourceError(f"unknown image processor kind {kind!r}; expected 'qwen2_vl', 'clip' or 'siglip'")
    spec.update(extra)
    try:
        _validate(spec)
    except ArtifactError as exc:
        raise SourceError(f"preprocessor_config.json: {exc}") from None
    return spec


def _take(cfg: dict, defaults: dict, key: str) -> Any:
    return cfg[key] if key in cfg else defaults[key]


def _channels(value: Any, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    values = [float(v) for v in value]
    if len(values) != 3:
        raise SourceError(f"preprocessor_config.json: {name} must have 3 values, got {len(values)}")
    return values


def _common_fields(cfg: dict, defaults: dict) -> dict:
    out = {key: bool(_take(cfg, defaults, key)) for key in _FLAG_FIELDS}
    out["rescale_factor"] = float(_take(cfg, defaults, "rescale_factor"))
    out["resample"] = int(_take(cfg, defaults, "resample"))
    out["image_mean"] = _channels(_take(cfg, defaults, "image_mean"), "image_mean")
    out["image_std"] = _channels(_take(cfg, defaults, "image_std"), "image_std")
    return out


def _qwen2_vl_spec(cfg: dict) -> dict:
    d = _QWEN2_VL_DEFAULTS
    size = cfg.get("size") or {}
    if not isinstance(size, dict):
        raise SourceError(f"preprocessor_config.json: Qwen2-VL size must be a dict, got {size!r}")
    # As Qwen2VLImageProcessor.__init__: top-level min/max_pixels win over size.*_edge.
    # (size.min_pixels/max_pixels is an older layout; accepted as a fallback.)
    min_pixels = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", d["min_pixels"])))
    max_pixels = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels", d["max_pixels"])))
    return {
        "kind": "qwen2_vl",
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "patch_size": int(_take(cfg, d, "patch_size")),
        "temporal_patch_size": int(_take(cfg, d, "temporal_patch_size")),
        "merge_size": int(_take(cfg, d, "merge_size")),
        **_common_fields(cfg, d),
    }


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


def _clip_spec(cfg: dict, d: dict) -> dict:
    size = _size_dict(_take(cfg, d, "size"), "size", square_int=False)
    if set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise SourceError(
            f"preprocessor_config.json: size {size} is not supported; expected {{'shortest_edge'}} or {{'height', 'width'}}"
        )
    do_center_crop = bool(_take(cfg, d, "do_center_crop"))
    crop_raw = _take(cfg, d, "crop_size")
    crop_size = _size_dict(crop_raw, "crop_size", square_int=True) if crop_raw is not None else None
    return {
        "kind": "clip",
        "size": size,
        "do_center_crop": do_center_crop,
        "crop_size": crop_size,
        **_common_fields(cfg, d),
    }


def _validate(spec: dict) -> None:
    """Raise ArtifactError if `spec` is not a complete, coherent processor spec."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("qwen2_vl", "clip"):
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ArtifactError(f"processor spec has unknown kind {kind!r}; expected 'qwen2_vl' or 'clip'")
    required = _QWEN2_VL_FIELDS if spec["kind"] == "qwen2_vl" else _CLIP_FIELDS
    missing = [key for key in required if key not in spec]
    if missing:
        raise ArtifactError(f"{spec['kind']} processor spec is missing {', '.join(missing)}")
    for key in ("image_mean", "image_std"):
        if len(spec[key]) != 3:
            raise ArtifactError(f"processor spec {key} must have 3 values")
    if any(float(s) == 0.0 for s in spec["image_std"]):
        raise ArtifactError("processor spec image_std contains 0")
    try:
        Image.Resampling(int(spec["resample"]))
    except ValueError:
        raise ArtifactError(f"processor spec resample={spec['resample']!r} is not a PIL filter") from None
    if spec["kind"] == "qwen2_vl":
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if int(spec[key]) <= 0:
                raise ArtifactError(f"processor spec {key} must be positive, got {spec[key]}")
        if spec["min_pixels"] > spec["max_pixels"]:
            raise ArtifactError(f"processor spec min_pixels {spec['min_pixels']} > max_pixels {spec['max_pixels']}")
    else:
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


# --------------------------------------------------------------------------- processors


@dataclass
class ProcessedImages:
    """What the vision encoder and the prompt builder need from a batch of images.

    pixel_values: float32. qwen2_vl: (sum of patches, C*T*p*p), images concatenated along
        the patch axis; clip: (n, 3, H, W).
    grid_thw: int64 (n, 3) patch grid per image (qwen2_vl), else None.
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
    """Shared steps: RGB conversion, resize with PIL, rescale+normalise by lookup table."""

    def __init__(self, spec: dict) -> None:
        _validate(spec)
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


class ClipImageProcessor(ImageProcessor):
    """Fixed resolution: resize (shortest edge or exact size), optional center crop."""

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

    def process(self, images: Sequence[Image.Image]) -> ProcessedImages:
        arrays: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        for image in images:
            rgb = self._rgb(image)
            width, height = rgb.size
            sizes.append((height, width))
            if self.spec["do_resize"]:
                new_h, new_w = self._resized_size(height, width)
                rgb = self._resize(rgb, new_h, new_w)
            pixels = np.asarray(rgb)
            if self.spec["do_center_crop"]:
                crop = self.spec["crop_size"]
                pixels = center_crop(pixels, int(crop["height"]), int(crop["width"]))
            arrays.append(self._to_chw(pixels))
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
        return ProcessedImages(pixel_values=pixel_values, grid_thw=None, num_tokens=[tokens] * len(arrays), image_sizes=sizes)


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


def make_image_processor(spec: dict) -> ImageProcessor:
    """Build the processor a spec describes. Raises ArtifactError for an invalid spec."""
    _validate(spec)
    if spec["kind"] == "qwen2_vl":
        return Qwen2VLImageProcessor(spec)
    return ClipImageProcessor(spec)
