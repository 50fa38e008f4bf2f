"""Gemma 3: a SigLIP tower, an average-pooled projector (a fixed number of soft tokens per
image between ``<start_of_image>`` and ``<end_of_image>``, attending to each other in both
directions) and a Gemma 3 decoder (sliding-window and global layers); ``gemma3_text`` is
the decoder alone."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3", "gemma3_text")

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.processors import spec_from_preprocessor_config
        return spec_from_preprocessor_config(preprocessor_config, "siglip",
                                             tokens_per_image=meta["inputs"]["tokens_per_image"])

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import Gemma3Inputs
        return Gemma3Inputs(meta, processor_spec, tokenizer)


FAMILY = Gemma3()
