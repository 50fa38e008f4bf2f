"""The runtime half of Qwen2-VL / Qwen2.5-VL: M-RoPE positions, the vision plan, and videos
(temporal patches of 2 frames, placed at the video token)."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ..common.image_processing import ProcessedImages
from ..common.qwen_vl_video import video_spec_from_config
from ..family import Inputs
from .positions import mrope_positions
from .vision_plan import plan_vision


class QwenInputs(Inputs):
    def video_spec(self, processor_spec: dict[str, Any]) -> dict[str, Any] | None:
        """The stored video spec; for an artifact without one, transformers' fallback: the
        video processor reads the image processor's config (its pixel bounds included)."""
        if processor_spec.get("video") is not None:
            return processor_spec["video"]
        if self.settings.get("video_token_id") is None or processor_spec.get("kind") != "qwen2_vl":
            return None
        return video_spec_from_config(processor_spec)

    def time_intervals(self, images: ProcessedImages) -> list[float | None]:
        """Each item's temporal position step: Qwen2.5-VL spaces a video's temporal patches by
        tokens_per_second x seconds per patch (float32, as its processor's tensor holds it)."""
        if not self.settings.get("windowed"):  # Qwen2-VL: consecutive
            return [None] * len(images.num_tokens)
        rate = int(self.settings.get("tokens_per_second", 4))
        tps = int(self.settings["temporal_patch_size"])
        out: list[float | None] = []
        for timing in images.item_timing():
            if timing is None:
                out.append(None)
            else:
                per_grid = np.float32(tps / timing["fps"])
                out.append(float(np.float32(rate) * per_grid))
        return out

    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        grids = [] if images is None else [tuple(g) for g in images.grid_thw.tolist()]
        intervals = None if images is None else self.time_intervals(images)
        return mrope_positions(ids, self.placeholder_ids or (self.image_token_id,), grids,
                               self.settings["merge_size"], intervals)

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        return {"patches": mx.array(images.pixel_values), **plan_vision(images.grid_thw, self.settings)}
