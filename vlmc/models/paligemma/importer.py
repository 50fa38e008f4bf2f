"""PaliGemma checkpoints -> IR: SigLIP tower (last hidden state), one linear projector
(``multi_modal_projector.linear``) and a Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) decoder.

The projected features replace the ``<image>`` tokens unscaled; text embeddings are
scaled by sqrt(hidden) (transformers 5's scaled word embedding). PaliGemma 2 soft-caps
its logits (the text config's ``final_logit_softcapping``), as transformers'
PaliGemmaForConditionalGeneration does.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.gemma import gemma_decoder, gemma_text
from ..common.layers import finish, siglip_tower


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text_type = (raw.get("text_config") or {}).get("model_type", "gemma")
    if text_type not in ("gemma", "gemma2"):
        raise UnsupportedModelError(f"PaliGemma text model {text_type!r} is not supported; supported: gemma, gemma2")
    g = gemma_text(raw, nested=True, prefix_lm=True)
    h = g.tc.hidden_size
    vc = raw.get("vision_config") or {}
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UnsupportedModelError(f"PaliGemma vision tower {vc.get('model_type')!r} is not supported; "
                                    "supported: siglip_vision_model")
    prog = Program(name=name)
    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "images [N, C, H, W] -> SigLIP last hidden state -> linear projection: one feature row per patch"))
    x, tower = siglip_tower(w, prog, vc, fb)
    dim = tower["dim"]
    w.add("projector.linear.weight", (h, dim), role="proj", part="projector")
    w.add("projector.linear.bias", (h,), role="proj", part="projector")
    fb.param_types.update(w.types())
    x = fb.op("linear", x, fb.param("projector.linear.weight"), fb.param("projector.linear.bias"), name="proj")
    prog.functions["vision_encode"] = fb.output(fb.op("reshape", x, shape=[-1, h], name="features"))

    gemma_decoder(prog, w, g)
    image_token = raw.get("image_token_id", raw.get("image_token_index"))
    prog.meta["inputs"] = {
        "position_streams": 1,
        "image_token_id": int(image_token) if image_token is not None else None,
        "tokens_per_image": (tower["image_size"] // tower["patch"]) ** 2, "image_size": tower["image_size"],
    }
    return finish(prog, w, g.tc)
