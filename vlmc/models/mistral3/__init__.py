"""Mistral 3 (Mistral-Small-3.1/3.2, Ministral 3 shapes): a Pixtral vision encoder over
images of their own size, an RMSNorm, a patch merger folding each 2x2 block of patches
into one token, an MLP projector and a Mistral/Llama decoder; each image is rows of
``[IMG]`` tokens closed by ``[IMG_BREAK]`` and, at the end, ``[IMG_END]``."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Mistral3(Family):
    name = "mistral3"
    model_types = ("mistral3",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.pixtral_processor import pixtral_spec
        return pixtral_spec(preprocessor_config, meta)

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from ..common.pixtral_inputs import PixtralInputs
        return PixtralInputs(meta, processor_spec, tokenizer)


FAMILY = Mistral3()
