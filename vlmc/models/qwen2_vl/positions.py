"""Rotary position ids, planned on the host per sequence.

M-RoPE (Qwen2-VL family): text tokens advance all three streams together; an image's
tokens get (t, h, w) grid coordinates offset by the position where the image starts,
and text after it resumes at that start + the grid's largest side. A video is the same
with t > 1; Qwen2.5-VL spaces its temporal coordinates by ``tokens_per_second`` x the
seconds each temporal patch spans (float32 products, truncated, as transformers computes
them). Later tokens (decode) use position = index + delta, the same on all streams.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def mrope_positions(ids: list[int], image_token_id: int | Sequence[int], grids: list[tuple[int, int, int]],
                    merge: int, intervals: Sequence[float | None] | None = None) -> tuple[np.ndarray, int]:
    """(positions [3, L], delta) for one sequence whose image/video tokens are already
    expanded. ``image_token_id``: the placeholder id, or all of them (image and video);
    ``intervals``: per item, the temporal step (None: 1, consecutive)."""
    slots = np.asarray([image_token_id] if np.isscalar(image_token_id) else list(image_token_id))
    ids_arr = np.asarray(ids)
    is_slot = np.isin(ids_arr, slots)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    i, cur, g = 0, 0, 0
    n = len(ids)
    while i < n:
        if is_slot[i]:
            t, h, w = grids[g]
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            step = None if intervals is None else intervals[g]
            times = np.arange(t) if step is None else \
                (np.arange(t, dtype=np.float32) * np.float32(step)).astype(np.int64)
            tt, hh, ww = np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")
            out[0, i:i + count] = tt.reshape(-1) + cur
            out[1, i:i + count] = hh.reshape(-1) + cur
            out[2, i:i + count] = ww.reshape(-1) + cur
            cur += max(gh, gw)
            i += count
            g += 1
        else:
            j = i
            while j < n and not is_slot[j]:
                j += 1
            out[:, i:j] = np.arange(cur, cur + (j - i))
            cur += j - i
            i = j
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta
