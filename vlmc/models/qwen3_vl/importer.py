"""Qwen3-VL checkpoints -> IR.

The vision tower is Qwen2-VL's (packed patches of all images, 2D rotary, per-image
attention) with a biased Conv3d patch embedding, GELU-tanh MLPs and learned position
embeddings: a square table of ``num_position_embeddings`` rows, resampled bilinearly
(align_corners) to each image's patch grid. The host plans each patch's four taps and
their weights (``inputs.position_taps``); the graph gathers and sums them.

DeepStack: after each vision layer in ``deepstack_visual_indexes`` a merger of its own
(LayerNorm after the 2x2 merge, not before) makes one more feature row per image token;
the decoder adds the k-th of them to its hidden state at the image tokens after layer k.
``vision_encode`` returns [tokens, (1 + K) * hidden]: the merged features, then the K
DeepStack blocks; ``Inputs.merge`` places whole rows at the image tokens of embeddings
that ``embed`` made (1 + K) * hidden wide, and prefill adds block k after layer k
(``text_entry_points``' ``deepstack`` option).

The decoder is Qwen3's: QK-norm, no biases (``attention_bias``), and M-RoPE with the
t/h/w frequencies interleaved (transformers' Qwen3-VL interleaves them whatever
``mrope_interleaved`` says).
"""
from __future__ import annotations

import math
from typing import Any

from ...errors import SourceError, UnsupportedModelError
from ...frontend.config import vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import act_kind, decoder_layer, finish, text_entry_points, vit_layer
from ..common.text_config import Decoder, text_config

# transformers' Qwen3VLTextConfig defaults for absent fields
_DECODER = Decoder(dict(rms_norm_eps=1e-6, rope_theta=500000.0, hidden_act="silu", max_position_embeddings=128000),
                   rope="mrope_interleaved", mrope_sections=(24, 20, 20))


def _token(raw: dict[str, Any], key: str) -> int | None:
    for src in (raw, raw.get("text_config") or {}):
        if src.get(key) is not None:
            return int(src[key])
    return None


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = raw.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UnsupportedModelError("a Qwen3-VL config.json needs a text_config with the decoder's sizes")
    tc = text_config(raw, nested=True, decoder=_DECODER, text_type=text.get("model_type") or "qwen3_vl_text")
    rope_type = (text.get("rope_parameters") or text.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"Qwen3-VL rope type {rope_type!r} is not supported yet (only default)")
    h = tc.hidden_size
    vc = raw.get("vision_config") or {}
    prog = Program(name=name)

    depth = int(vision_field(vc, "depth", "num_hidden_layers", default=27))
    dim = int(vision_field(vc, "hidden_size", default=1152))
    heads = int(vision_field(vc, "num_heads", "num_attention_heads", default=16))
    mlp_dim = int(vision_field(vc, "intermediate_size", default=4304))
    patch = int(vision_field(vc, "patch_size", default=16))
    tps = int(vision_field(vc, "temporal_patch_size", default=2))
    merge = int(vision_field(vc, "spatial_merge_size", default=2))
    chans = int(vision_field(vc, "in_channels", default=3))
    out_dim = int(vision_field(vc, "out_hidden_size", default=3584))
    n_pos = int(vision_field(vc, "num_position_embeddings", default=2304))
    act = act_kind(vision_field(vc, "hidden_act", default="gelu_pytorch_tanh"))
    vtheta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    taps = [int(i) for i in vc.get("deepstack_visual_indexes", (8, 16, 24))]
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise UnsupportedModelError(f"vision num_position_embeddings {n_pos} is not a square grid")
    if out_dim != h:
        raise UnsupportedModelError(f"vision out_hidden_size {out_dim} differs from the decoder's hidden size {h}")
    if len(set(taps)) != len(taps) or any(not 0 <= i < depth for i in taps):
        raise UnsupportedModelError(f"deepstack_visual_indexes {taps} are not distinct vision layers below {depth}")
    if len(taps) > tc.num_layers:
        raise UnsupportedModelError(f"{len(taps)} DeepStack levels for a {tc.num_layers}-layer decoder")

    vis, proj = dict(part="vision"), dict(part="projector")
    patch_in = chans * tps * patch * patch
    # Conv3d with kernel == stride: a matmul over flattened (C, T, P, P) patches
    w.add("vision.patch_embed.proj.weight", (dim, patch_in), role="patch_embed", **vis,
          source_shape=(dim, chans, tps, patch, patch), transforms=[("reshape", {"shape": [dim, patch_in]})])
    w.add("vision.patch_embed.proj.bias", (dim,), role="patch_embed", **vis)
    w.add("vision.pos_embed.weight", (n_pos, dim), role="pos_embed", **vis)
    names = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", out="attn.proj", fc1="mlp.linear_fc1",
                 fc2="mlp.linear_fc2")
    vblock = vit_layer(w, name="vision_layer", prefix_fmt="vision.blocks.{i}.", n_layers=depth, dim=dim,
                       heads=heads, mlp_dim=mlp_dim, norm="layer", eps=1e-6, act=act, fused_qkv=True,
                       gated_mlp=False, names=names, rope=True, masks=["mask"],
                       layers=[{"index": i} for i in range(depth)])
    prog.blocks[vblock.name] = vblock

    merged = dim * merge * merge
    mergers = ["vision.merger."] + [f"vision.deepstack_merger_list.{k}." for k in range(len(taps))]
    for i, pre in enumerate(mergers):
        norm_dim = dim if i == 0 else merged  # DeepStack mergers norm after the 2x2 merge
        w.add(pre + "norm.weight", (norm_dim,), role="norm", **proj)
        w.add(pre + "norm.bias", (norm_dim,), role="norm", **proj)
        for fc, shape in (("linear_fc1", (merged, merged)), ("linear_fc2", (h, merged))):
            w.add(pre + fc + ".weight", shape, role="proj", **proj)
            w.add(pre + fc + ".bias", (shape[0],), role="proj", **proj)

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "packed patches of all images -> per merged 2x2 patch group: the merger's feature row, then the "
        "DeepStack mergers' rows; rotary positions, masks and position-embedding taps planned on the host"))
    px = fb.input("patches", ("S", patch_in), "float32")
    pos = fb.input("rope_positions", ("S", 2), "int32")
    mask = fb.input("mask", (1, 1, "S", "S"), "bool")
    tap_ids = fb.input("pos_taps", ("S", 4), "int32")
    tap_w = fb.input("pos_weights", ("S", 4), "float32")
    x = fb.op("linear", px, fb.param("vision.patch_embed.proj.weight"), fb.param("vision.patch_embed.proj.bias"),
              name="x")
    pe = fb.op("take", fb.param("vision.pos_embed.weight"), tap_ids, axis=0, name="pos")
    pe = fb.op("mul", pe, fb.op("reshape", tap_w, shape=[0, 0, 1], name="pos_w"), name="pos")
    x = fb.op("add", x, fb.op("sum_axis", pe, axis=1, name="pos"), name="x")
    cos, sin = fb.op("rope_freqs", pos, kind="axial2d", dim=dim // heads, theta=vtheta, n_out=2, name="rope")

    def merger(v: str, pre: str, post_norm: bool) -> str:
        def norm(u: str) -> str:
            return fb.op("layer_norm", u, fb.param(pre + "norm.weight"), fb.param(pre + "norm.bias"), eps=1e-6,
                         name="m")
        v = fb.op("reshape", v if post_norm else norm(v), shape=[-1, merged], name="m")
        v = norm(v) if post_norm else v
        v = fb.op("linear", v, fb.param(pre + "linear_fc1.weight"), fb.param(pre + "linear_fc1.bias"), name="m")
        v = fb.op("act", v, kind="gelu", name="m")
        return fb.op("linear", v, fb.param(pre + "linear_fc2.weight"), fb.param(pre + "linear_fc2.bias"), name="m")

    # transformers collects DeepStack features in vision-layer order, each from the merger at
    # its layer's place in deepstack_visual_indexes
    feats, start = [], 0
    for layer in sorted(taps):
        x = fb.op("call_block", x, cos, sin, mask, block=vblock.name, start=start, stop=layer + 1, name="x")
        feats.append(merger(x, mergers[1 + taps.index(layer)], post_norm=True))
        start = layer + 1
    if start < depth:
        x = fb.op("call_block", x, cos, sin, mask, block=vblock.name, start=start, stop=depth, name="x")
    out = merger(x, mergers[0], post_norm=False)
    if feats:
        out = fb.op("concat", out, *feats, axis=-1, name="features")
    prog.functions["vision_encode"] = fb.output(out)

    block = decoder_layer(w, tc, qk_norm=True)
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block, position_streams=3, deepstack=list(range(len(taps))))

    prog.meta["inputs"] = {
        "position_streams": 3,
        "image_token_id": _token(raw, "image_token_id"),
        "video_token_id": _token(raw, "video_token_id"),
        "vision_start_token_id": _token(raw, "vision_start_token_id"),
        "windowed": False, "patch_size": patch, "temporal_patch_size": tps, "merge_size": merge,
        "window_size": 0, "fullatt_block_indexes": [], "channels": chans,
        "position_grid": side, "deepstack_levels": len(taps),
    }
    return finish(prog, w, tc)


def processor_spec(preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Qwen2VLImageProcessor's spec (Qwen3-VL's processor), checked against the tower: the
    patches it cuts must be the ones the patch embedding takes."""
    from ..common.processors import spec_from_preprocessor_config
    spec = spec_from_preprocessor_config(preprocessor_config, "qwen2_vl")
    inp = meta["inputs"]
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if int(spec[key]) != int(inp[key]):
            raise SourceError(f"preprocessor_config.json {key} {spec[key]} does not match the vision tower's "
                              f"{inp[key]}")
    return spec
