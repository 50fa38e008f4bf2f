"""speculators EAGLE-3 checkpoints -> IR.

config.json: ``speculators_model_type: "eagle3"``, ``transformer_layer_config`` (a Llama
config of the drafter's one decoder layer), ``draft_vocab_size``, ``target_hidden_size``
(None: the drafter's width), ``norm_before_residual``, optionally
``eagle_aux_hidden_state_layer_ids`` (the target layers whose entering hidden states it
reads, vLLM's indices; None: early, middle and late ones, chosen at load; ``fc`` takes them
in increasing layer order) and ``speculators_config.
verifier`` (the target it was trained for). Weights: ``fc`` (3 target hidden states ->
one), ``layers.0.*`` (``hidden_norm`` beside the usual norms; q/k/v read 2 * hidden),
``norm``, ``lm_head`` over the draft vocabulary, ``d2t`` (draft id -> target id offset),
``t2d`` (which target ids the draft vocabulary has), ``embed_tokens`` when the drafter has
its own (else it embeds with the target's).

Entry points: ``fuse`` (the target's captured states [B, L, 3 * Ht] -> [B, L, H]), ``embed``
(when the drafter has embeddings), ``target_ids`` (draft ids -> d2t offsets) and ``draft``:
(token embeddings, hidden states) at their positions, over the drafter's own one-layer KV
cache -> (logits over the draft vocabulary, the layer's output: the next step's hidden
state). ``meta["drafter"]`` tells
the runtime what it needs (``runtime.eagle3``).
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder, make_block
from ...ir.core import COMPUTE, Program
from ..common.layers import LayerSpec, act_kind, declare_layer_params, finish, linear
from ..common.text_config import text_config

PREFIX = "draft.layer.{i}."


def _config(raw: dict[str, Any]):
    layer_cfg = raw.get("transformer_layer_config")
    if not isinstance(layer_cfg, dict):
        raise UnsupportedModelError("an EAGLE-3 config needs its transformer_layer_config")
    mt = layer_cfg.get("model_type", "llama")
    if mt != "llama":
        raise UnsupportedModelError(f"EAGLE-3 drafters with a {mt!r} layer are not supported (only llama)")
    tc = text_config(layer_cfg, nested=False, text_type="llama")
    if tc.num_layers != 1:
        raise UnsupportedModelError(f"EAGLE-3 drafters with {tc.num_layers} decoder layers are not supported "
                                    f"(only one)")
    return tc


# speculators options that change the drafter's arithmetic and are not built here: refused,
# since a drafter that ignored one would compile but not compute what it was trained to
_UNSUPPORTED = {"norm_before_fc": "a norm over the concatenated target states before fc",
                "fc_norm": "a norm on each target state before fc",
                "norm_output": "the final norm applied to the state the next draft step reads"}


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    tc = _config(raw)
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise UnsupportedModelError(f"EAGLE-3 drafters with {key} ({what}) are not supported")
    h, hd = tc.hidden_size, tc.head_dim
    ht = int(raw.get("target_hidden_size") or h)
    vd = int(raw.get("draft_vocab_size") or 0)
    if vd <= 0:
        raise UnsupportedModelError("an EAGLE-3 config needs a positive draft_vocab_size")
    for key in ("draft.d2t", "draft.fc.weight", "draft.lm_head.weight"):
        if not w.has(key):
            raise UnsupportedModelError(f"the EAGLE-3 checkpoint lacks {key.split('.', 1)[1]!r}")
    fc_in = int(w.ref("draft.fc.weight").shape[-1])
    if fc_in % ht:
        raise UnsupportedModelError(f"fc takes {fc_in} inputs, not a whole number of target hidden states "
                                    f"({ht} each)")
    n_aux = fc_in // ht
    aux_ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if aux_ids is not None and len(aux_ids) != n_aux:
        raise UnsupportedModelError(f"eagle_aux_hidden_state_layer_ids names {len(aux_ids)} layers; fc takes {n_aux}")
    prog = Program(name=name)
    w.add("draft.fc.weight", (h, fc_in), role="proj", part="text")
    w.add("draft.norm.weight", (h,), role="norm", part="text")
    w.add("draft.lm_head.weight", (vd, h), role="head", part="text")
    w.add("draft.d2t", (vd, 1), role="proj", part="text", source_shape=(vd,),
          transforms=[("reshape", {"shape": [vd, 1]})]).dtype = "int32"
    if w.has("draft.t2d"):
        t2d = w.ref("draft.t2d")
        if len(t2d.shape) != 1:
            raise UnsupportedModelError(f"t2d must be one flag per target token, has shape {list(t2d.shape)}")
    own_embed = w.has("draft.embed_tokens.weight")
    if own_embed:
        w.add("draft.embed_tokens.weight", (tc.vocab_size, h), role="embed", part="text")
    block = _layer(w, tc, bool(raw.get("norm_before_residual", False)))
    prog.blocks[block.name] = block
    types = w.types()

    fb = FunctionBuilder("fuse", types, doc="the target's captured hidden states -> the drafter's width")
    aux = fb.input("aux", ("B", "L", fc_in), COMPUTE)
    prog.functions["fuse"] = fb.output(linear(fb, aux, "draft.fc", bias=False))
    if own_embed:
        fb = FunctionBuilder("embed", types, doc="token ids -> the drafter's embeddings")
        ids = fb.input("ids", ("B", "L"), "int32")
        prog.functions["embed"] = fb.output(fb.op("embedding", ids, fb.param("draft.embed_tokens.weight"),
                                                  name="embeds"))
    fb = FunctionBuilder("target_ids", types, doc="draft token ids -> their offsets to the target's ids (d2t)")
    ids = fb.input("ids", ("B", "L"), "int32")
    prog.functions["target_ids"] = fb.output(fb.op("embedding", ids, fb.param("draft.d2t"), name="offsets"))
    fb = FunctionBuilder("draft", types, doc=(
        "(token embeddings, hidden states) at their positions, over the drafter's cache -> (draft-vocabulary "
        "logits, the next step's hidden states)"))
    emb = fb.input("embeds", ("B", "L", h), COMPUTE)
    x = fb.input("hidden", ("B", "L", h), COMPUTE)
    pos = fb.input("positions", ("B", "L"), "int32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    caches = fb.input("caches", (), "kvcache")
    cos, sin = fb.op("rope_freqs", pos, n_out=2, name="rope", kind=tc.rope_kind, dim=hd, theta=tc.rope_theta,
                     **tc.rope_attrs)
    x = fb.op("call_block", x, emb, cos, sin, mask, caches, block=block.name, start=0, stop=1, name="hidden")
    n = fb.op("rms_norm", x, fb.param("draft.norm.weight"), eps=tc.rms_norm_eps, name="normed")
    logits = fb.op("linear", n, fb.param("draft.lm_head.weight"), name="logits")
    prog.functions["draft"] = fb.output(logits, x)
    verifier = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    prog.meta["inputs"] = {"position_streams": 1, "image_token_id": None, "tokens_per_image": 1}
    prog.meta["drafter"] = {
        "kind": "eagle3", "hidden_size": h, "target_hidden_size": ht, "aux_states": n_aux,
        "layers": None if aux_ids is None else [int(i) for i in aux_ids], "draft_vocab_size": vd,
        "target_vocab_size": tc.vocab_size, "own_embeddings": own_embed, "verifier": verifier}
    return finish(prog, w, tc)


def _layer(w: Weights, tc, norm_before_residual: bool):
    """The drafter's decoder layer on the hidden state x [B, L, H], with the token embeddings
    as a further input: q/k/v read [norm(embeddings) | hidden_norm(x)], the attention output
    is added to x (or to hidden_norm(x) with ``norm_before_residual``), then a gated MLP."""
    h, hd, nh, nkv, ff = tc.hidden_size, tc.head_dim, tc.num_heads, tc.num_kv_heads, tc.intermediate_size
    spec: LayerSpec = {
        "input_layernorm.weight": ((h,), "norm"), "hidden_norm.weight": ((h,), "norm"),
        "post_attention_layernorm.weight": ((h,), "norm"),
        "self_attn.q_proj.weight": ((nh * hd, 2 * h), "q"), "self_attn.k_proj.weight": ((nkv * hd, 2 * h), "k"),
        "self_attn.v_proj.weight": ((nkv * hd, 2 * h), "v"), "self_attn.o_proj.weight": ((h, nh * hd), "o"),
        "mlp.gate_proj.weight": ((ff, h), "gate"), "mlp.up_proj.weight": ((ff, h), "up"),
        "mlp.down_proj.weight": ((h, ff), "down")}
    if tc.qkv_bias:
        spec.update({f"self_attn.{p}_proj.bias": ((n * hd,), p) for p, n in (("q", nh), ("k", nkv), ("v", nkv))})
    if tc.o_bias:
        spec["self_attn.o_proj.bias"] = ((h,), "o")
    if tc.mlp_bias:
        spec.update({"mlp.gate_proj.bias": ((ff,), "gate"), "mlp.up_proj.bias": ((ff,), "up"),
                     "mlp.down_proj.bias": ((h,), "down")})
    ptypes, roles = declare_layer_params(w, PREFIX, 1, spec, part="text")
    fb = FunctionBuilder("eagle3_layer", ptypes,
                         doc="EAGLE-3 decoder layer: [embeddings | hidden] attention + gated MLP")
    x = fb.input("x", ("B", "L", h), COMPUTE)
    emb = fb.input("embeds", ("B", "L", h), COMPUTE)
    cos = fb.input("cos", ("B", 1, "L", hd), "float32")
    sin = fb.input("sin", ("B", 1, "L", hd), "float32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    cache = fb.input("cache", (), "kvcache")

    def norm(v: str, weight: str) -> str:
        return fb.op("rms_norm", v, fb.param(weight), eps=tc.rms_norm_eps, name="norm")

    hidden = norm(x, "hidden_norm.weight")
    n = fb.op("concat", norm(emb, "input_layernorm.weight"), hidden, axis=-1, name="attn_in")
    heads = {}
    for proj, count in (("q", nh), ("k", nkv), ("v", nkv)):
        y = linear(fb, n, f"self_attn.{proj}_proj", bias=tc.qkv_bias)
        y = fb.op("reshape", y, shape=[0, 0, count, hd], name=proj)
        heads[proj] = fb.op("transpose", y, axes=[0, 2, 1, 3], name=proj)
    q = fb.op("rope", heads["q"], cos, sin, name="q")
    k = fb.op("rope", heads["k"], cos, sin, name="k")
    a = fb.op("cached_attention", q, k, heads["v"], cache, mask, scale=hd ** -0.5, name="attn")
    a = fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn")
    a = fb.op("reshape", a, shape=[0, 0, nh * hd], name="attn")
    a = linear(fb, a, "self_attn.o_proj", bias=tc.o_bias)
    x = fb.op("add", hidden if norm_before_residual else x, a, name="x")
    n = norm(x, "post_attention_layernorm.weight")
    g = linear(fb, n, "mlp.gate_proj", bias=tc.mlp_bias)
    u = linear(fb, n, "mlp.up_proj", bias=tc.mlp_bias)
    m = linear(fb, fb.op("glu", g, u, kind=act_kind(tc.hidden_act), name="mlp"), "mlp.down_proj", bias=tc.mlp_bias)
    x = fb.op("add", x, m, name="x")
    return make_block("eagle3_layer", fb.output(x), PREFIX, ptypes, [{"index": 0, "kv": {"layout": "dense"}}], roles)
