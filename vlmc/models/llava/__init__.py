"""LLaVA: a CLIP or SigLIP tower, one chosen hidden layer, an MLP projector and a
Llama/Qwen2/Mistral decoder; each image is a fixed run of tokens at ``<image>``. With a
Pixtral tower (Pixtral-12B), images keep their own size and stand as rows of ``[IMG]``
tokens (``common/pixtral_inputs.py``)."""
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
        if meta["inputs"].get("tower") == "pixtral":
            from ..common.pixtral_processor import pixtral_spec
            return pixtral_spec(preprocessor_config, meta)
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "clip",
                                             tokens_per_image=meta["inputs"]["tokens_per_image"])

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        if meta["inputs"].get("tower") == "pixtral":
            from ..common.pixtral_inputs import PixtralInputs
            return PixtralInputs(meta, processor_spec, tokenizer)
        return super().inputs(meta, processor_spec, tokenizer)  # fixed token runs, pixels as they come


FAMILY = Llava()
