"""LLaVA: a CLIP or SigLIP tower, one chosen hidden layer, an MLP projector and a
Llama/Qwen2/Mistral decoder; each image is a fixed run of tokens at ``<image>``."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Llava(Family):
    name = "llava"
    model_types = ("llava",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "clip",
                                             tokens_per_image=meta["inputs"]["tokens_per_image"])

    # inputs: the Family default (fixed token runs, one position stream, pixels as they come)


FAMILY = Llava()
