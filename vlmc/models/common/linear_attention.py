"""The Gated DeltaNet decoder layer (linear attention with a recurrent state), as the
hybrid decoders interleave it with full-attention layers (Qwen3.5).

    x -> norm -> (padding rows zeroed) -> in_proj_qkv -> causal conv1d (state) + silu
      -> q, k (L2-normed), v heads;  in_proj_a, in_proj_b -> decay g, rate beta
      -> gated delta rule (state) -> gated RMSNorm with in_proj_z -> out_proj -> + x
      -> norm -> gated MLP -> + x

Its layer cache is the ``recurrent`` layout: the convolution's last K-1 inputs and the
[Hv, Dk, Dv] state per sequence (``runtime/state_cache.py``). The block takes the same
inputs as the full-attention block beside it (rotary tables unused) so both run from one
hybrid stack (``text_entry_points(..., stack=...)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder, make_block
from ...ir.core import COMPUTE, Block
from .layers import LayerSpec, act_kind, declare_layer_params, linear, norm_shift
from .text_config import TextConfig


@dataclass(frozen=True)
class LinearAttention:
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    @classmethod
    def from_config(cls, text: dict[str, Any]) -> "LinearAttention":
        """From a text config's ``linear_*`` fields (transformers' defaults for absent ones)."""
        la = cls(int(text.get("linear_num_key_heads", 16)), int(text.get("linear_num_value_heads", 32)),
                 int(text.get("linear_key_head_dim", 128)), int(text.get("linear_value_head_dim", 128)),
                 int(text.get("linear_conv_kernel_dim", 4)))
        if min(la.key_heads, la.value_heads, la.key_dim, la.value_dim) < 1 or la.conv_kernel < 2:
            raise UnsupportedModelError(f"linear attention sizes {la} are not positive (conv kernel >= 2)")
        if la.value_heads % la.key_heads:
            raise UnsupportedModelError(f"linear_num_value_heads {la.value_heads} is not a multiple of "
                                        f"linear_num_key_heads {la.key_heads}")
        return la

    def state(self) -> dict[str, int]:
        """The per-sequence cache's sizes (what ``kv_layout`` plans as the recurrent layout)."""
        return {"heads": self.value_heads, "key_dim": self.key_dim, "value_dim": self.value_dim,
                "conv_channels": self.conv_channels, "conv_width": self.conv_kernel - 1}


def gated_deltanet_layer(w: Weights, tc: TextConfig, la: LinearAttention, layers: Sequence[int], *,
                         prefix_fmt: str = "text.linear_layers.{i}.", norm_offset: float = 0.0,
                         ffn: Any = None, name: str = "text_linear_layer") -> Block:
    """The block of a hybrid decoder's linear-attention layers (``layers``: the decoder
    layers it holds, whose checkpoint params ``text.layers.<layer>.*`` it reads). ``ffn``:
    a feed-forward part in place of the gated MLP, as ``decoder_layer``'s."""
    h, ff = tc.hidden_size, tc.intermediate_size
    hk, hv, dk, dv, kern = la.key_heads, la.value_heads, la.key_dim, la.value_dim, la.conv_kernel
    chans = la.conv_channels
    spec: LayerSpec = {
        "input_layernorm.weight": ((h,), "norm"), "post_attention_layernorm.weight": ((h,), "norm"),
        "linear_attn.in_proj_qkv.weight": ((chans, h), "qkv"),
        "linear_attn.in_proj_z.weight": ((hv * dv, h), "gate"),
        "linear_attn.in_proj_b.weight": ((hv, h), "proj"),
        "linear_attn.in_proj_a.weight": ((hv, h), "proj"),
        "linear_attn.conv1d.weight": ((chans, kern), "proj"),
        "linear_attn.A_log": ((hv,), "proj"),
        "linear_attn.dt_bias": ((hv,), "proj"),
        "linear_attn.norm.weight": ((dv,), "norm"),
        "linear_attn.out_proj.weight": ((h, hv * dv), "o"),
    }
    if ffn is None:
        spec.update({"mlp.gate_proj.weight": ((ff, h), "gate"), "mlp.up_proj.weight": ((ff, h), "up"),
                     "mlp.down_proj.weight": ((h, ff), "down")})
    shift = norm_shift(norm_offset)
    transforms = {"input_layernorm.weight": shift, "post_attention_layernorm.weight": shift,
                  "linear_attn.conv1d.weight": [("reshape", {"shape": [chans, kern]})]}
    ptypes, roles = declare_layer_params(w, prefix_fmt, len(layers), spec, part="text", transforms=transforms,
                                         sources=layers, source_fmt="text.layers.{i}.",
                                         source_shapes={"linear_attn.conv1d.weight": (chans, 1, kern)})
    if ffn is not None:
        more_types, more_roles = ffn.declare(w, h, prefix_fmt, layers, "text.layers.{i}.")
        ptypes, roles = {**ptypes, **more_types}, {**roles, **more_roles}

    fb = FunctionBuilder(name, ptypes, doc="pre-norm Gated DeltaNet layer: linear attention + gated MLP")
    x = fb.input("x", ("B", "L", h), COMPUTE)
    fb.input("cos", ("B", 1, "L", "R"), "float32")  # unused: the full-attention block's inputs
    fb.input("sin", ("B", 1, "L", "R"), "float32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    cache = fb.input("cache", (), "kvcache")

    def norm(v: str, weight: str) -> str:
        return fb.op("rms_norm", v, fb.param(weight), eps=tc.rms_norm_eps, name="norm")

    n = fb.op("zero_padded", norm(x, "input_layernorm.weight"), mask, name="norm")
    qkv = linear(fb, n, "linear_attn.in_proj_qkv", bias=False)
    z = linear(fb, n, "linear_attn.in_proj_z", bias=False)
    b = linear(fb, n, "linear_attn.in_proj_b", bias=False)
    a = linear(fb, n, "linear_attn.in_proj_a", bias=False)
    qkv = fb.op("causal_conv1d", qkv, fb.param("linear_attn.conv1d.weight"), cache, activation="silu", name="conv")
    q, k, v = fb.op("split", qkv, sizes=[hk * dk, hk * dk, hv * dv], axis=-1, n_out=3, name="qkv")
    q = fb.op("l2_norm", fb.op("reshape", q, shape=[0, 0, hk, dk], name="q"), eps=1e-6, name="q")
    k = fb.op("l2_norm", fb.op("reshape", k, shape=[0, 0, hk, dk], name="k"), eps=1e-6, name="k")
    v = fb.op("reshape", v, shape=[0, 0, hv, dv], name="v")
    g, beta = fb.op("delta_gates", a, b, fb.param("linear_attn.A_log"), fb.param("linear_attn.dt_bias"), n_out=2,
                    name="gates")
    o = fb.op("gated_delta_rule", q, k, v, g, beta, cache, scale=dk ** -0.5, name="delta")
    z = fb.op("reshape", z, shape=[0, 0, hv, dv], name="z")
    o = fb.op("rms_norm_gated", o, z, fb.param("linear_attn.norm.weight"), eps=tc.rms_norm_eps, name="delta")
    o = fb.op("reshape", o, shape=[0, 0, hv * dv], name="delta")
    x = fb.op("add", x, linear(fb, o, "linear_attn.out_proj", bias=False), name="x")
    n = norm(x, "post_attention_layernorm.weight")
    if ffn is None:
        m = fb.op("glu", linear(fb, n, "mlp.gate_proj", bias=False), linear(fb, n, "mlp.up_proj", bias=False),
                  kind=act_kind(tc.hidden_act), name="mlp")
        m = linear(fb, m, "mlp.down_proj", bias=False)
    else:
        m = ffn.apply(fb, n, tc.hidden_act)
    x = fb.op("add", x, m, name="x")
    rows = [{"index": i, "layer": int(layer), "kv": {"layout": "recurrent", **la.state()}}
            for i, layer in enumerate(layers)]
    return make_block(name, fb.output(x), prefix_fmt, ptypes, rows, roles)
