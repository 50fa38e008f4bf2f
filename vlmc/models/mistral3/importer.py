"""Mistral 3 checkpoints -> IR: Pixtral tower, RMSNorm, patch merger, projector, decoder.

Mistral3MultiModalProjector: the chosen hidden state is RMS-normed (the text config's
eps), each ``spatial_merge_size`` x ``spatial_merge_size`` block of an image's patches is
folded into one row (``unfold`` order: channel-major, then the block's row and column),
``merging_layer`` projects it back to the tower's width, and linear / act / linear maps it
to the decoder's. Patches arrive in merge-block order (``pixtral_processor``), so the fold
is a reshape and a transpose.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import act_kind, decoder_layer, finish, text_entry_points
from ..common.pixtral import feature_depths, pixtral_tower
from ..common.text_config import DECODERS, Decoder, text_config

# Mistral3Config's text defaults (Mistral-Small-3.1) for fields a config leaves out
_MISTRAL = Decoder({**DECODERS["mistral"].defaults, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                    "max_position_embeddings": 131072})


def sliding_windows(raw: dict[str, Any], n_layers: int) -> list[int | None] | None:
    """Mistral's ``sliding_window`` (every layer, or none), as decoder_layer takes it."""
    window = (raw.get("text_config") or {}).get("sliding_window")
    return [int(window)] * n_layers if window else None


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = raw.get("text_config") or {}
    text_type = text.get("model_type", "mistral")
    tc = text_config(raw, nested=True, decoder=_MISTRAL if text_type == "mistral" else None, text_type=text_type)
    if raw.get("tie_word_embeddings") is None and text.get("tie_word_embeddings") is None:
        # configs written by transformers 4.x say nothing (its class defaults differed across
        # versions): the checkpoint's own head decides
        tc.tie_word_embeddings = not w.has("lm_head.weight")
    vc = raw.get("vision_config") or {}
    merge = int(raw.get("spatial_merge_size", 2))
    if merge < 1:
        raise UnsupportedModelError(f"spatial_merge_size {merge} must be positive")
    prog = Program(name=name)

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "packed patches of all images -> Pixtral tower -> norm, 2x2 patch merger, projector: one feature row "
        "per [IMG] token; rotary positions and the per-image mask are planned on the host"))
    layer_sel = raw.get("vision_feature_layer", -1)
    if not isinstance(layer_sel, int):  # the projector's norm and merger take one layer's width
        raise UnsupportedModelError(f"Mistral 3 vision_feature_layer must be one layer, got {layer_sel!r}")
    n_layers = int(vc.get("num_hidden_layers", 24))
    (x,), tw = pixtral_tower(w, prog, vc, fb, feature_depths(layer_sel, n_layers))
    dim, h = tw["dim"], tc.hidden_size
    feat_dim = dim
    bias = bool(raw.get("multimodal_projector_bias", False))
    proj = dict(role="proj", part="projector")
    w.add("projector.norm.weight", (feat_dim,), role="norm", part="projector")
    w.add("projector.patch_merger.merging_layer.weight", (feat_dim, feat_dim * merge * merge), **proj)
    w.add("projector.linear_1.weight", (h, feat_dim), **proj)
    w.add("projector.linear_2.weight", (h, h), **proj)
    if bias:
        w.add("projector.linear_1.bias", (h,), **proj)
        w.add("projector.linear_2.bias", (h,), **proj)
    fb.param_types.update(w.types())
    x = fb.op("rms_norm", x, fb.param("projector.norm.weight"), eps=tc.rms_norm_eps, name="x")
    x = fb.op("reshape", x, shape=[-1, merge * merge, feat_dim], name="merge")
    x = fb.op("transpose", x, axes=[0, 2, 1], name="merge")
    x = fb.op("reshape", x, shape=[-1, feat_dim * merge * merge], name="merge")
    x = fb.op("linear", x, fb.param("projector.patch_merger.merging_layer.weight"), name="merged")
    x = fb.op("linear", x, fb.param("projector.linear_1.weight"),
              fb.param("projector.linear_1.bias") if bias else None, name="proj")
    x = fb.op("act", x, kind=act_kind(raw.get("projector_hidden_act", "gelu")), name="proj")
    x = fb.op("linear", x, fb.param("projector.linear_2.weight"),
              fb.param("projector.linear_2.bias") if bias else None, name="features")
    prog.functions["vision_encode"] = fb.output(x)

    block = decoder_layer(w, tc, layer_window=sliding_windows(raw, tc.num_layers))
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block)
    image_token = raw.get("image_token_index", raw.get("image_token_id", 10))
    prog.meta["inputs"] = {"position_streams": 1, "image_token_id": int(image_token), "tower": "pixtral",
                           "patch_size": tw["patch"], "merge_size": merge, "channels": tw["channels"]}
    return finish(prog, w, tc)
