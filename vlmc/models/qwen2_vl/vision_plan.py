"""Host-side planning of vision metadata, once per request (no syncs inside the graph).

Qwen2-VL: 2D rotary positions of every patch in merge-block order and a block-diagonal
mask so each image (each frame) attends only to itself. Qwen2.5-VL adds the window
order: patches grouped by merge unit are permuted window-major, windowed layers use a
per-window mask, full layers a per-image mask, and the features are permuted back.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


def _segment_mask(lengths: list[int]) -> mx.array | None:
    lengths = [n for n in lengths if n > 0]
    if len(lengths) <= 1:
        return None
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return mx.array(seg[:, None] == seg[None, :])[None, None]


def rope_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int32)


def window_order(grid_thw: np.ndarray, merge: int, window_size: int, patch: int) -> tuple[np.ndarray, list[int]]:
    """Merge-unit order that makes every window contiguous, and the window lengths (patches)."""
    win = window_size // merge // patch
    order, lengths, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        for frame in padded:
            for window in frame:
                kept = window[window >= 0]
                if kept.size:
                    order.append(kept + base)
                    lengths.append(int(kept.size) * merge * merge)
        base += t * gh * gw
    return np.concatenate(order).astype(np.int32), lengths


def plan_vision(grid_thw: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's host-planned inputs (``meta["inputs"]`` settings: merge_size,
    windowed, window_size, patch_size)."""
    merge = settings["merge_size"]
    pos = rope_positions(grid_thw, merge)
    frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    if not settings["windowed"]:
        return {"rope_positions": mx.array(pos), "mask": _segment_mask(frames)}
    order, win_lengths = window_order(grid_thw, merge, settings["window_size"], settings["patch_size"])
    unit = merge * merge
    pos = pos.reshape(-1, unit, 2)[order].reshape(-1, 2)
    return {"rope_positions": mx.array(pos), "mask_full": _segment_mask(frames),
            "mask_window": _segment_mask(win_lengths),
            "window_order": mx.array(order), "window_restore": mx.array(np.argsort(order).astype(np.int32))}
