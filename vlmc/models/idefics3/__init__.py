"""Idefics3, SmolVLM and SmolVLM2: images split into tiles plus a global image, a SigLIP
tower with NaViT-style position buckets, a pixel-shuffle connector and a Llama decoder;
each image is spelled out in the prompt as ``<fake_token_around_image>`` +
``<row_i_col_j>`` + tokens per tile, then ``<global-img>`` + the global image's tokens."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Idefics3(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    weight_prefixes = (("model.text_model.", "text."), ("model.vision_model.", "vision."),
                       ("model.connector.modality_projection.", "projector."))

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from .importer import processor_spec
        return processor_spec(preprocessor_config, meta)

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import Idefics3Inputs
        return Idefics3Inputs(meta, processor_spec, tokenizer)


FAMILY = Idefics3()
