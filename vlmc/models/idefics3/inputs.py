"""The runtime half of Idefics3 / SmolVLM: each image spelled out in the prompt's text as
the processors do it, and the tower's position ids.

The chat template writes ``<image>`` once per image; Idefics3Processor and SmolVLMProcessor
replace it in the *text* with, for an image cut into R x C tiles,
``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x N for every tile, row by row,
"\\n" after each row, then "\\n<fake_token_around_image><global-img>" + ``<image>`` x N +
``<fake_token_around_image>`` for the global image (an image of one tile: the last part
without its leading newline), and then tokenize; the newlines may merge with each other
or with the text around them. The expansion therefore re-tokenizes the prompt's text
with the sequences in place, with the artifact's tokenizer.

SmolVLM2 videos: the template writes ``<video>`` (plain text); SmolVLMProcessor replaces it
with an introduction, then per sampled frame its time and the frame as a one-tile image
(``common.smolvlm_video``). A video is one item whose rows are its frames.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ...errors import InputError
from ..common.idefics3_processor import TiledImages
from ..common.image_processing import ProcessedImages
from ..common.smolvlm_video import video_prompt
from ..common.video import Video
from ..family import Inputs

VIDEO_TEXT = "<video>"

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


def image_sequence(rows: int, cols: int, tokens: int, image: str) -> str:
    """The text an image of ``rows`` x ``cols`` tiles (0 x 0: one tile) stands for."""
    tile = image * tokens
    if rows == 0 and cols == 0:
        return f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tile}{FAKE_IMAGE_TOKEN}"
    text = "".join("".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return text + f"\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tile}{FAKE_IMAGE_TOKEN}"


def torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """torch.arange(start, end, step) in float32 as torch computes it on the CPU, to the
    bit: the element count from double arithmetic; in runs of 16 elements, two 8-wide
    vectors each from its first element rounded to float32 plus j * step in double; the
    elements after the last whole run one by one as start + i * step in double."""
    count = int(np.ceil((end - start) / step))
    out = (start + step * np.arange(count, dtype=np.float64)).astype(np.float32)
    whole = count // 16 * 16
    if whole:
        bases = out[:whole:8].astype(np.float64)
        out[:whole] = (bases[:, None] + np.arange(8) * step).astype(np.float32).reshape(-1)
    return out


def bucket_positions(patches: int, grid: int) -> np.ndarray:
    """The position-table row of each patch of a full tile of ``patches`` x ``patches``
    patches, for a table of ``grid`` x ``grid`` rows, as Idefics3VisionEmbeddings buckets
    them: fractional coordinates i * (1 / patches) (float32) against the boundaries
    torch.arange(1 / grid, 1, 1 / grid) (float32), right-closed. Rounding puts some patches
    of some grid sizes (19, 25, 29, ...) in the bucket below their own."""
    boundaries = torch_arange_f32(1.0 / grid, 1.0, 1.0 / grid)
    frac = np.arange(patches, dtype=np.float32) * (np.float32(1.0) / np.float32(patches))
    frac = np.minimum(frac, np.float32(1.0 - 1e-6))
    buckets = np.searchsorted(boundaries, frac, side="right")
    return (buckets[:, None] * grid + buckets[None, :]).reshape(-1).astype(np.int32)


class Idefics3Inputs(Inputs):
    def __init__(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        super().__init__(meta, processor_spec, tokenizer)
        s = self.settings
        self.position_ids = bucket_positions(s["tile_size"] // s["patch_size"], s["position_grid"])

    def preprocess_media(self, media: Sequence[Any]) -> ProcessedImages:
        """Images as tiles, videos as one tile per frame, in order."""
        if not any(isinstance(m, Video) for m in media):
            return self.preprocess(media)
        if self.video_processor is None:
            raise InputError("this model takes no videos")
        parts: list[TiledImages] = []
        tile_tokens = int(self.settings["tile_tokens"])
        for m in media:
            if not isinstance(m, Video):
                parts.append(self.preprocess([m]))
                continue
            pixels = self.video_processor.frames(m)
            n = pixels.shape[0]
            parts.append(TiledImages(pixels, np.array([[n, 1, 1]], dtype=np.int64), [n * tile_tokens],
                                     [m.frames.shape[1:3]], grids=[(0, 0)], timing=[{
                                         "fps": m.sampled_fps, "timestamps": m.timestamps, "native_fps": m.meta.fps,
                                         "indices": [int(i) for i in m.indices], "duration": m.meta.duration}]))
        return TiledImages(np.concatenate([p.pixel_values for p in parts]), np.concatenate([p.grid_thw for p in parts]),
                           [n for p in parts for n in p.num_tokens], [s for p in parts for s in p.image_sizes],
                           timing=[t for p in parts for t in p.item_timing()],
                           grids=[g for p in parts for g in p.grids])

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        if images is not None and any(t is not None for t in images.item_timing()):
            return self._expand_with_videos(ids, images)
        tok_id = self.image_token_id
        n_images = self.matched_images(ids, images, tok_id)
        if not n_images:
            return list(ids)
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("Idefics3 prompts are expanded with the artifact's tokenizer; none was given")
        image = tok.id_to_token(tok_id)
        for name in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN):
            if tok.token_to_id(name) is None:
                raise InputError(f"the tokenizer has no {name} token, which this model's image prompts need")
        per_tile = int(self.settings["tile_tokens"])
        pieces = tok.decode(ids, skip_special_tokens=False).split(image)
        out = pieces[0]
        for piece, (rows, cols) in zip(pieces[1:], images.grids):
            out += image_sequence(rows, cols, per_tile, image) + piece
        expanded = tok.encode(out, add_special_tokens=False)
        if sum(1 for t in expanded if t == tok_id) != sum(images.num_tokens):
            raise InputError(f"the prompt's text holds {image!r} itself; images go in image parts")
        return expanded

    def _expand_with_videos(self, ids: list[int], images: TiledImages) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("Idefics3 prompts are expanded with the artifact's tokenizer; none was given")
        image = tok.id_to_token(self.image_token_id)
        per_tile = int(self.settings["tile_tokens"])
        pieces = re.split(f"({re.escape(image)}|{re.escape(VIDEO_TEXT)})", tok.decode(ids, skip_special_tokens=False))
        markers, timing = pieces[1::2], images.item_timing()
        want = [VIDEO_TEXT if t is not None else image for t in timing]
        if markers != want:
            raise InputError(f"the prompt's image/video placeholders ({', '.join(markers) or 'none'}) do not match "
                             f"the images and videos given ({', '.join(want)})")
        frame = image_sequence(0, 0, per_tile, image)
        out = pieces[0]
        for k, (t, (rows, cols)) in enumerate(zip(timing, images.grids)):
            if t is None:
                out += image_sequence(rows, cols, per_tile, image)
            else:
                out += video_prompt([i / t["native_fps"] for i in t["indices"]], t["duration"], frame)
            out += pieces[2 * k + 2]
        expanded = tok.encode(out, add_special_tokens=False)
        if sum(1 for t in expanded if t == self.image_token_id) != sum(images.num_tokens):
            raise InputError(f"the prompt's text holds {image!r} itself; images go in image parts")
        return expanded

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        return {"pixels": mx.array(images.pixel_values), "position_ids": mx.array(self.position_ids)}
