"""Qwen3-VL (dense): dynamic-resolution images in 16-px patches with learned position
embeddings resampled to each image's grid, a patch merger plus DeepStack mergers whose
features are added to the decoder's hidden state at the image tokens after its first
layers, interleaved M-RoPE and a QK-normed decoder."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Qwen3VL(Family):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from .importer import processor_spec
        return processor_spec(preprocessor_config, meta)

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import Qwen3VLInputs
        return Qwen3VLInputs(meta, processor_spec, tokenizer)


FAMILY = Qwen3VL()
