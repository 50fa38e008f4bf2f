"""Qwen3.5 (dense): a hybrid decoder whose Gated DeltaNet linear-attention layers (a
recurrent state per sequence) are interleaved with gated full-attention layers (QK-norm,
partial interleaved M-RoPE, a sigmoid gate on the attention output), behind Qwen3-VL's
vision tower without DeepStack."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Qwen35(Family):
    name = "qwen3_5"
    model_types = ("qwen3_5",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..qwen3_vl.importer import processor_spec
        return processor_spec(preprocessor_config, meta)

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from ..qwen3_vl.inputs import Qwen3VLImageInputs  # (no video yet)
        return Qwen3VLImageInputs(meta, processor_spec, tokenizer)


FAMILY = Qwen35()
