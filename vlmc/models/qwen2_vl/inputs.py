"""The runtime half of Qwen2-VL / Qwen2.5-VL: M-RoPE positions and the vision plan."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..common.image_processing import ProcessedImages
from ..family import Inputs
from .positions import mrope_positions
from .vision_plan import plan_vision


class QwenInputs(Inputs):
    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        grids = [] if images is None else [tuple(g) for g in images.grid_thw.tolist()]
        return mrope_positions(ids, self.image_token_id, grids, self.settings["merge_size"])

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        return {"patches": mx.array(images.pixel_values), **plan_vision(images.grid_thw, self.settings)}
