"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images (packed patches, 2x2 merged into
tokens), M-RoPE positions over (t, h, w), and Qwen2.5-VL's windowed vision attention."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "qwen2_vl")

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import QwenInputs
        return QwenInputs(meta, processor_spec, tokenizer)


FAMILY = Qwen2VL()
