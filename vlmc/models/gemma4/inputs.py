"""The runtime half of Gemma 4: image placeholders expanded as Gemma4Processor expands
them, and the vision encoder's host-planned inputs.

The chat template writes ``<|image|>`` for an image; the processor replaces it in the text
with ``<|image>`` + ``<|image|>`` x N + ``<image|>`` (N the image's soft tokens). All three
are special tokens, so the text around them tokenizes the same and the expansion works on
ids. Image tokens attend causally, as the text does (the decoders of
``use_bidirectional_attention`` null; the importer refuses the others).

The encoder runs on every image's real patches packed one image after another: each
patch's table rows (its column, and the table size plus its row), its (column, row) for
the 2D rope, a block mask that keeps each image to itself, and for each soft token the
k x k patches of its cell (cells row-major, as transformers' pooler orders them).
"""
from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ...errors import InputError
from ..common.image_processing import ProcessedImages
from ..common.video import Video
from ..family import Inputs


def patch_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) of each patch of an h x w grid, row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return cols.reshape(-1), rows.reshape(-1)


def pool_cells(h: int, w: int, k: int) -> np.ndarray:
    """[h w / k^2, k^2]: the patch indices of each k x k cell, cells row-major."""
    idx = np.arange(h * w).reshape(h // k, k, w // k, k).transpose(0, 2, 1, 3)
    return idx.reshape(-1, k * k)


class Gemma4Inputs(Inputs):
    def __init__(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        super().__init__(meta, processor_spec, tokenizer)
        s = self.settings
        self.boi_token_id: int | None = s.get("boi_token_id")
        self.eoi_token_id: int | None = s.get("eoi_token_id")
        self.pad_token_id = int(s.get("pad_token_id") or 0)
        self.kernel = int(s.get("pooling_kernel_size") or 3)
        self.table = int(s.get("position_embedding_size") or 0)

    def preprocess_media(self, media: Sequence[Any]) -> ProcessedImages:
        if any(isinstance(m, Video) for m in media):
            raise InputError("Gemma 4 takes text and images here; video inputs are not supported")
        return self.preprocess(media)

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        tok = self.image_token_id
        if not self.matched_images(ids, images, tok):
            return list(ids)
        counts = iter(images.num_tokens)
        out: list[int] = []
        for i in ids:
            if i == tok:
                out += [self.boi_token_id, *[tok] * next(counts), self.eoi_token_id]
            else:
                out.append(i)
        return out

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        grids = images.grid_thw.tolist()
        cols, rows, cells, seg = [], [], [], []
        start = 0
        for n, (_, h, w) in enumerate(grids):
            c, r = patch_grid(h, w)
            if self.table and max(h, w) > self.table:
                raise InputError(f"an image of {w}x{h} patches exceeds the encoder's position table ({self.table})")
            cols.append(c)
            rows.append(r)
            cells.append(pool_cells(h, w, self.kernel) + start)
            seg.append(np.full(h * w, n))
            start += h * w
        col, row = np.concatenate(cols), np.concatenate(rows)
        segments = np.concatenate(seg)
        pixels = np.asarray(images.pixel_values, dtype=np.float32)
        pixels = (pixels - np.float32(0.5)) * np.float32(2.0)   # as Gemma4VisionPatchEmbedder, in float32
        pool = np.concatenate(cells).astype(np.int32)
        return {"pixels": mx.array(pixels),
                "position_index": mx.array(np.stack([col, self.table + row], axis=-1).astype(np.int32)),
                "rope_positions": mx.array(np.stack([col, row], axis=-1).astype(np.int32)),
                "mask": None if len(grids) == 1 else mx.array(segments[:, None] == segments[None, :])[None, None],
                "pool_index": mx.array(pool),
                "pad_ids": mx.array(np.full(len(pool), self.pad_token_id, dtype=np.int32))}
