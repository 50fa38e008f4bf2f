"""PaliGemma and PaliGemma 2: a SigLIP tower, one linear projector and a Gemma (Gemma 2)
decoder, prompted as "<image>" x N + "<bos>" + text + "\\n" (no chat template) with full
attention over that prefix and causal attention over what it generates (a prefix-LM)."""
from __future__ import annotations

from typing import Any

from ..family import Family


class PaliGemma(Family):
    name = "paligemma"
    model_types = ("paligemma",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "siglip",
                                             tokens_per_image=meta["inputs"]["tokens_per_image"])

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import PaliGemmaInputs
        return PaliGemmaInputs(meta, processor_spec, tokenizer)


FAMILY = PaliGemma()
