"""LLaVA checkpoints -> IR: a CLIP or SigLIP vision tower, a chosen hidden layer, an MLP projector and a
Llama/Qwen2/Mistral decoder.

``vision_feature_layer`` picks hidden_states[k] of the tower (index 0 = the embeddings);
layers past the deepest chosen one never run, so the cleanup pass drops them.
``vision_feature_select_strategy`` "default" drops the CLS row, "full" keeps all rows.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.config import vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import act_kind, decoder_layer, finish, text_entry_points, vit_layer
from ..common.text_config import text_config

_TOWERS = ("clip_vision_model", "siglip_vision_model", "pixtral")


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    tc = text_config(raw, nested=True)
    vc = raw.get("vision_config") or {}
    tower = vc.get("model_type", "clip_vision_model")
    if tower not in _TOWERS:
        raise UnsupportedModelError(f"LLaVA vision tower {tower!r} is not supported; supported: {', '.join(_TOWERS)}")
    is_clip = tower == "clip_vision_model"
    prog = Program(name=name)
    window = (raw.get("text_config") or {}).get("sliding_window")  # Mistral decoders
    block = decoder_layer(w, tc, layer_window=[int(window)] * tc.num_layers if window else None)
    if tower == "pixtral":
        from .pixtral import pixtral_vision
        inputs = pixtral_vision(raw, w, prog, tc)
        prog.blocks[block.name] = block
        text_entry_points(prog, w, tc, block)
        prog.meta["inputs"] = inputs
        return finish(prog, w, tc)
    dim = int(vision_field(vc, "hidden_size", default=1024 if is_clip else 768))
    heads = int(vision_field(vc, "num_attention_heads", default=16 if is_clip else 12))
    n_layers = int(vision_field(vc, "num_hidden_layers", default=24 if is_clip else 12))
    mlp_dim = int(vision_field(vc, "intermediate_size", default=4096 if is_clip else 3072))
    patch = int(vision_field(vc, "patch_size", default=14 if is_clip else 16))
    size = int(vision_field(vc, "image_size", default=224))
    chans = int(vision_field(vc, "num_channels", default=3))
    eps = float(vision_field(vc, "layer_norm_eps", default=1e-5 if is_clip else 1e-6))
    act = act_kind(vision_field(vc, "hidden_act", default="quick_gelu" if is_clip else "gelu_pytorch_tanh"))
    n_patches = (size // patch) ** 2
    n_pos = n_patches + (1 if is_clip else 0)

    layer_sel = raw.get("vision_feature_layer", -2)
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(f"vision_feature_select_strategy {strategy!r} is not supported")
    sel = [layer_sel] if isinstance(layer_sel, int) else list(layer_sel)
    depths = [k % (n_layers + 1) for k in sel]  # hidden_states has n_layers + 1 entries

    patch_in = chans * patch * patch
    vis = dict(part="vision")
    w.add("vision.embeddings.patch_embedding.weight", (dim, patch_in), role="patch_embed", **vis,
          source_shape=(dim, chans, patch, patch), transforms=[("reshape", {"shape": [dim, patch_in]})])
    if not is_clip:
        w.add("vision.embeddings.patch_embedding.bias", (dim,), role="patch_embed", **vis)
    else:
        w.add("vision.embeddings.class_embedding", (dim,), role="class_embed", **vis)
        w.add("vision.pre_layrnorm.weight", (dim,), role="norm", **vis)
        w.add("vision.pre_layrnorm.bias", (dim,), role="norm", **vis)
    w.add("vision.embeddings.position_embedding.weight", (n_pos, dim), role="pos_embed", **vis)

    names = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj", k="self_attn.k_proj",
                 v="self_attn.v_proj", out="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2")
    vblock = vit_layer(w, name="vision_layer", prefix_fmt="vision.encoder.layers.{i}.", n_layers=n_layers,
                       dim=dim, heads=heads, mlp_dim=mlp_dim, norm="layer", eps=eps, act=act,
                       fused_qkv=False, gated_mlp=False, names=names, rope=False, masks=None,
                       layers=[{"index": i} for i in range(n_layers)])
    prog.blocks[vblock.name] = vblock

    feat_dim = dim * len(sel)
    bias = bool(raw.get("multimodal_projector_bias", True))
    proj = dict(role="proj", part="projector")
    w.add("projector.linear_1.weight", (tc.hidden_size, feat_dim), **proj)
    w.add("projector.linear_2.weight", (tc.hidden_size, tc.hidden_size), **proj)
    if bias:
        w.add("projector.linear_1.bias", (tc.hidden_size,), **proj)
        w.add("projector.linear_2.bias", (tc.hidden_size,), **proj)

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "images [N, C, H, W] -> projected features, one row per image token"))
    px = fb.input("pixels", ("N", chans, size, size), "float32")
    x = fb.op("patchify", px, patch=patch, name="patches")
    x = fb.op("linear", x, fb.param("vision.embeddings.patch_embedding.weight"),
              None if is_clip else fb.param("vision.embeddings.patch_embedding.bias"), name="x")
    if is_clip:
        x = fb.op("prepend", x, fb.param("vision.embeddings.class_embedding"), name="x")
    x = fb.op("add", x, fb.param("vision.embeddings.position_embedding.weight"), name="x")
    if is_clip:
        x = fb.op("layer_norm", x, fb.param("vision.pre_layrnorm.weight"), fb.param("vision.pre_layrnorm.bias"),
                  eps=eps, name="x")
    hidden: dict[int, str] = {0: x}
    done = 0
    for d in sorted(set(depths)):
        if d > done:
            x = fb.op("call_block", x, block=vblock.name, start=done, stop=d, name="hidden")
            done = d
        hidden[d] = x
    feats = [hidden[d] for d in depths]
    if strategy == "default":
        feats = [fb.op("slice_axis", f, axis=1, start=1, name="feat") for f in feats]
    f = feats[0] if len(feats) == 1 else fb.op("concat", *feats, axis=-1, name="feat")
    f = fb.op("linear", f, fb.param("projector.linear_1.weight"),
              fb.param("projector.linear_1.bias") if bias else None, name="proj")
    f = fb.op("act", f, kind=act_kind(raw.get("projector_hidden_act", "gelu")), name="proj")
    f = fb.op("linear", f, fb.param("projector.linear_2.weight"),
              fb.param("projector.linear_2.bias") if bias else None, name="proj")
    f = fb.op("reshape", f, shape=[-1, tc.hidden_size], name="features")
    prog.functions["vision_encode"] = fb.output(f)

    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block)
    tokens = n_patches + (1 if is_clip and strategy == "full" else 0)
    image_token = raw.get("image_token_id", raw.get("image_token_index"))
    prog.meta["inputs"] = {
        "position_streams": 1,
        "image_token_id": int(image_token) if image_token is not None else None,
        "image_size": size, "tokens_per_image": tokens, "tower": tower,
    }
    return finish(prog, w, tc)
