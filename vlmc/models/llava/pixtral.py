"""LLaVA with a Pixtral tower (Pixtral-12B as transformers ships it: ``model_type`` llava,
``vision_config.model_type`` pixtral): the tower's chosen hidden state(s) of every patch,
no merger, LLaVA's linear / act / linear projector; images at their own size, one
``[IMG]`` token per patch in rows closed by ``[IMG_BREAK]`` / ``[IMG_END]``."""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import act_kind
from ..common.pixtral import feature_depths, pixtral_tower
from ..common.text_config import TextConfig


def pixtral_vision(raw: dict[str, Any], w: Weights, prog: Program, tc: TextConfig) -> dict[str, Any]:
    """Add ``vision_encode`` and return the runtime half's settings (``meta["inputs"]``)."""
    if raw.get("vision_feature_select_strategy", "default") != "full":
        # "default" drops the first row of the packed patches of *all* images: no per-image meaning
        raise UnsupportedModelError("LLaVA with a Pixtral tower needs vision_feature_select_strategy 'full'")
    vc = raw.get("vision_config") or {}
    n_layers = int(vc.get("num_hidden_layers", 24))
    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "packed patches of all images -> Pixtral tower -> projector: one feature row per [IMG] token (one per "
        "patch); rotary positions and the per-image mask are planned on the host"))
    feats, tw = pixtral_tower(w, prog, vc, fb, feature_depths(raw.get("vision_feature_layer", -1), n_layers))
    h, feat_dim = tc.hidden_size, tw["dim"] * len(feats)
    bias = bool(raw.get("multimodal_projector_bias", True))
    proj = dict(role="proj", part="projector")
    w.add("projector.linear_1.weight", (h, feat_dim), **proj)
    w.add("projector.linear_2.weight", (h, h), **proj)
    if bias:
        w.add("projector.linear_1.bias", (h,), **proj)
        w.add("projector.linear_2.bias", (h,), **proj)
    fb.param_types.update(w.types())
    x = feats[0] if len(feats) == 1 else fb.op("concat", *feats, axis=-1, name="feat")
    x = fb.op("linear", x, fb.param("projector.linear_1.weight"),
              fb.param("projector.linear_1.bias") if bias else None, name="proj")
    x = fb.op("act", x, kind=act_kind(raw.get("projector_hidden_act", "gelu")), name="proj")
    x = fb.op("linear", x, fb.param("projector.linear_2.weight"),
              fb.param("projector.linear_2.bias") if bias else None, name="features")
    prog.functions["vision_encode"] = fb.output(x)
    image_token = raw.get("image_token_id", raw.get("image_token_index"))
    return {"position_streams": 1, "image_token_id": None if image_token is None else int(image_token),
            "tower": "pixtral", "patch_size": tw["patch"], "merge_size": 1, "channels": tw["channels"]}
