"""Gemma 4: a vision encoder over each image's own patch grid (2D rope, 3 x 3 average
pooling to a variable number of soft tokens between ``<|image>`` and ``<image|>``) and a
Gemma 4 decoder (sliding-window and global layers of different head sizes, KV sharing,
per-layer input embeddings, routed experts with ``enable_moe_block``); ``gemma4_text`` is
the decoder alone. Text and images; the checkpoints' audio tower and video inputs are not
supported."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Gemma4(Family):
    name = "gemma4"
    model_types = ("gemma4", "gemma4_text")
    weight_prefixes = (("model.embed_vision.", "projector.embed_vision."),)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "gemma4")

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import Gemma4Inputs
        return Gemma4Inputs(meta, processor_spec, tokenizer)


FAMILY = Gemma4()
