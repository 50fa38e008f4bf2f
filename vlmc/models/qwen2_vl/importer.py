"""Qwen2-VL and Qwen2.5-VL checkpoints -> IR: a dynamic-resolution ViT with 2D rotary, a
patch merger and an M-RoPE decoder.

Qwen2.5-VL differs only in its vision layers (RMSNorm, gated SiLU MLP) and in windowed
attention: patches are permuted window-major on the host, most layers attend within
their window (a block-diagonal mask), the ``fullatt_block_indexes`` layers attend per
image; the merged features are permuted back at the end.
"""
from __future__ import annotations

from typing import Any

from ...frontend.config import vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import act_kind, decoder_layer, finish, text_entry_points, vit_layer
from ..common.text_config import Decoder, text_config

# transformers' Qwen2VLTextConfig / Qwen2_5_VLTextConfig defaults
_DECODERS = {
    "qwen2_vl": Decoder(dict(rms_norm_eps=1e-5, rope_theta=1000000.0, hidden_act="silu",
                             max_position_embeddings=32768), biases="qwen", rope="mrope", mrope_sections=(16, 24, 24)),
    "qwen2_5_vl": Decoder(dict(rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                               max_position_embeddings=128000), biases="qwen", rope="mrope",
                          mrope_sections=(16, 24, 24)),
}


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    mt = raw["model_type"]
    is_25 = mt == "qwen2_5_vl"
    nested = isinstance(raw.get("text_config"), dict) and "hidden_size" in raw["text_config"]
    tc = text_config(raw, nested=nested, decoder=_DECODERS[mt], text_type=mt)
    vc = raw.get("vision_config") or {}
    prog = Program(name=name)

    depth = int(vision_field(vc, "depth", "num_hidden_layers"))
    heads = int(vision_field(vc, "num_heads", "num_attention_heads"))
    patch = int(vision_field(vc, "patch_size", "spatial_patch_size"))
    tps = int(vision_field(vc, "temporal_patch_size", default=2))
    merge = int(vision_field(vc, "spatial_merge_size", default=2))
    chans = int(vision_field(vc, "in_channels", "in_chans", default=3))
    if is_25:
        dim = int(vision_field(vc, "hidden_size"))
        mlp_dim = int(vision_field(vc, "intermediate_size"))
        out_dim = int(vision_field(vc, "out_hidden_size", default=tc.hidden_size))
        act = act_kind(vision_field(vc, "hidden_act", default="silu"))
    else:
        dim = int(vision_field(vc, "embed_dim"))
        mlp_dim = int(dim * float(vision_field(vc, "mlp_ratio", default=4)))
        out_dim = int(vision_field(vc, "hidden_size", default=tc.hidden_size))
        act = act_kind(vision_field(vc, "hidden_act", default="quick_gelu"))
    vrope = vc.get("rope_parameters") or {}
    vtheta = float(vrope.get("rope_theta", 10000.0))
    full_layers = sorted(int(i) for i in vc.get("fullatt_block_indexes", [])) if is_25 else []

    # Conv3d with kernel == stride is a matmul over flattened (C, T, P, P) patches:
    # fold the weight into a [E, C*T*P*P] matrix at compile time.
    patch_in = chans * tps * patch * patch
    w.add("vision.patch_embed.proj.weight", (dim, patch_in), role="patch_embed", part="vision",
          source_shape=(dim, chans, tps, patch, patch), transforms=[("reshape", {"shape": [dim, patch_in]})])

    names = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", out="attn.proj",
                 fc1="mlp.fc1", fc2="mlp.fc2", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    if is_25:
        layers = [{"index": i, "mask": "%mask_full" if i in full_layers else "%mask_window"}
                  for i in range(depth)]
        masks = ["mask_full", "mask_window"]
    else:
        layers = [{"index": i} for i in range(depth)]
        masks = ["mask"]
    vblock = vit_layer(w, name="vision_layer", prefix_fmt="vision.blocks.{i}.", n_layers=depth, dim=dim,
                       heads=heads, mlp_dim=mlp_dim, norm="rms" if is_25 else "layer", eps=1e-6, act=act,
                       fused_qkv=True, gated_mlp=is_25, names=names, rope=True, masks=masks, layers=layers)
    prog.blocks[vblock.name] = vblock

    merged = dim * merge * merge
    w.add("vision.merger.ln_q.weight", (dim,), role="norm", part="projector")
    if not is_25:
        w.add("vision.merger.ln_q.bias", (dim,), role="norm", part="projector")
    for i, shape in (("0", (merged, merged)), ("2", (out_dim, merged))):
        w.add(f"vision.merger.mlp.{i}.weight", shape, role="proj", part="projector")
        w.add(f"vision.merger.mlp.{i}.bias", (shape[0],), role="proj", part="projector")

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "packed patches of all images -> one feature row per merged 2x2 patch group; rotary "
        "positions, attention masks and the window permutation are planned on the host"))
    px = fb.input("patches", ("S", patch_in), "float32")
    pos = fb.input("rope_positions", ("S", 2), "int32")
    mask_vals = [fb.input(m, (1, 1, "S", "S"), "bool") for m in masks]
    x = fb.op("linear", px, fb.param("vision.patch_embed.proj.weight"), name="x")
    if is_25:
        perm = fb.input("window_order", ("G",), "int32")
        unperm = fb.input("window_restore", ("G",), "int32")
        x = fb.op("reshape", x, shape=[-1, merge * merge, dim], name="x")
        x = fb.op("take", x, perm, axis=0, name="x")
        x = fb.op("reshape", x, shape=[-1, dim], name="x")
    cos, sin = fb.op("rope_freqs", pos, kind="axial2d", dim=dim // heads, theta=vtheta, n_out=2, name="rope")
    x = fb.op("call_block", x, cos, sin, *mask_vals, block=vblock.name, start=0, stop=depth, name="x")
    if is_25:
        x = fb.op("rms_norm", x, fb.param("vision.merger.ln_q.weight"), eps=1e-6, name="x")
    else:
        x = fb.op("layer_norm", x, fb.param("vision.merger.ln_q.weight"),
                  fb.param("vision.merger.ln_q.bias"), eps=1e-6, name="x")
    x = fb.op("reshape", x, shape=[-1, merged], name="x")
    x = fb.op("linear", x, fb.param("vision.merger.mlp.0.weight"), fb.param("vision.merger.mlp.0.bias"), name="x")
    x = fb.op("act", x, kind="gelu", name="x")
    x = fb.op("linear", x, fb.param("vision.merger.mlp.2.weight"), fb.param("vision.merger.mlp.2.bias"),
              name="features")
    if is_25:
        x = fb.op("take", x, unperm, axis=0, name="features")
    prog.functions["vision_encode"] = fb.output(x)

    block = decoder_layer(w, tc)
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block, position_streams=3)

    def tok(key: str) -> int | None:
        for src in (raw, raw.get("text_config") or {}):
            if src.get(key) is not None:
                return int(src[key])
        return None

    prog.meta["inputs"] = {
        "position_streams": 3,
        "image_token_id": tok("image_token_id"),
        "video_token_id": tok("video_token_id"),
        "vision_start_token_id": tok("vision_start_token_id"),
        "windowed": is_25, "patch_size": patch, "temporal_patch_size": tps, "merge_size": merge,
        "window_size": int(vc.get("window_size", 0)), "fullatt_block_indexes": full_layers, "channels": chans,
    }
    if is_25:  # M-RoPE temporal positions of videos advance this many per second
        prog.meta["inputs"]["tokens_per_second"] = int(vision_field(vc, "tokens_per_second", default=4))
    return finish(prog, w, tc)
