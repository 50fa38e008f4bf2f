"""Gemma 3 checkpoints -> IR: SigLIP tower, average-pooled projector, Gemma 3 decoder.

The projector (transformers' Gemma3MultiModalProjector) averages the tower's patch grid
in K x K windows down to ``mm_tokens_per_image`` tokens, RMS-normalises them (``1 + w``)
and multiplies by ``mm_input_projection_weight`` ([vision dim, text hidden], transposed
at compile time). ``gemma3_text`` checkpoints (Gemma3ForCausalLM) are the decoder alone;
they soft-cap their logits when ``final_logit_softcapping`` is set, which transformers'
Gemma3ForConditionalGeneration does not do.
"""
from __future__ import annotations

import math
from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.config import vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.gemma import gemma_decoder, gemma_text
from ..common.layers import finish, norm_shift, siglip_tower


def _token(raw: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        if raw.get(key) is not None:
            return int(raw[key])
    return None


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    prog = Program(name=name)
    if raw.get("model_type") == "gemma3_text":
        g = gemma_text(raw, nested=False)
        gemma_decoder(prog, w, g)
        prog.meta["inputs"] = {"position_streams": 1, "image_token_id": None, "tokens_per_image": 1}
        return finish(prog, w, g.tc)

    g = gemma_text(raw, nested=True)
    h = g.tc.hidden_size
    vc = raw.get("vision_config") or {}
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UnsupportedModelError(f"Gemma 3 vision tower {vc.get('model_type')!r} is not supported; "
                                    "supported: siglip_vision_model")
    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "images [N, C, H, W] -> SigLIP last hidden state -> K x K average pool, RMSNorm, projection: "
        "mm_tokens_per_image feature rows per image"))
    x, tower = siglip_tower(w, prog, vc, fb)
    grid = tower["image_size"] // tower["patch"]
    tokens = int(raw.get("mm_tokens_per_image", 256))
    side = math.isqrt(tokens)
    if side * side != tokens or grid % side:
        raise UnsupportedModelError(f"mm_tokens_per_image {tokens} does not pool a {grid}x{grid} patch grid "
                                    "into a square of whole windows")
    dim = tower["dim"]
    proj = dict(part="projector")
    w.add("projector.mm_soft_emb_norm.weight", (dim,), role="norm", transforms=norm_shift(1.0), **proj)
    w.add("projector.mm_input_projection_weight", (h, dim), role="proj", source_shape=(dim, h),
          transforms=[("transpose", {"axes": [1, 0]})], **proj)
    fb.param_types.update(w.types())
    x = fb.op("avg_pool_tokens", x, grid=grid, kernel=grid // side, name="pooled")
    x = fb.op("rms_norm", x, fb.param("projector.mm_soft_emb_norm.weight"),
              eps=float(vision_field(vc, "layer_norm_eps", default=1e-6)), name="pooled")
    x = fb.op("linear", x, fb.param("projector.mm_input_projection_weight"), name="proj")
    prog.functions["vision_encode"] = fb.output(fb.op("reshape", x, shape=[-1, h], name="features"))

    gemma_decoder(prog, w, g, final_softcap=False)
    prog.meta["inputs"] = {
        "position_streams": 1,
        "image_token_id": _token(raw, "image_token_id", "image_token_index"),
        "boi_token_id": _token(raw, "boi_token_id", "boi_token_index"),
        "eoi_token_id": _token(raw, "eoi_token_id", "eoi_token_index"),
        "tokens_per_image": tokens, "image_size": tower["image_size"],
    }
    return finish(prog, w, g.tc)
