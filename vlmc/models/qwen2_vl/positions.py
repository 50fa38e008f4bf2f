"""Rotary position ids, planned on the host per sequence.

M-RoPE (Qwen2-VL family): text tokens advance all three streams together; an image's
tokens get (t, h, w) grid coordinates offset by the position where the image starts,
and text after it resumes at that start + the grid's largest side. Later tokens
(decode) use position = index + delta, the same on all streams.
"""
from __future__ import annotations

import numpy as np


def mrope_positions(ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[np.ndarray, int]:
    """(positions [3, L], delta) for one sequence whose image tokens are already expanded."""
    ids_arr = np.asarray(ids)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    i, cur, g = 0, 0, 0
    n = len(ids)
    while i < n:
        if ids_arr[i] == image_token_id:
            t, h, w = grids[g]
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[0, i:i + count] = tt.reshape(-1) + cur
            out[1, i:i + count] = hh.reshape(-1) + cur
            out[2, i:i + count] = ww.reshape(-1) + cur
            cur += max(gh, gw)
            i += count
            g += 1
        else:
            j = i
            while j < n and ids_arr[j] != image_token_id:
                j += 1
            out[:, i:j] = np.arange(cur, cur + (j - i))
            cur += j - i
            i = j
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta
