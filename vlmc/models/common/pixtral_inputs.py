"""The runtime half shared by models with a Pixtral vision encoder (Mistral 3, and LLaVA
checkpoints such as Pixtral-12B): each image's rows of ``[IMG]`` tokens in the prompt, and
the tower's host-planned inputs.

An image of R x C merged tokens stands in the prompt as, row by row, C ``[IMG]`` tokens and
an ``[IMG_BREAK]``, the last row's break being ``[IMG_END]`` (PixtralProcessor writes this
text in place of the template's single ``[IMG]``; all three are special tokens, so the text
around them tokenizes the same and the expansion can work on ids). Only the ``[IMG]``
tokens take image features.

The tower attends within each image (a block-diagonal mask over the packed patches) and
rotates queries and keys by each patch's (row, column) in its image.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ...errors import InputError
from .image_processing import ProcessedImages
from ..family import Inputs

BREAK_TOKEN = "[IMG_BREAK]"
END_TOKEN = "[IMG_END]"


def image_rows(rows: int, cols: int, image: int, brk: int, end: int) -> list[int]:
    """The ids one image of ``rows`` x ``cols`` tokens expands to."""
    out = ([image] * cols + [brk]) * rows
    out[-1] = end
    return out


def patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, column) of every packed patch of every image, in merge-block order: [S, 2]."""
    out = []
    for _, h, w in grid_thw.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        out.append(np.stack([a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (hh, ww)], axis=-1))
    return np.concatenate(out, axis=0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def image_mask(grid_thw: np.ndarray) -> mx.array | None:
    """[1, 1, S, S]: each patch attends to its own image's patches (None for one image)."""
    lengths = [int(h * w) for _, h, w in grid_thw.tolist()]
    if len(lengths) <= 1:
        return None
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return mx.array(seg[:, None] == seg[None, :])[None, None]


class PixtralInputs(Inputs):
    def __init__(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        super().__init__(meta, processor_spec, tokenizer)
        self.merge_size = int(self.settings["merge_size"])

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        tok_id = self.image_token_id
        n_images = self.matched_images(ids, images, tok_id)
        if not n_images:
            return list(ids)
        if self.tokenizer is None:
            raise RuntimeError("Pixtral image rows are spelled with the artifact's tokenizer; none was given")
        brk, end = (self.tokenizer.token_to_id(t) for t in (BREAK_TOKEN, END_TOKEN))
        if brk is None or end is None:
            raise InputError(f"the tokenizer lacks {BREAK_TOKEN} or {END_TOKEN}, which this model's image prompts need")
        out: list[int] = []
        grids = iter(images.grid_thw.tolist())
        for i in ids:
            if i == tok_id:
                _, h, w = next(grids)
                out.extend(image_rows(h // self.merge_size, w // self.merge_size, tok_id, brk, end))
            else:
                out.append(i)
        return out

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        return {"patches": mx.array(images.pixel_values),
                "rope_positions": mx.array(patch_positions(images.grid_thw, self.merge_size)),
                "mask": image_mask(images.grid_thw)}
