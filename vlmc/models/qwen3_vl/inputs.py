"""The runtime half of Qwen3-VL: Qwen2-VL's M-RoPE positions and vision plan, plus the
taps of the learned position embeddings' bilinear resampling to each image's grid."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..common.image_processing import ProcessedImages
from ..family import Inputs
from ..qwen2_vl.positions import mrope_positions
from ..qwen2_vl.vision_plan import plan_vision


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The two table rows and weights of each ``index`` on an axis of ``size`` patches,
    resampled from ``side`` rows with align_corners: transformers' float32 arithmetic."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def position_taps(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [S, 4] int32, weights [S, 4] float32): the four position-table rows each patch
    (in the processor's merge-block order) mixes and their bilinear weights, so that
    sum_k table[rows[:, k]] * weights[:, k] is F.interpolate(bilinear, align_corners=True)
    of the square table to the image's patch grid, as Qwen3-VL's vision model computes it."""
    rows, weights = [], []
    for t, h, w in np.asarray(grid_thw).tolist():
        within = np.arange(h * w)
        col = (within // (merge * merge)) % (w // merge) * merge + within % merge
        row = within // (merge * merge * (w // merge)) * merge + (within // merge) % merge
        h_taps, h_w = _axis_taps(row, h, side)
        w_taps, w_w = _axis_taps(col, w, side)
        idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        wt = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        rows.append(np.tile(idx, (t, 1)))
        weights.append(np.tile(wt, (t, 1)))
    return np.concatenate(rows).astype(np.int32), np.concatenate(weights).astype(np.float32)


class Qwen3VLInputs(Inputs):
    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        grids = [] if images is None else [tuple(g) for g in images.grid_thw.tolist()]
        return mrope_positions(ids, self.image_token_id, grids, self.settings["merge_size"])

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        rows, weights = position_taps(images.grid_thw, self.settings["position_grid"], self.settings["merge_size"])
        return {"patches": mx.array(images.pixel_values), **plan_vision(images.grid_thw, self.settings),
                "pos_taps": mx.array(rows), "pos_weights": mx.array(weights)}
