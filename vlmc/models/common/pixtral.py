"""The Pixtral vision encoder as a shared block (Mistral 3; LLaVA checkpoints such as
Pixtral-12B): a bias-free patch projection, RMSNorm (``ln_pre``), then pre-RMSNorm layers
with bias-free attention and a gated MLP, rotated by 2D rope over each patch's (row,
column) in its own image (``rope_freqs`` kind ``axial2d_alternating``).

Images of any size arrive as packed patch rows (``pixtral_processor``) with a
block-diagonal mask, so one call encodes several images of different sizes; transformers
pads them into one batch and crops each image's patches back out, which computes the same.
"""
from __future__ import annotations

from typing import Any, Sequence

from ...errors import UnsupportedModelError
from ...frontend.config import rope_settings, vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from .layers import act_kind, vit_layer

TOWER = "pixtral"
EPS = 1e-5  # PixtralRMSNorm's eps in the tower, fixed by the model code


def feature_depths(layer_sel: int | Sequence[int], n_layers: int) -> list[int]:
    """``vision_feature_layer`` (an index or a list) as hidden_states depths (0: after
    ``ln_pre``, k: after layer k)."""
    sel = [layer_sel] if isinstance(layer_sel, int) else list(layer_sel)
    depths = []
    for k in sel:
        if not -(n_layers + 1) <= int(k) <= n_layers:
            raise UnsupportedModelError(f"vision_feature_layer {k} is outside the tower's {n_layers} layers")
        depths.append(int(k) % (n_layers + 1))
    return depths


def pixtral_tower(w: Weights, prog: Program, vc: dict[str, Any], fb: FunctionBuilder,
                  depths: Sequence[int]) -> tuple[list[str], dict[str, int]]:
    """Declare the tower's params (``vision.*``) and layer block, and add to ``fb`` (a
    ``vision_encode`` being built) its inputs ``patches`` [S, C*P*P], ``rope_positions``
    [S, 2] and ``mask`` [1, 1, S, S] and the tower's ops up to the deepest of ``depths``.
    Returns the hidden state at each depth and the tower's sizes (dim, patch, channels)."""
    if vc.get("model_type", TOWER) != TOWER:
        raise UnsupportedModelError(f"vision tower {vc.get('model_type')!r} is not a Pixtral tower")
    dim = int(vision_field(vc, "hidden_size", default=1024))
    heads = int(vision_field(vc, "num_attention_heads", default=16))
    n_layers = int(vision_field(vc, "num_hidden_layers", default=24))
    mlp_dim = int(vision_field(vc, "intermediate_size", default=4096))
    patch = int(vision_field(vc, "patch_size", default=16))
    chans = int(vision_field(vc, "num_channels", default=3))
    act = act_kind(vision_field(vc, "hidden_act", default="gelu"))
    theta, rope_type, _ = rope_settings(vc, 10000.0)
    if rope_type not in ("axial", "default"):  # 5.x writes "axial"; early configs "default" for the same
        raise UnsupportedModelError(f"Pixtral vision rope type {rope_type!r} is not supported")
    if dim % heads or (dim // heads) % 4:
        raise UnsupportedModelError(f"Pixtral vision hidden_size {dim} with {heads} heads: the head dim must be "
                                    "a multiple of 4 for its 2D rope")
    patch_in = chans * patch * patch
    w.add("vision.patch_conv.weight", (dim, patch_in), role="patch_embed", part="vision",
          source_shape=(dim, chans, patch, patch), transforms=[("reshape", {"shape": [dim, patch_in]})])
    w.add("vision.ln_pre.weight", (dim,), role="norm", part="vision")
    names = dict(norm1="attention_norm", norm2="ffn_norm", q="attention.q_proj", k="attention.k_proj",
                 v="attention.v_proj", out="attention.o_proj", gate="feed_forward.gate_proj",
                 up="feed_forward.up_proj", down="feed_forward.down_proj")
    vblock = vit_layer(w, name="vision_layer", prefix_fmt="vision.transformer.layers.{i}.", n_layers=n_layers,
                       dim=dim, heads=heads, mlp_dim=mlp_dim, norm="rms", eps=EPS, act=act, fused_qkv=False,
                       gated_mlp=True, names=names, rope=True, masks=["mask"],
                       layers=[{"index": i} for i in range(n_layers)], bias=False)
    prog.blocks[vblock.name] = vblock
    fb.param_types.update(w.types())
    px = fb.input("patches", ("S", patch_in), "float32")
    pos = fb.input("rope_positions", ("S", 2), "int32")
    mask = fb.input("mask", (1, 1, "S", "S"), "bool")
    x = fb.op("linear", px, fb.param("vision.patch_conv.weight"), name="x")
    x = fb.op("rms_norm", x, fb.param("vision.ln_pre.weight"), eps=EPS, name="x")
    cos, sin = fb.op("rope_freqs", pos, kind="axial2d_alternating", dim=dim // heads, theta=theta, n_out=2,
                     name="rope")
    hidden: dict[int, str] = {0: x}
    done = 0
    for d in sorted(set(depths)):
        if d > done:
            x = fb.op("call_block", x, cos, sin, mask, block=vblock.name, start=done, stop=d, name="hidden")
            done = d
        hidden[d] = x
    return [hidden[d] for d in depths], {"dim": dim, "patch": patch, "channels": chans, "layers": n_layers}
