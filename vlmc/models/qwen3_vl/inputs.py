"""The runtime half of Qwen3-VL: Qwen2-VL's M-RoPE positions and vision plan, plus the
taps of the learned position embeddings' bilinear resampling to each image's grid."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ...errors import InputError
from ..common.image_processing import ProcessedImages
from ..common.qwen_vl_video import patch_timestamps, video_spec_from_config
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
    """Videos: each temporal patch is a run of video tokens between ``<|vision_start|>`` and
    ``<|vision_end|>``, after its time as text (``<1.5 seconds>``), as Qwen3VLProcessor writes
    the prompt; M-RoPE treats every such run as a one-frame image."""

    def video_spec(self, processor_spec: dict[str, Any]) -> dict[str, Any] | None:
        """The stored video spec; for an artifact without one, transformers' fallback: the
        video processor reads the image processor's config (its ``size`` included)."""
        if processor_spec.get("video") is not None:
            return processor_spec["video"]
        if self.settings.get("video_token_id") is None or processor_spec.get("kind") != "qwen2_vl":
            return None
        cfg = {k: v for k, v in processor_spec.items() if k not in ("kind", "min_pixels", "max_pixels")}
        cfg["size"] = {"shortest_edge": processor_spec["min_pixels"], "longest_edge": processor_spec["max_pixels"]}
        return video_spec_from_config(cfg, "qwen3_vl")

    def _token(self, key: str, text: str) -> int:
        tid = self.settings.get(key)
        if tid is None and self.tokenizer is not None:
            tid = self.tokenizer.token_to_id(text)
        if tid is None:
            raise InputError(f"this model's tokenizer has no {text} token, which its video prompts need")
        return int(tid)

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        video = self.video_token_id
        if images is None or video is None or video not in ids:
            return super().expand(ids, images)
        if self.tokenizer is None:
            raise RuntimeError("Qwen3-VL video prompts are expanded with the artifact's tokenizer; none was given")
        # images expand as usual; each video token then becomes its frames' structure
        kinds = images.item_token_ids(self.image_token_id)
        flat = super().expand(ids, images)
        start, end = self._token("vision_start_token_id", "<|vision_start|>"), \
            self._token("vision_end_token_id", "<|vision_end|>")
        merge, temporal = self.settings["merge_size"] ** 2, self.settings["temporal_patch_size"]
        out: list[int] = []
        i, k = 0, 0
        while i < len(flat):
            if flat[i] not in (self.image_token_id, video):
                out.append(flat[i])
                i += 1
                continue
            n = images.num_tokens[k]
            if kinds[k] == video:
                t, h, w = (int(v) for v in images.grid_thw[k])
                timing = images.item_timing()[k]
                stamps = patch_timestamps(timing["indices"], timing["native_fps"], temporal)
                for j in range(t):
                    out += self.tokenizer.encode(f"<{stamps[j]:.1f} seconds>", add_special_tokens=False)
                    out += [start] + [video] * (h * w // merge) + [end]
            else:
                out += flat[i:i + n]
            i += n
            k += 1
        return out

    def _grids(self, images: ProcessedImages | None) -> list[tuple[int, int, int]]:
        """One grid per run of placeholder tokens: a video's temporal patches are runs of their own."""
        if images is None:
            return []
        out = []
        for g, kind in zip(images.grid_thw.tolist(), images.item_token_ids(self.image_token_id)):
            out += [(1, g[1], g[2])] * g[0] if kind == self.video_token_id and kind is not None else [tuple(g)]
        return out

    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        return mrope_positions(ids, self.placeholder_ids or (self.image_token_id,), self._grids(images),
                               self.settings["merge_size"])

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        rows, weights = position_taps(images.grid_thw, self.settings["position_grid"], self.settings["merge_size"])
        return {"patches": mx.array(images.pixel_values), **plan_vision(images.grid_thw, self.settings),
                "pos_taps": mx.array(rows), "pos_weights": mx.array(weights)}


class Qwen3VLImageInputs(Qwen3VLInputs):
    """Qwen3-VL's inputs for a family whose videos are not supported yet (Qwen3.5)."""

    derive_video = False
