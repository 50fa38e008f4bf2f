"""Shared building blocks for importers: the text decoder and ViT-style vision layers.

Families differ in configuration, not in code: a Llama/Qwen2/Mistral decoder layer (with
Gemma's options: QK-norm, sandwich norms, 1 + w norms, per-layer rotary tables and
windows) and a pre-norm ViT layer (LayerNorm or RMSNorm, fused or separate qkv, fc or
gated MLP, with or without 2D rotary) cover Qwen2-VL, Qwen2.5-VL, Gemma, CLIP and SigLIP.
Every param is declared with its role and part, which the passes match on.
"""
from __future__ import annotations

from typing import Any, Sequence

from ...errors import UnsupportedModelError
from ...frontend.config import vision_field
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder, make_block
from ...ir.core import COMPUTE, Block, Program, TensorType
from .text_config import TextConfig

# A layer's param table: relative name -> (shape, role).
LayerSpec = dict[str, tuple[tuple[int, ...], str]]


def declare_layer_params(w: Weights, prefix_fmt: str, n_layers: int, spec: LayerSpec,
                         part: str, transforms: dict[str, list] | None = None,
                         sources: Sequence[int] | None = None, source_fmt: str | None = None,
                         source_shapes: dict[str, tuple[int, ...]] | None = None
                         ) -> tuple[dict[str, TensorType], dict[str, str]]:
    """Add each layer's params and return the block's relative param types and roles.
    ``transforms``: compile-time weight transforms of some relative names (e.g. Gemma's
    norm shift, ``[("add", {"value": 1.0})]``). ``sources``: the checkpoint layer each of
    the block's layers reads (``source_fmt`` over it; a block holding some of a hybrid
    decoder's layers), which is also the param's ``layer``; ``source_shapes``: stored shapes
    of relative names that ``transforms`` reshape."""
    for i in range(n_layers):
        prefix = prefix_fmt.format(i=i)
        layer = i if sources is None else int(sources[i])
        src = None if sources is None else (source_fmt or prefix_fmt).format(i=layer)
        for rel, (shape, role) in spec.items():
            w.add(prefix + rel, shape, role=role, part=part, layer=layer, transforms=(transforms or {}).get(rel),
                  source=None if src is None else src + rel, source_shape=(source_shapes or {}).get(rel))
    types = {rel: TensorType(tuple(shape), "float32") for rel, (shape, _) in spec.items()}
    return types, {rel: role for rel, (_, role) in spec.items()}


def linear(fb: FunctionBuilder, x: str, name: str, *, bias: bool) -> str:
    """``name``.weight (and .bias) applied to x."""
    b = fb.param(name + ".bias") if bias else None
    return fb.op("linear", x, fb.param(name + ".weight"), b, name=name.split(".")[-1])


def act_kind(hf_name: str) -> str:
    kinds = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
    if hf_name not in kinds:
        raise UnsupportedModelError(f"activation {hf_name!r} is not supported")
    return kinds[hf_name]


# ---------------------------------------------------------------------------- text
def norm_shift(offset: float) -> list | None:
    """The compile-time transform of an RMSNorm weight applied as ``(offset + w)`` (Gemma's
    ``1 + w``): folded into the stored weight, so the norm op stays a plain RMSNorm."""
    return [("add", {"value": float(offset)})] if offset else None


def decoder_layer(w: Weights, tc: TextConfig, prefix_fmt: str = "text.layers.{i}.", *,
                  qk_norm: bool = False, sandwich_norms: bool = False, norm_offset: float = 0.0,
                  attn_scale: float | None = None, attn_softcap: float | None = None,
                  layer_rope: list[str] | None = None, layer_window: list[int | None] | None = None,
                  output_gate: bool = False, rope_dim: int | None = None, layers: Sequence[int] | None = None,
                  ffn: Any = None, name: str = "text_layer") -> Block:
    """The decoder layer block: pre-norm attention + gated MLP (Llama/Qwen2/Mistral), with
    options whose defaults keep that layer:

    - ``qk_norm``: RMSNorm over each query and key head before rotary (``self_attn.q_norm``,
      ``self_attn.k_norm``; Gemma 3, Qwen3);
    - ``sandwich_norms``: the attention and MLP outputs are normed too before their residual
      adds (Gemma 2/3: ``post_attention_layernorm`` on the attention output,
      ``pre_feedforward_layernorm`` before the MLP, ``post_feedforward_layernorm`` after it);
    - ``norm_offset``: every RMSNorm weight applied as ``offset + w`` (Gemma: 1), folded at
      compile time;
    - ``attn_scale``: the attention scale (default head_dim ** -0.5);
    - ``attn_softcap``: the scaled attention scores soft-capped at this value (Gemma 2);
    - ``layer_rope``: each layer's rotary table by name (e.g. "global"/"local"); the block
      then takes ``cos_<name>``/``sin_<name>`` for every name and each layer picks its own
      (layer-table ``cos``/``sin``); ``text_entry_points`` computes them;
    - ``layer_window``: each layer's sliding window (None: full attention), the layer
      table's ``window``, which ``kv_layout`` plans as a rotating cache;
    - ``output_gate``: q_proj makes each head's query followed by a gate of the same width,
      and the attention output is multiplied by sigmoid(gate) before o_proj (Qwen3.5);
    - ``rope_dim``: only each head's first ``rope_dim`` dims rotate (partial rotary);
    - ``layers``: the decoder layers this block holds (a hybrid decoder's full-attention
      layers): its params are ``prefix_fmt`` over the block's own index and read the
      checkpoint's ``text.layers.<layer>.*``; the layer table's ``layer`` says which;
    - ``ffn``: the feed-forward part in place of the gated MLP, an object with
      ``declare(w, hidden, prefix_fmt, layers, source_fmt)`` (its params' types and roles)
      and ``apply(fb, normed, hidden_act)`` (its output), e.g. ``common.moe.SparseMoe``.
    """
    h, hd, nh, nkv, ff = tc.hidden_size, tc.head_dim, tc.num_heads, tc.num_kv_heads, tc.intermediate_size
    rd = rope_dim or hd
    n_layers = tc.num_layers if layers is None else len(layers)
    mlp_norm = "pre_feedforward_layernorm.weight" if sandwich_norms else "post_attention_layernorm.weight"
    spec: LayerSpec = {
        "input_layernorm.weight": ((h,), "norm"), mlp_norm: ((h,), "norm"),
        "self_attn.q_proj.weight": ((nh * hd * (2 if output_gate else 1), h), "q"),
        "self_attn.k_proj.weight": ((nkv * hd, h), "k"),
        "self_attn.v_proj.weight": ((nkv * hd, h), "v"), "self_attn.o_proj.weight": ((h, nh * hd), "o"),
    }
    if ffn is None:
        spec.update({"mlp.gate_proj.weight": ((ff, h), "gate"), "mlp.up_proj.weight": ((ff, h), "up"),
                     "mlp.down_proj.weight": ((h, ff), "down")})
    if sandwich_norms:
        spec.update({"post_attention_layernorm.weight": ((h,), "norm"),
                     "post_feedforward_layernorm.weight": ((h,), "norm")})
    if qk_norm:
        spec.update({"self_attn.q_norm.weight": ((hd,), "norm"), "self_attn.k_norm.weight": ((hd,), "norm")})
    if tc.qkv_bias:
        spec.update({"self_attn.q_proj.bias": ((nh * hd * (2 if output_gate else 1),), "q"), "self_attn.k_proj.bias": ((nkv * hd,), "k"),
                     "self_attn.v_proj.bias": ((nkv * hd,), "v")})
    if tc.o_bias:
        spec["self_attn.o_proj.bias"] = ((h,), "o")
    if tc.mlp_bias and ffn is None:
        spec.update({"mlp.gate_proj.bias": ((ff,), "gate"), "mlp.up_proj.bias": ((ff,), "up"),
                     "mlp.down_proj.bias": ((h,), "down")})
    shift = norm_shift(norm_offset)
    ptypes, roles = declare_layer_params(w, prefix_fmt, n_layers, spec, part="text",
                                         transforms={rel: shift for rel, (_, role) in spec.items() if role == "norm"},
                                         sources=layers, source_fmt="text.layers.{i}.")
    if ffn is not None:
        more_types, more_roles = ffn.declare(w, h, prefix_fmt, range(n_layers) if layers is None else layers,
                                             prefix_fmt if layers is None else "text.layers.{i}.")
        ptypes, roles = {**ptypes, **more_types}, {**roles, **more_roles}
    tables = list(dict.fromkeys(layer_rope or []))

    fb = FunctionBuilder(name, ptypes, doc="pre-norm decoder layer: attention + gated MLP" + (
        " (attention output gated)" if output_gate else ""))
    x = fb.input("x", ("B", "L", h), COMPUTE)
    if tables:  # one (cos, sin) pair per rotary table; each layer picks its own
        pairs = [(fb.input(f"cos_{t}", ("B", 1, "L", hd), "float32"), fb.input(f"sin_{t}", ("B", 1, "L", hd), "float32"))
                 for t in tables]
        cos, sin = fb.select_input("cos", [c for c, _ in pairs]), fb.select_input("sin", [s for _, s in pairs])
    else:
        cos = fb.input("cos", ("B", 1, "L", rd), "float32")
        sin = fb.input("sin", ("B", 1, "L", rd), "float32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    cache = fb.input("cache", (), "kvcache")

    def norm(v: str, weight: str) -> str:
        return fb.op("rms_norm", v, fb.param(weight), eps=tc.rms_norm_eps, name="norm")

    n = norm(x, "input_layernorm.weight")
    heads, gate = {}, None
    for proj, count in (("q", nh), ("k", nkv), ("v", nkv)):
        y = linear(fb, n, f"self_attn.{proj}_proj", bias=tc.qkv_bias)
        if output_gate and proj == "q":  # per head: the query, then its gate
            y = fb.op("reshape", y, shape=[0, 0, count, 2 * hd], name=proj)
            y, gate = fb.op("split", y, sizes=[hd, hd], axis=-1, n_out=2, name="q")
            gate = fb.op("reshape", gate, shape=[0, 0, nh * hd], name="gate")
        else:
            y = fb.op("reshape", y, shape=[0, 0, count, hd], name=proj)
        if qk_norm and proj in ("q", "k"):
            y = fb.op("rms_norm", y, fb.param(f"self_attn.{proj}_norm.weight"), eps=tc.rms_norm_eps, name=proj)
        heads[proj] = fb.op("transpose", y, axes=[0, 2, 1, 3], name=proj)
    def rotate(v: str, hint: str) -> str:
        if rd == hd:
            return fb.op("rope", v, cos, sin, name=hint)
        part, rest = fb.op("split", v, sizes=[rd, hd - rd], axis=-1, n_out=2, name=hint)
        return fb.op("concat", fb.op("rope", part, cos, sin, name=hint), rest, axis=-1, name=hint)

    q = rotate(heads["q"], "q")
    k = rotate(heads["k"], "k")
    scale = hd ** -0.5 if attn_scale is None else float(attn_scale)
    capped = {} if attn_softcap is None else {"softcap": float(attn_softcap)}
    a = fb.op("cached_attention", q, k, heads["v"], cache, mask, scale=scale, name="attn", **capped)
    a = fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn")
    a = fb.op("reshape", a, shape=[0, 0, nh * hd], name="attn")
    if gate is not None:
        a = fb.op("mul", a, fb.op("act", gate, kind="sigmoid", name="gate"), name="attn")
    a = linear(fb, a, "self_attn.o_proj", bias=tc.o_bias)
    if sandwich_norms:
        a = norm(a, "post_attention_layernorm.weight")
    x = fb.op("add", x, a, name="x")
    n = norm(x, mlp_norm)
    if ffn is None:
        g = linear(fb, n, "mlp.gate_proj", bias=tc.mlp_bias)
        u = linear(fb, n, "mlp.up_proj", bias=tc.mlp_bias)
        m = fb.op("glu", g, u, kind=act_kind(tc.hidden_act), name="mlp")
        m = linear(fb, m, "mlp.down_proj", bias=tc.mlp_bias)
    else:
        m = ffn.apply(fb, n, tc.hidden_act)
    if sandwich_norms:
        m = norm(m, "post_feedforward_layernorm.weight")
    x = fb.op("add", x, m, name="x")
    body = fb.output(x)
    rows: list[dict[str, Any]] = []
    for i in range(n_layers):
        row: dict[str, Any] = {"index": i}
        if layers is not None:
            row["layer"] = int(layers[i])
        if layer_window and layer_window[i]:
            row["window"] = int(layer_window[i])
        if tables:
            row.update(cos=f"%cos_{layer_rope[i]}", sin=f"%sin_{layer_rope[i]}")
        row["kv"] = {"layout": "dense"}
        rows.append(row)
    return make_block(name, body, prefix_fmt, ptypes, rows, roles)


def text_entry_points(prog: Program, w: Weights, tc: TextConfig, block: Block, position_streams: int = 1, *,
                      embed_scale: float | None = None, norm_offset: float = 0.0,
                      final_softcap: float | None = None, rope_tables: dict[str, dict[str, Any]] | None = None,
                      deepstack: Sequence[int] = (), rope_dim: int | None = None,
                      stack: Sequence[tuple[Block, Sequence[int]]] = ()) -> None:
    """embed / prefill / decode / verify over the decoder block, final norm and LM head.

    Positions are [B, L] for one stream of rotary positions, [streams, B, L] for several
    (M-RoPE's t/h/w). ``verify`` runs several new tokens per sequence and returns the
    logits of every one of them (speculative decoding checks drafts with it).

    Options (defaults: none of them): ``embed_scale`` multiplies token embeddings (Gemma's
    sqrt(hidden); image features merged into ``embed``'s output are not scaled);
    ``norm_offset`` shifts the final norm's weight as in ``decoder_layer``; ``final_softcap``
    soft-caps the logits; ``rope_tables``: name -> ``rope_freqs`` attributes (kind, theta,
    factor) of each rotary table a block made with ``layer_rope`` takes.

    ``deepstack``: decoder layers after which features are added to the hidden state
    (Qwen3-VL's DeepStack: level k after layer ``deepstack[k]``). ``embed`` then returns
    [B, L, (1 + K) * hidden] rows: the token embedding followed by K zero blocks, which
    ``Inputs.merge`` fills at image tokens with the vision features' K extra blocks; prefill
    runs the token embedding through the layers and adds block k after layer
    ``deepstack[k]`` (zeros at text tokens, so every prompt, with images or without, and
    any batch of them, takes the same prefill). Decode and verify steps take no image
    tokens and add nothing.

    ``rope_dim``: the rotary tables' width when only part of each head rotates (default
    the head dim). ``stack``: a hybrid decoder, its layers split among several blocks
    (Qwen3.5's linear- and full-attention layers): (block, the decoder layers it runs, in
    order) per block; each block's layer i gets the cache of its i-th decoder layer
    (``select_caches``), and the layers run in decoder order. Every block takes ``block``'s
    inputs (rotary tables, mask, caches), used or not."""
    h, v = tc.hidden_size, tc.vocab_size
    deepstack = [int(i) for i in deepstack]
    if deepstack and stack:
        raise ValueError("deepstack features are not supported with a hybrid stack")
    if deepstack and (deepstack != sorted(set(deepstack)) or deepstack[0] < 0 or deepstack[-1] >= tc.num_layers):
        raise ValueError(f"deepstack layers {deepstack} are not increasing decoder layer indices "
                         f"below {tc.num_layers}")
    w.add("text.embed_tokens.weight", (v, h), role="embed", part="text")
    w.add("text.norm.weight", (h,), role="norm", part="text", transforms=norm_shift(norm_offset))
    if tc.tie_word_embeddings:
        head = "text.embed_tokens.weight"  # tied: the artifact stores the matrix once
    else:
        w.add("lm_head.weight", (v, h), role="head", part="text")
        head = "lm_head.weight"
    types = w.types()

    def embedding(fb: FunctionBuilder, ids: str, name: str) -> str:
        x = fb.op("embedding", ids, fb.param("text.embed_tokens.weight"), name=name)
        return x if embed_scale is None else fb.op("scale", x, value=float(embed_scale), name=name)

    fb = FunctionBuilder("embed", types, doc="token ids -> input embeddings" + (
        f" [token | {len(deepstack)} zero DeepStack blocks]" if deepstack else ""))
    ids = fb.input("ids", ("B", "L"), "int32")
    x = embedding(fb, ids, "embeds")
    if deepstack:
        x = fb.op("pad_axis", x, axis=-1, after=len(deepstack) * h, name="embeds")
    prog.functions["embed"] = fb.output(x)
    pos_shape = ("B", "L") if position_streams == 1 else (position_streams, "B", "L")
    rope_attrs: dict[str, Any] = dict(kind=tc.rope_kind, dim=rope_dim or tc.head_dim, theta=tc.rope_theta,
                                      **tc.rope_attrs)
    if tc.rope_kind in ("mrope", "mrope_interleaved"):
        rope_attrs["sections"] = list(tc.mrope_sections)
    tables = [i[len("%cos_"):] for i in block.body.inputs if i.startswith("%cos_")]
    if sorted(tables) != sorted(rope_tables or {}):
        raise ValueError(f"the decoder block takes rotary tables {tables}, given {sorted(rope_tables or {})}")
    docs = {"prefill": "prompt embeddings (text + merged image features) -> logits at the last position",
            "decode": "one new token per sequence -> next-token logits",
            "verify": "several new tokens per sequence -> the logits after each of them"}
    for name, doc in docs.items():
        fb = FunctionBuilder(name, types, doc=doc)
        wide = None
        if name == "prefill":
            x = fb.input("embeds", ("B", "L", h * (1 + len(deepstack))), COMPUTE)
            if deepstack:
                wide, x = x, fb.op("slice_axis", x, axis=-1, start=0, stop=h, name="x")
        else:
            tok = fb.input("ids", ("B", 1 if name == "decode" else "L"), "int32")
            x = embedding(fb, tok, "x")
        pos = fb.input("positions", pos_shape, "int32")
        mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
        caches = fb.input("caches", (), "kvcache")
        if tables:
            rope = [t for table in tables
                    for t in fb.op("rope_freqs", pos, n_out=2, name=f"rope_{table}",
                                   **{"dim": tc.head_dim, **rope_tables[table]})]
        else:
            rope = fb.op("rope_freqs", pos, n_out=2, name="rope", **rope_attrs)
        if stack:
            x = _hybrid_stack(fb, x, rope, mask, caches, stack, tc.num_layers)
        start = tc.num_layers if stack else 0
        for k, layer in enumerate(deepstack if wide is not None else []):
            x = fb.op("call_block", x, *rope, mask, caches, block=block.name, start=start, stop=layer + 1, name="x")
            feat = fb.op("slice_axis", wide, axis=-1, start=(1 + k) * h, stop=(2 + k) * h, name=f"deepstack{k}_")
            x = fb.op("add", x, feat, name="x")
            start = layer + 1
        if start < tc.num_layers:
            x = fb.op("call_block", x, *rope, mask, caches, block=block.name, start=start,
                      stop=tc.num_layers, name="x")
        if name != "verify":
            x = fb.op("slice_axis", x, axis=1, start=-1, name="last")
        x = fb.op("rms_norm", x, fb.param("text.norm.weight"), eps=tc.rms_norm_eps, name="x")
        logits = fb.op("linear", x, fb.param(head), name="logits")
        if final_softcap is not None:
            logits = fb.op("softcap", logits, cap=float(final_softcap), name="logits")
        prog.functions[name] = fb.output(logits)


def hybrid_stack(fb: FunctionBuilder, x: str, rope: list[str], mask: str, caches: str,
                 stack: Sequence[tuple], n_layers: int, *, extra: Sequence[str] = ()) -> str:
    """The decoder layers of several blocks in decoder order: one ``select_caches`` per block,
    one ``call_block`` per run of consecutive layers of the same block. A stack entry is
    (block, its decoder layers) or (block, its decoder layers, the cache each layer reads):
    by default a layer's own, the cache of another layer where it reads that one's (Gemma
    4's KV-shared layers). ``extra``: inputs every block takes after the hidden state."""
    owner: dict[int, tuple[Block, int]] = {}
    for blk, layers, *_ in stack:
        for local, layer in enumerate(layers):
            owner[int(layer)] = (blk, local)
    if sorted(owner) != list(range(n_layers)):
        raise ValueError(f"the hybrid stack's blocks cover layers {sorted(owner)}, not 0..{n_layers - 1}")
    mine = {entry[0].name: fb.op("select_caches", caches, layers=[int(i) for i in (entry[2] if len(entry) > 2
                                                                                     else entry[1])],
                                 name=f"caches_{entry[0].name}")
            for entry in stack}
    layer = 0
    while layer < n_layers:
        blk, first = owner[layer]
        stop = layer
        while stop < n_layers and owner[stop][0] is blk:
            stop += 1
        x = fb.op("call_block", x, *extra, *rope, mask, mine[blk.name], block=blk.name, start=first,
                  stop=first + stop - layer, name="x")
        layer = stop
    return x


_hybrid_stack = hybrid_stack


def finish(prog: Program, w: Weights, tc: TextConfig) -> Program:
    """The program's params and the decoder facts the runtime reads (``meta["text"]``)."""
    prog.params = dict(w.params)
    prog.meta["text"] = tc.meta()
    return prog


# -------------------------------------------------------------------------- vision
def vit_layer(w: Weights, *, name: str, prefix_fmt: str, n_layers: int, dim: int, heads: int,
              mlp_dim: int, norm: str, eps: float, act: str, fused_qkv: bool, gated_mlp: bool,
              names: dict[str, str], rope: bool, masks: list[str] | None,
              layers: list[dict[str, Any]], bias: bool = True) -> Block:
    """A pre-norm ViT layer on [N, S, E] (or [S, E] when ``rope``: packed patches).

    ``names`` maps roles (norm1, norm2, qkv | q/k/v, out, fc1, fc2 | gate/up/down) to the
    checkpoint's relative module names. ``masks``: block inputs a layer may attend with,
    chosen per layer by the ``mask`` attribute of the layer table. ``bias``: whether the
    projections carry biases (Pixtral's have none).
    """
    hd = dim // heads
    spec: LayerSpec = {}

    def module(role: str, shape: tuple[int, ...], ir_role: str) -> None:
        spec[names[role] + ".weight"] = (shape, ir_role)
        if bias:
            spec[names[role] + ".bias"] = ((shape[0],), ir_role)

    for role in ("norm1", "norm2"):
        spec[names[role] + ".weight"] = ((dim,), "norm")
        if norm == "layer":
            spec[names[role] + ".bias"] = ((dim,), "norm")
    if fused_qkv:
        module("qkv", (3 * dim, dim), "qkv")
    else:
        for r in ("q", "k", "v"):
            module(r, (dim, dim), r)
    module("out", (dim, dim), "o")
    if gated_mlp:
        for r, shape in (("gate", (mlp_dim, dim)), ("up", (mlp_dim, dim)), ("down", (dim, mlp_dim))):
            module(r, shape, r)
    else:
        module("fc1", (mlp_dim, dim), "fc1")
        module("fc2", (dim, mlp_dim), "fc2")
    ptypes, roles = declare_layer_params(w, prefix_fmt, n_layers, spec, part="vision")

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
        qkv = linear(fb, n, names["qkv"], bias=bias)
        q, k, v = fb.op("split", qkv, sizes=[dim, dim, dim], axis=-1, n_out=3, name="qkv")
    else:
        q, k, v = (linear(fb, n, names[r], bias=bias) for r in ("q", "k", "v"))
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
    x = fb.op("add", x, linear(fb, a, names["out"], bias=bias), name="x")
    n = normed(x, "norm2")
    if gated_mlp:
        g = linear(fb, n, names["gate"], bias=bias)
        u = linear(fb, n, names["up"], bias=bias)
        m = fb.op("glu", g, u, kind=act, name="mlp")
        y = linear(fb, m, names["down"], bias=bias)
    else:
        m = fb.op("act", linear(fb, n, names["fc1"], bias=bias), kind=act, name="mlp")
        y = linear(fb, m, names["fc2"], bias=bias)
    x = fb.op("add", x, y, name="x")
    return make_block(name, fb.output(x), prefix_fmt, ptypes, layers, roles)


def siglip_tower(w: Weights, prog: Program, vc: dict[str, Any], fb: FunctionBuilder,
                 name: str = "vision_layer", *, position_ids: bool = False) -> tuple[str, dict[str, int]]:
    """A SigLIP vision tower up to its ``last_hidden_state`` (post-layernorm, no head), as
    Gemma 3 and PaliGemma read it: declares its params (``vision.*``) and layer block, and
    adds to ``fb`` (a ``vision_encode`` being built) a ``pixels`` [N, C, S, S] input and the
    tower's ops. Returns the [N, patches, dim] value and the tower's sizes (dim,
    image_size, patch, channels); absent config fields take SiglipVisionConfig's defaults.

    ``position_ids``: the tower also takes ``position_ids`` [patches] (int32, planned on the
    host) and adds the position table's rows at those ids, rather than the whole table in
    order: Idefics3's NaViT-style embeddings bucket each patch's fractional coordinates,
    which for some grid sizes is not the identity."""
    dim = int(vision_field(vc, "hidden_size", default=768))
    heads = int(vision_field(vc, "num_attention_heads", default=12))
    n_layers = int(vision_field(vc, "num_hidden_layers", default=12))
    mlp_dim = int(vision_field(vc, "intermediate_size", default=3072))
    patch = int(vision_field(vc, "patch_size", default=16))
    size = int(vision_field(vc, "image_size", default=224))
    chans = int(vision_field(vc, "num_channels", default=3))
    eps = float(vision_field(vc, "layer_norm_eps", default=1e-6))
    act = act_kind(vision_field(vc, "hidden_act", default="gelu_pytorch_tanh"))
    if size % patch:
        raise UnsupportedModelError(f"vision image_size {size} is not a multiple of patch_size {patch}")
    n_patches = (size // patch) ** 2
    patch_in = chans * patch * patch
    vis = dict(part="vision")
    w.add("vision.embeddings.patch_embedding.weight", (dim, patch_in), role="patch_embed", **vis,
          source_shape=(dim, chans, patch, patch), transforms=[("reshape", {"shape": [dim, patch_in]})])
    w.add("vision.embeddings.patch_embedding.bias", (dim,), role="patch_embed", **vis)
    w.add("vision.embeddings.position_embedding.weight", (n_patches, dim), role="pos_embed", **vis)
    w.add("vision.post_layernorm.weight", (dim,), role="norm", **vis)
    w.add("vision.post_layernorm.bias", (dim,), role="norm", **vis)
    names = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj", k="self_attn.k_proj",
                 v="self_attn.v_proj", out="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2")
    vblock = vit_layer(w, name=name, prefix_fmt="vision.encoder.layers.{i}.", n_layers=n_layers, dim=dim,
                       heads=heads, mlp_dim=mlp_dim, norm="layer", eps=eps, act=act, fused_qkv=False,
                       gated_mlp=False, names=names, rope=False, masks=None,
                       layers=[{"index": i} for i in range(n_layers)])
    prog.blocks[vblock.name] = vblock
    fb.param_types.update(w.types())
    px = fb.input("pixels", ("N", chans, size, size), "float32")
    x = fb.op("patchify", px, patch=patch, name="patches")
    x = fb.op("linear", x, fb.param("vision.embeddings.patch_embedding.weight"),
              fb.param("vision.embeddings.patch_embedding.bias"), name="x")
    table = fb.param("vision.embeddings.position_embedding.weight")
    if position_ids:
        ids = fb.input("position_ids", (n_patches,), "int32")
        table = fb.op("take", table, ids, axis=0, name="positions")
    x = fb.op("add", x, table, name="x")
    x = fb.op("call_block", x, block=vblock.name, start=0, stop=n_layers, name="x")
    x = fb.op("layer_norm", x, fb.param("vision.post_layernorm.weight"), fb.param("vision.post_layernorm.bias"),
              eps=eps, name="hidden")
    return x, {"dim": dim, "image_size": size, "patch": patch, "channels": chans}
