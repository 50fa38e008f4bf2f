"""Shared building blocks for importers: the text decoder and ViT-style vision layers.

Families differ in configuration, not in code: a Llama/Qwen2/Mistral decoder layer,
a pre-norm ViT layer (LayerNorm or RMSNorm, fused or separate qkv, fc or gated MLP,
with or without 2D rotary) cover Qwen2-VL, Qwen2.5-VL, CLIP and SigLIP.
"""
from __future__ import annotations

from typing import Any

from ..ir.builder import FunctionBuilder, make_block
from ..ir.core import Block, Function, Program, TensorType
from .config import TextConfig
from .weights import Weights


def declare_layer_params(w: Weights, prefix_fmt: str, n_layers: int,
                         spec: dict[str, tuple[int, ...]]) -> dict[str, TensorType]:
    """Add each layer's params (``spec``: relative name -> shape) and return the block's
    relative param table."""
    for i in range(n_layers):
        prefix = prefix_fmt.format(i=i)
        for rel, shape in spec.items():
            w.add(prefix + rel, shape)
    return {rel: TensorType(tuple(shape), "float32") for rel, shape in spec.items()}


def _lin(fb: FunctionBuilder, x: str, name: str, *, bias: bool) -> str:
    b = fb.param(name + ".bias") if bias else None
    return fb.op("linear", x, fb.param(name + ".weight"), b, name=name.split(".")[-1])


# ---------------------------------------------------------------------------- text
def decoder_layer(w: Weights, tc: TextConfig, prefix_fmt: str = "text.layers.{i}.") -> Block:
    h, hd, nh, nkv, ff = tc.hidden_size, tc.head_dim, tc.num_heads, tc.num_kv_heads, tc.intermediate_size
    spec: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nh * hd, h), "self_attn.k_proj.weight": (nkv * hd, h),
        "self_attn.v_proj.weight": (nkv * hd, h), "self_attn.o_proj.weight": (h, nh * hd),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }
    if tc.qkv_bias:
        spec.update({"self_attn.q_proj.bias": (nh * hd,), "self_attn.k_proj.bias": (nkv * hd,),
                     "self_attn.v_proj.bias": (nkv * hd,)})
    if tc.o_bias:
        spec["self_attn.o_proj.bias"] = (h,)
    if tc.mlp_bias:
        spec.update({"mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (h,)})
    ptypes = declare_layer_params(w, prefix_fmt, tc.num_layers, spec)

    fb = FunctionBuilder("text_layer", ptypes, doc="pre-norm decoder layer: attention + gated MLP")
    x = fb.input("x", ("B", "L", h), "float32")
    cos = fb.input("cos", ("B", 1, "L", hd), "float32")
    sin = fb.input("sin", ("B", 1, "L", hd), "float32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    cache = fb.input("cache", (), "kvcache")
    n = fb.op("rms_norm", x, fb.param("input_layernorm.weight"), eps=tc.rms_norm_eps, name="norm")
    heads = {}
    for proj, count in (("q", nh), ("k", nkv), ("v", nkv)):
        y = _lin(fb, n, f"self_attn.{proj}_proj", bias=tc.qkv_bias)
        y = fb.op("reshape", y, shape=[0, 0, count, hd], name=proj)
        heads[proj] = fb.op("transpose", y, axes=[0, 2, 1, 3], name=proj)
    q = fb.op("rope", heads["q"], cos, sin, name="q")
    k = fb.op("rope", heads["k"], cos, sin, name="k")
    a = fb.op("cached_attention", q, k, heads["v"], cache, mask, scale=hd ** -0.5, name="attn")
    a = fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn")
    a = fb.op("reshape", a, shape=[0, 0, nh * hd], name="attn")
    x = fb.op("add", x, _lin(fb, a, "self_attn.o_proj", bias=tc.o_bias), name="x")
    n = fb.op("rms_norm", x, fb.param("post_attention_layernorm.weight"), eps=tc.rms_norm_eps, name="norm")
    g = _lin(fb, n, "mlp.gate_proj", bias=tc.mlp_bias)
    u = _lin(fb, n, "mlp.up_proj", bias=tc.mlp_bias)
    m = fb.op("glu", g, u, kind=act_kind(tc.hidden_act), name="mlp")
    x = fb.op("add", x, _lin(fb, m, "mlp.down_proj", bias=tc.mlp_bias), name="x")
    body = fb.output(x)
    layers = [{"index": i, "kv": "dense"} for i in range(tc.num_layers)]
    return make_block("text_layer", body, prefix_fmt, ptypes, layers)


def text_entry_points(prog: Program, w: Weights, tc: TextConfig, block: Block) -> None:
    """embed / prefill / decode over the decoder block, final norm and LM head."""
    h, v = tc.hidden_size, tc.vocab_size
    w.add("text.embed_tokens.weight", (v, h))
    w.add("text.norm.weight", (h,))
    if tc.tie_word_embeddings:
        head = "text.embed_tokens.weight"  # tied: the artifact stores the matrix once
    else:
        w.add("lm_head.weight", (v, h))
        head = "lm_head.weight"
    types = w.types()

    fb = FunctionBuilder("embed", types, doc="token ids -> input embeddings")
    ids = fb.input("ids", ("B", "L"), "int32")
    prog.functions["embed"] = fb.output(fb.op("embedding", ids, fb.param("text.embed_tokens.weight"),
                                              name="embeds"))
    pos_shape = ("B", "L") if tc.rope_kind == "default" else (3, "B", "L")
    rope_attrs: dict[str, Any] = dict(kind=tc.rope_kind, dim=tc.head_dim, theta=tc.rope_theta)
    if tc.rope_kind == "mrope":
        rope_attrs["sections"] = list(tc.mrope_sections)

    for name in ("prefill", "decode"):
        fb = FunctionBuilder(name, types, doc=(
            "prompt embeddings (text + merged image features) -> logits at the last position"
            if name == "prefill" else "one new token per sequence -> next-token logits"))
        if name == "prefill":
            x = fb.input("embeds", ("B", "L", h), "float32")
        else:
            tok = fb.input("ids", ("B", 1), "int32")
            x = fb.op("embedding", tok, fb.param("text.embed_tokens.weight"), name="x")
        pos = fb.input("positions", pos_shape, "int32")
        mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
        caches = fb.input("caches", (), "kvcache")
        cos, sin = fb.op("rope_freqs", pos, n_out=2, name="rope", **rope_attrs)
        x = fb.op("call_block", x, cos, sin, mask, caches, block=block.name, start=0,
                  stop=tc.num_layers, name="x")
        x = fb.op("slice_axis", x, axis=1, start=-1, name="last")
        x = fb.op("rms_norm", x, fb.param("text.norm.weight"), eps=tc.rms_norm_eps, name="x")
        prog.functions[name] = fb.output(fb.op("linear", x, fb.param(head), name="logits"))


def act_kind(hf_name: str) -> str:
    kinds = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
    if hf_name not in kinds:
        from ..errors import UnsupportedModelError
        raise UnsupportedModelError(f"activation {hf_name!r} is not supported")
    return kinds[hf_name]



# -------------------------------------------------------------------------- vision
def vit_layer(w: Weights, *, name: str, prefix_fmt: str, n_layers: int, dim: int, heads: int,
              mlp_dim: int, norm: str, eps: float, act: str, fused_qkv: bool, gated_mlp: bool,
              names: dict[str, str], rope: bool, masks: list[str] | None,
              layers: list[dict[str, Any]]) -> Block:
    """A pre-norm ViT layer on [N, S, E] (or [S, E] when ``rope``: packed patches).

    ``names`` maps roles (norm1, norm2, qkv | q/k/v, out, fc1, fc2 | gate/up/down) to the
    checkpoint's relative module names. ``masks``: block inputs a layer may attend with,
    chosen per layer by the ``mask`` attribute of the layer table.
    """
    hd = dim // heads
    spec: dict[str, tuple[int, ...]] = {}
    for role in ("norm1", "norm2"):
        spec[names[role] + ".weight"] = (dim,)
        if norm == "layer":
            spec[names[role] + ".bias"] = (dim,)
    if fused_qkv:
        spec.update({names["qkv"] + ".weight": (3 * dim, dim), names["qkv"] + ".bias": (3 * dim,)})
    else:
        for r in ("q", "k", "v"):
            spec.update({names[r] + ".weight": (dim, dim), names[r] + ".bias": (dim,)})
    spec.update({names["out"] + ".weight": (dim, dim), names["out"] + ".bias": (dim,)})
    if gated_mlp:
        for r, shape in (("gate", (mlp_dim, dim)), ("up", (mlp_dim, dim)), ("down", (dim, mlp_dim))):
            spec.update({names[r] + ".weight": shape, names[r] + ".bias": (shape[0],)})
    else:
        spec.update({names["fc1"] + ".weight": (mlp_dim, dim), names["fc1"] + ".bias": (mlp_dim,),
                     names["fc2"] + ".weight": (dim, mlp_dim), names["fc2"] + ".bias": (dim,)})
    ptypes = declare_layer_params(w, prefix_fmt, n_layers, spec)

    fb = FunctionBuilder(name, ptypes, doc="pre-norm ViT layer")
    if rope:
        x = fb.input("x", ("S", dim), "float32")
        cos = fb.input("cos", ("S", 1, hd), "float32")
        sin = fb.input("sin", ("S", 1, hd), "float32")
    else:
        x = fb.input("x", ("N", "S", dim), "float32")
    mask_inputs = [fb.input(m, (1, 1, "S", "S"), "bool") for m in (masks or [])]

    def normed(v: str, role: str) -> str:
        wt = fb.param(names[role] + ".weight")
        if norm == "layer":
            return fb.op("layer_norm", v, wt, fb.param(names[role] + ".bias"), eps=eps, name="norm")
        return fb.op("rms_norm", v, wt, eps=eps, name="norm")

    n = normed(x, "norm1")
    if fused_qkv:
        qkv = _lin(fb, n, names["qkv"], bias=True)
        q, k, v = fb.op("split", qkv, sizes=[dim, dim, dim], axis=-1, n_out=3, name="qkv")
    else:
        q, k, v = (_lin(fb, n, names[r], bias=True) for r in ("q", "k", "v"))
    if rope:  # packed [S, E]: heads, rotate, then [1, H, S, hd] for attention
        q, k, v = (fb.op("reshape", t, shape=[0, heads, hd], name=r) for t, r in zip((q, k, v), "qkv"))
        q = fb.op("rope", q, cos, sin, name="q")
        k = fb.op("rope", k, cos, sin, name="k")
        q, k, v = (fb.op("transpose", t, axes=[1, 0, 2], name=r) for t, r in zip((q, k, v), "qkv"))
        q, k, v = (fb.op("reshape", t, shape=[1, heads, -1, hd], name=r) for t, r in zip((q, k, v), "qkv"))
    else:
        q, k, v = (fb.op("reshape", t, shape=[0, 0, heads, hd], name=r) for t, r in zip((q, k, v), "qkv"))
        q, k, v = (fb.op("transpose", t, axes=[0, 2, 1, 3], name=r) for t, r in zip((q, k, v), "qkv"))
    mask = None
    if mask_inputs:
        mask = mask_inputs[0] if len(mask_inputs) == 1 else fb.select_input("mask", mask_inputs)
    a = fb.op("attention", q, k, v, mask, scale=hd ** -0.5, name="attn")
    a = fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn")
    a = fb.op("reshape", a, shape=[-1, dim] if rope else [0, 0, dim], name="attn")
    x = fb.op("add", x, _lin(fb, a, names["out"], bias=True), name="x")
    n = normed(x, "norm2")
    if gated_mlp:
        g = _lin(fb, n, names["gate"], bias=True)
        u = _lin(fb, n, names["up"], bias=True)
        m = fb.op("glu", g, u, kind=act, name="mlp")
        y = _lin(fb, m, names["down"], bias=True)
    else:
        m = fb.op("act", _lin(fb, n, names["fc1"], bias=True), kind=act, name="mlp")
        y = _lin(fb, m, names["fc2"], bias=True)
    x = fb.op("add", x, y, name="x")
    return make_block(name, fb.output(x), prefix_fmt, ptypes, layers)

