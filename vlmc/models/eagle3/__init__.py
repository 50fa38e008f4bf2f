"""EAGLE-3 drafters in the speculators format (``speculators_model_type: "eagle3"``): one
Llama-style decoder layer that drafts from the hidden states a target computes at three of
its layers (``--draft-model`` / ``load(..., draft=...)``); the runtime drafts with it through
``runtime.eagle3.Eagle3Drafter``."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Eagle3(Family):
    name = "eagle3"
    model_types = ("eagle3",)
    # speculators names its tensors without a model prefix; "midlayer." is EAGLE-3's original naming
    weight_prefixes = (("fc.", "draft.fc."), ("layers.0.", "draft.layer.0."), ("midlayer.", "draft.layer.0."),
                       ("norm.", "draft.norm."), ("embed_tokens.", "draft.embed_tokens."),
                       ("d2t", "draft.d2t"), ("t2d", "draft.t2d"), ("lm_head.", "draft.lm_head."))

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "none"}


FAMILY = Eagle3()
