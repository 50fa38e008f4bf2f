"""The runtime half of Gemma 4: image and video placeholders expanded as Gemma4Processor
expands them, and the vision encoder's host-planned inputs.

The chat template writes ``<|image|>`` for an image; the processor replaces it in the text
with ``<|image>`` + ``<|image|>`` x N + ``<image|>`` (N the image's soft tokens). All three
are special tokens, so the text around them tokenizes the same and the expansion works on
ids. A video (``<|video|>`` in the template) becomes its frames, each its time as text
(``mm:ss``), a space and ``<|image>`` + ``<|video|>`` x N + ``<image|>``, joined by
spaces (``common.gemma4_video``); the times are text, tokenized with what surrounds them,
so a prompt with videos is expanded on its text and re-tokenized, as the processor does.
Image and video tokens attend causally, as the text does (the decoders of
``use_bidirectional_attention`` null; the importer refuses the others).

The encoder runs on every image's (and video frame's) real patches packed one after
another: each patch's table rows (its column, and the table size plus its row), its
(column, row) for the 2D rope, a block mask that keeps each image and frame to itself,
and for each soft token the k x k patches of its cell (cells row-major, as transformers'
pooler orders them).
"""
from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import numpy as np

from ...errors import InputError
from ..common.gemma4_video import video_prompt
from ..common.image_processing import ProcessedImages
from ..family import Inputs

AUDIO_REFUSED = "Gemma 4 takes text, images and videos here; audio inputs are not supported"


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
        self.audio_token_id: int | None = s.get("audio_token_id")

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        if self.audio_token_id is not None and self.audio_token_id in ids:
            raise InputError(AUDIO_REFUSED)
        if images is not None and any(t is not None for t in images.item_timing()):
            return self._expand_with_videos(ids, images)
        video = self.settings.get("video_token_id")
        if video is not None and video in ids:
            raise InputError(f"the prompt has {ids.count(video)} video placeholder(s) but no video was given")
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

    def _expand_with_videos(self, ids: list[int], images: ProcessedImages) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("Gemma 4 prompts with videos are expanded with the artifact's tokenizer; none was given")
        image, video, boi, eoi = (tok.id_to_token(t) for t in (self.image_token_id, self.video_token_id,
                                                              self.boi_token_id, self.eoi_token_id))
        kinds = images.item_token_ids(self.image_token_id)
        slots = [i for i in ids if i in (self.image_token_id, self.video_token_id)]
        if slots != kinds:
            name = {self.image_token_id: "image", self.video_token_id: "video"}
            raise InputError(f"the prompt's image/video placeholders ({', '.join(name[i] for i in slots) or 'none'}) "
                             f"do not match the images and videos given ({', '.join(name[i] for i in kinds)})")
        pieces = re.split(f"({re.escape(image)}|{re.escape(video)})", tok.decode(ids, skip_special_tokens=False))
        out = pieces[0]
        for k, (timing, n, grid) in enumerate(zip(images.item_timing(), images.num_tokens, images.grid_thw.tolist())):
            if timing is None:
                out += boi + image * n + eoi
            else:
                out += video_prompt(timing["timestamps"], boi + video * (n // grid[0]) + eoi)
            out += pieces[2 * k + 2]
        expanded = tok.encode(out, add_special_tokens=False)
        for t, kind in ((self.image_token_id, image), (self.video_token_id, video)):
            if sum(1 for i in expanded if i == t) != sum(n for n, k in zip(images.num_tokens, kinds) if k == t):
                raise InputError(f"the prompt's text holds {kind!r} itself; images and videos go in their parts")
        return expanded

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        frames = [(h, w) for t, h, w in images.grid_thw.tolist() for _ in range(t)]   # a video: t frames
        cols, rows, cells, seg = [], [], [], []
        start = 0
        for n, (h, w) in enumerate(frames):
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
                "mask": None if len(frames) == 1 else mx.array(segments[:, None] == segments[None, :])[None, None],
                "pool_index": mx.array(pool),
                "pad_ids": mx.array(np.full(len(pool), self.pad_token_id, dtype=np.int32))}
