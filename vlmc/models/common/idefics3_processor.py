"""The image-splitting processor of Idefics3 and SmolVLM (spec kind ``idefics3``):
Idefics3ImageProcessor's and SmolVLMImageProcessor's PIL paths (the same steps).

Each image is resized so its longest edge is ``size_longest_edge`` (up or down; the other
side keeps the aspect ratio, rounded up to an even number), then up to whole multiples of
the tile size ``max_image_size``; an image of more than one tile is cut into tiles row by
row and followed by the whole image squashed to one tile (the "global" image), an image of
one tile is that tile. Without ``do_image_splitting`` every image is squashed to one
tile. Every resize is PIL's on the uint8 image, as transformers does it; then rescale and
normalise. All tiles are the same size, so padding (``do_pad``) never applies to the
images of one prompt.

``ProcessedImages.pixel_values`` holds every tile of every image, [tiles, 3, T, T];
``grid_thw`` is (tiles, 1, 1) per image, so the rows of one image are found as for the
Qwen-VL processors (the vision and prefix caches split images that way), and
``TiledImages.grids`` the (rows, cols) of each image's tiles ((0, 0): not split), which
the prompt's image sequence spells out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from ...errors import ArtifactError, InputError, SourceError
from .image_processing import (COMMON_DEFAULTS, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageProcessor,
                               ProcessedImages, common_fields, take)

MAX_IMAGE_SIZE = 4096  # transformers' cap on the resized image's longest edge
DEFAULTS = {
    **COMMON_DEFAULTS,
    "resample": int(Image.Resampling.LANCZOS),
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
    "size": {"longest_edge": 4 * 364},
    "max_image_size": {"longest_edge": 364},
    "do_image_splitting": True,
}


@dataclass
class TiledImages(ProcessedImages):
    """ProcessedImages of an image-splitting processor; ``grids``: (rows, cols) per image."""

    grids: list[tuple[int, int]] = field(default_factory=list)


def _longest_edge(value, name: str) -> int:
    if not isinstance(value, dict) or not isinstance(value.get("longest_edge"), int) or value["longest_edge"] <= 0:
        raise SourceError(f"preprocessor_config.json: {name} must be {{'longest_edge': <positive int>}}, got {value!r}")
    return int(value["longest_edge"])


def resize_to_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size for these processors: the longest edge
    becomes ``longest``, the other follows the aspect ratio (truncated, then made even), and
    both are capped at MAX_IMAGE_SIZE keeping the ratio."""
    ratio = width / height
    if width >= height:
        width = longest
        height = int(width / ratio)
        height += height % 2
    else:
        height = longest
        width = int(height * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ratio)
    return max(height, 1), max(width, 1)


def resize_to_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both sides up to whole tiles."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return height, width


class Idefics3ImageProcessor(ImageProcessor):
    """Tiles plus a global image per image; the family adds ``tile_tokens``."""

    kind = "idefics3"
    fields = ("size_longest_edge", "max_image_size", "do_image_splitting", "tile_tokens")
    switches = ("do_image_splitting", "do_pad")  # config switches this kind implements

    @classmethod
    def spec_from_config(cls, cfg: dict, kind: str) -> dict:
        d = DEFAULTS
        return {"kind": cls.kind, "size_longest_edge": _longest_edge(take(cfg, d, "size"), "size"),
                "max_image_size": _longest_edge(take(cfg, d, "max_image_size"), "max_image_size"),
                "do_image_splitting": bool(take(cfg, d, "do_image_splitting")), **common_fields(cfg, d)}

    @classmethod
    def validate_spec(cls, spec: dict) -> None:
        for key in ("size_longest_edge", "max_image_size", "tile_tokens"):
            value = spec[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ArtifactError(f"processor spec {key} must be a positive int, got {value!r}")

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.tile = int(spec["max_image_size"])

    def tiles_of(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """The tiles of one RGB image (PIL, before rescaling) and its (rows, cols)."""
        width, height = image.size
        if self.spec["do_resize"]:
            h, w = resize_to_longest_edge(height, width, int(self.spec["size_longest_edge"]))
            image = self._resize(image, h, w)
        tile = self.tile
        if not self.spec["do_image_splitting"]:
            return [self._resize(image, tile, tile)], 0, 0
        h, w = resize_to_tiles(image.size[1], image.size[0], tile)
        image = self._resize(image, h, w)
        if h <= tile and w <= tile:
            return [image], 0, 0
        rows, cols = h // tile, w // tile
        tiles = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                 for r in range(rows) for c in range(cols)]
        return tiles + [self._resize(image, tile, tile)], rows, cols

    def process(self, images: Sequence[Image.Image]) -> TiledImages:
        arrays: list[np.ndarray] = []
        sizes, grids, counts = [], [], []
        for image in images:
            rgb = self._rgb(image)
            sizes.append((rgb.size[1], rgb.size[0]))
            tiles, rows, cols = self.tiles_of(rgb)
            if any(t.size != (self.tile, self.tile) for t in tiles):
                raise InputError(f"image of {rgb.size[0]}x{rgb.size[1]} does not make {self.tile}-px tiles")
            arrays.extend(self._to_chw(np.asarray(t)) for t in tiles)
            grids.append((rows, cols))
            counts.append(len(tiles))
        pixels = np.stack(arrays) if arrays else np.zeros((0, 3, self.tile, self.tile), np.float32)
        tokens = int(self.spec["tile_tokens"])
        return TiledImages(pixel_values=pixels, grid_thw=np.array([[n, 1, 1] for n in counts], dtype=np.int64).reshape(-1, 3),
                           num_tokens=[n * tokens for n in counts], image_sizes=sizes, grids=grids)
