"""Gemma 4's multi-token-prediction assistant (``gemma4_assistant``): a small decoder with
no KV cache of its own that drafts tokens for a Gemma 4 target from the target's last
hidden state and KV caches (``--draft-model`` / ``load(..., draft=...)``); the runtime
drafts with it through ``runtime.speculative.SharedKVDrafter``."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Gemma4Assistant(Family):
    name = "gemma4_assistant"
    model_types = ("gemma4_assistant",)
    weight_prefixes = (("pre_projection.", "projector.pre_projection."),
                       ("post_projection.", "projector.post_projection."),
                       ("masked_embedding.", "projector.masked_embedding."))

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "none"}


FAMILY = Gemma4Assistant()
