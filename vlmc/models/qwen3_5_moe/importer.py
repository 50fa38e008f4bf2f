"""Qwen3.5-MoE checkpoints -> IR: Qwen3.5's program (``qwen3_5.importer``) with the sparse
MoE block (``common.moe.SparseMoe``) as every layer's feed-forward part.

transformers' Qwen3.5-MoE router always renormalises its top-k probabilities (there is no
``norm_topk_prob`` switch, unlike Qwen3-MoE); a config that says otherwise is refused.
The text config has no dense ``intermediate_size``: the routed experts' size stands in
for it where the shared config code asks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.core import Program
from ..common.moe import SparseMoe
from ..qwen3_5.importer import _DECODER
from ..qwen3_5.importer import build_program as build_qwen3_5


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = raw.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UnsupportedModelError("a Qwen3.5-MoE config.json needs a text_config with the decoder's sizes")
    if text.get("norm_topk_prob") is False:
        raise UnsupportedModelError("Qwen3.5-MoE routing without renormalised top-k weights is not supported")
    moe = SparseMoe.from_config(text)
    decoder = replace(_DECODER, defaults={**_DECODER.defaults, "intermediate_size": moe.expert_dim})
    prog = build_qwen3_5(raw, w, name, ffn=moe, decoder=decoder, text_type="qwen3_5_moe_text")
    prog.meta["moe"] = moe.meta()
    return prog
