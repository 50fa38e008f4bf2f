"""Gemma 4 checkpoints -> IR: the vision encoder, its embedder and the Gemma 4 decoder.

The vision encoder (transformers' Gemma4VisionModel) on one image's real patches, packed
image after image ([S, 3 p p] rows; the host plans each patch's position, the block mask
and the pooling windows):

- patch embedding: ``input_proj`` of the pixels mapped to [-1, 1] (the host does that:
  ``2 (x - 0.5)``), plus the learned x and y position tables' rows at the patch's column
  and row (one [2 P, E] table, the y rows after the x rows);
- layers like the decoder's (sandwich RMSNorms, q/k norms, unweighted value norm,
  attention scale 1, GELU-tanh gated MLP), attending within the image, with a 2D rope:
  the first half of each head turns with the patch's column, the second with its row
  (each half a plain rope of half the head dim); with ``use_clipped_linears`` every
  projection clamps its input and output to scalar bounds stored in the checkpoint;
- pooling: the mean of each k x k cell of patches (k = ``pooling_kernel_size``, cells in
  row-major order), times sqrt(E), optionally standardised (``std_bias``, ``std_scale``);
- the embedder: an unweighted RMSNorm and ``embedding_projection`` to the text width,
  then the pad token's per-layer embeddings (see ``common.gemma4``).

The audio tower of the checkpoints is not read: vlmc takes text and images.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder, make_block
from ...ir.core import Program
from ..common.gemma4 import Gemma4Text, gemma4_decoder, gemma4_text, pad_rows
from ..common.layers import LayerSpec, act_kind, declare_layer_params, finish

# transformers' Gemma4VisionConfig / Gemma4Config defaults for absent fields
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=12,
    head_dim=64, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, pooling_kernel_size=3, patch_size=16,
    position_embedding_size=10 * 1024, use_clipped_linears=False, standardize=False, attention_bias=False)
TOKENS = dict(image_token_id=258_880, boi_token_id=255_999, eoi_token_id=258_882, video_token_id=258_884)
# the placeholders Gemma4Model embeds as the pad token (Gemma4ForCausalLM does not)
PLACEHOLDERS = dict(image_token_id=258_880, video_token_id=258_884, audio_token_id=258_881)
_PROJS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    prog = Program(name=name)
    text_only = raw.get("model_type") == "gemma4_text"
    g = gemma4_text(raw, nested=not text_only)
    placeholders = [] if text_only else [int(raw.get(k) if raw.get(k) is not None else v) for k, v in PLACEHOLDERS.items()]
    gemma4_decoder(prog, w, g, placeholders)
    inputs: dict[str, Any] = {"position_streams": 1, "image_token_id": None, "tokens_per_image": 1}
    vc = None if text_only else raw.get("vision_config")
    if vc:
        inputs.update(vision_encoder(prog, w, g, vc))
        inputs.update({k: int(raw.get(k) if raw.get(k) is not None else v) for k, v in TOKENS.items()})
        inputs["pad_token_id"] = g.pad_token_id
    prog.meta["inputs"] = inputs
    if g.moe:  # what decode reads of the experts (``vlmc bench``'s roofline)
        prog.meta["moe"] = g.moe.meta()
    return finish(prog, w, g.tc)


def vision_encoder(prog: Program, w: Weights, g: Gemma4Text, raw_vc: dict[str, Any]) -> dict[str, Any]:
    """Declares the tower and adds ``vision_encode``; returns the settings its inputs need."""
    vc = {**VISION_DEFAULTS, **{k: v for k, v in raw_vc.items() if v is not None}}
    rope = vc.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", "axial"):
        raise UnsupportedModelError(f"Gemma 4 vision rope type {rope.get('rope_type')!r} is not supported (axial)")
    theta = float(rope.get("rope_theta", 100.0))
    e, heads, kv, hd = (int(vc[k]) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    n_layers, ff, patch, kernel = (int(vc[k]) for k in ("num_hidden_layers", "intermediate_size", "patch_size",
                                                        "pooling_kernel_size"))
    table, eps, clipped = int(vc["position_embedding_size"]), float(vc["rms_norm_eps"]), bool(vc["use_clipped_linears"])
    if vc["attention_bias"]:
        raise UnsupportedModelError("Gemma 4 vision attention biases are not supported")
    if hd % 4:
        raise UnsupportedModelError(f"Gemma 4 vision head dim {hd} is not a multiple of 4 (2D rope)")
    vis = dict(part="vision")
    w.add("vision.patch_embedder.input_proj.weight", (e, 3 * patch * patch), role="patch_embed", **vis)
    w.add("vision.patch_embedder.position_embedding_table", (2 * table, e), role="pos_embed", **vis,
          source_shape=(2, table, e), transforms=[("reshape", {"shape": [2 * table, e]})])
    w.add("projector.embed_vision.embedding_projection.weight", (g.tc.hidden_size, e), role="proj", part="projector")
    if vc["standardize"]:
        w.add("vision.std_bias", (e,), role="norm", **vis, transforms=[("scale", {"value": -1.0})])
        w.add("vision.std_scale", (e,), role="norm", **vis)
    block = _vision_layer(w, n_layers, e, heads, kv, hd, ff, eps, act_kind(vc["hidden_activation"]), clipped)
    prog.blocks[block.name] = block

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "packed patches of all images [S, 3 p p] (pixels in [-1, 1]) -> encoder -> k x k cell means x sqrt(E) "
        "-> unweighted RMSNorm -> projection: one row per soft token, widened as embed's rows"))
    px = fb.input("pixels", ("S", 3 * patch * patch), "float32")
    pos_index = fb.input("position_index", ("S", 2), "int32")
    rope_pos = fb.input("rope_positions", ("S", 2), "int32")
    mask = fb.input("mask", (1, 1, "S", "S"), "bool")
    pool = fb.input("pool_index", ("T", kernel * kernel), "int32")
    pad_ids = fb.input("pad_ids", ("T",), "int32")
    x = fb.op("linear", px, fb.param("vision.patch_embedder.input_proj.weight"), name="x")
    pe = fb.op("take", fb.param("vision.patch_embedder.position_embedding_table"), pos_index, axis=0, name="pos")
    x = fb.op("add", x, fb.op("sum_axis", pe, axis=1, name="pos"), name="x")
    tables = []
    for axis, tag in ((0, "x"), (1, "y")):  # column, then row
        p = fb.op("reshape", fb.op("slice_axis", rope_pos, axis=1, start=axis, stop=axis + 1, name=f"pos_{tag}"),
                  shape=[1, -1], name=f"pos_{tag}")
        tables += fb.op("rope_freqs", p, n_out=2, name=f"rope_{tag}", kind="default", dim=hd // 2, theta=theta)
    x = fb.op("call_block", x, *tables, mask, block=block.name, start=0, stop=n_layers, name="x")
    x = fb.op("sum_axis", fb.op("take", x, pool, axis=0, name="cells"), axis=1, name="pooled")
    x = fb.op("scale", fb.op("scale", x, value=1.0 / kernel ** 2, name="pooled"), value=float(e ** 0.5), name="pooled")
    if vc["standardize"]:
        x = fb.op("mul", fb.op("add", x, fb.param("vision.std_bias"), name="pooled"), fb.param("vision.std_scale"),
                  name="pooled")
    x = fb.op("rms_norm", x, None, eps=eps, name="soft")
    x = fb.op("linear", x, fb.param("projector.embed_vision.embedding_projection.weight"), name="features")
    prog.functions["vision_encode"] = fb.output(pad_rows(fb, g, x, pad_ids))
    return {"patch_size": patch, "pooling_kernel_size": kernel, "position_embedding_size": table}


def _vision_layer(w: Weights, n_layers: int, e: int, heads: int, kv: int, hd: int, ff: int, eps: float, act: str,
                  clipped: bool):
    spec: LayerSpec = {f"{n}.weight": ((e,), "norm") for n in (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}
    spec.update({"self_attn.q_norm.weight": ((hd,), "norm"), "self_attn.k_norm.weight": ((hd,), "norm")})
    shapes = {"q": (heads * hd, e), "k": (kv * hd, e), "v": (kv * hd, e), "o": (e, heads * hd),
              "gate": (ff, e), "up": (ff, e), "down": (e, ff)}
    for role, mod in _PROJS.items():
        spec[f"{mod}.linear.weight"] = (shapes[role], role)
        if clipped:
            spec.update({f"{mod}.{b}": ((), "clip") for b in _BOUNDS})
    ptypes, roles = declare_layer_params(w, "vision.encoder.layers.{i}.", n_layers, spec, part="vision")
    fb = FunctionBuilder("vision_layer", ptypes, doc="Gemma 4 vision encoder layer (2D rope, clipped linears)")
    x = fb.input("x", ("S", e), "float32")
    cx, sx, cy, sy = (fb.input(n, (1, 1, "S", hd // 2), "float32") for n in ("cos_x", "sin_x", "cos_y", "sin_y"))
    mask = fb.input("mask", (1, 1, "S", "S"), "bool")

    def proj(v: str, role: str) -> str:
        mod = _PROJS[role]
        bound = (lambda b: fb.param(f"{mod}.{b}")) if clipped else None
        if bound:
            v = fb.op("clip", v, bound("input_min"), bound("input_max"), name=role)
        v = fb.op("linear", v, fb.param(f"{mod}.linear.weight"), name=role)
        return fb.op("clip", v, bound("output_min"), bound("output_max"), name=role) if bound else v

    def norm(v: str, weight: str | None) -> str:
        return fb.op("rms_norm", v, None if weight is None else fb.param(weight), eps=eps, name="norm")

    def heads_of(v: str, count: int, hint: str, weight: str | None, rotate: bool) -> str:
        v = norm(fb.op("reshape", v, shape=[1, -1, count, hd], name=hint), weight)
        v = fb.op("transpose", v, axes=[0, 2, 1, 3], name=hint)     # [1, H, S, hd]
        if not rotate:
            return v
        a, b = fb.op("split", v, sizes=[hd // 2, hd // 2], axis=-1, n_out=2, name=hint)
        return fb.op("concat", fb.op("rope", a, cx, sx, name=hint), fb.op("rope", b, cy, sy, name=hint), axis=-1,
                     name=hint)

    n = norm(x, "input_layernorm.weight")
    q = heads_of(proj(n, "q"), heads, "q", "self_attn.q_norm.weight", True)
    k = heads_of(proj(n, "k"), kv, "k", "self_attn.k_norm.weight", True)
    v = heads_of(proj(n, "v"), kv, "v", None, False)
    a = fb.op("attention", q, k, v, mask, scale=1.0, name="attn")
    a = fb.op("reshape", fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn"), shape=[-1, heads * hd], name="attn")
    x = fb.op("add", x, norm(proj(a, "o"), "post_attention_layernorm.weight"), name="x")
    n = norm(x, "pre_feedforward_layernorm.weight")
    m = fb.op("glu", proj(n, "gate"), proj(n, "up"), kind=act, name="mlp")
    x = fb.op("add", x, norm(proj(m, "down"), "post_feedforward_layernorm.weight"), name="x")
    return make_block("vision_layer", fb.output(x), "vision.encoder.layers.{i}.", ptypes,
                      [{"index": i} for i in range(n_layers)], roles)
