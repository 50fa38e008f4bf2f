"""The Gemma 4 decoder (``gemma4_text``) on the shared IR blocks.

What a Gemma 4 decoder layer computes (transformers' Gemma4TextDecoderLayer), beyond a
Gemma 3 layer (sandwich norms, QK-norm, GELU-tanh MLP, embeddings times sqrt(hidden)):

- RMSNorm weights apply as ``w`` (not ``1 + w``); values are RMS-normalised too, with no
  weight (``v_norm``); the attention scale is 1 (the norms set the scores' size);
- two layer kinds with their own shapes: sliding-window layers (``head_dim``, rotary base
  ``rope_parameters.sliding_attention``) and global ones (``global_head_dim``, a
  "proportional" rope: only the first ``partial_rotary_factor`` of the frequencies turn);
  with ``attention_k_eq_v`` the global layers have ``num_global_key_value_heads`` and use
  the key projection as values too. Each kind is its own IR block;
- KV sharing: the last ``num_kv_shared_layers`` layers compute no keys or values; each
  attends over the cache of the last earlier layer of its kind (``shared_attention``, the
  cache picked with ``select_caches``), and their MLPs are twice as wide with
  ``use_double_wide_mlp``;
- per-layer inputs (PLE): a second token embedding ``embed_tokens_per_layer`` [vocab,
  layers x P] (times sqrt(P)) and a projection of the input embeddings
  (``per_layer_model_projection``, times hidden^-0.5, RMS-normed per layer) are averaged
  (times 2^-0.5); after its MLP each layer adds
  ``post_per_layer_input_norm(per_layer_projection(gelu(per_layer_input_gate(h)) * ple_i))``;
- with ``enable_moe_block`` (the 26B-A4B) every layer also runs routed experts beside its
  dense MLP: a router on the residual (an unweighted RMSNorm, times ``router.scale`` and
  hidden^-0.5, a linear to the experts, softmax, the top ``top_k_experts`` renormalised,
  then times each chosen expert's ``per_expert_scale``) picks experts that run on
  ``pre_feedforward_layernorm_2`` of the residual; the dense MLP's output is normed by
  ``post_feedforward_layernorm_1``, the experts' by ``post_feedforward_layernorm_2``, and
  their sum by ``post_feedforward_layernorm``;
- every layer's output is multiplied by its ``layer_scalar``;
- the logits are soft-capped (``final_logit_softcapping``).

``embed`` returns each token's row as [embedding | its per-layer token embeddings]
(hidden + layers x P wide); the vision tower returns image rows in the same layout (the
pad token's per-layer embeddings, as transformers looks them up for image positions), so
the default merge places whole rows and ``prefill`` splits them again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder, make_block
from ...ir.core import COMPUTE, Block, Program
from .layers import LayerSpec, act_kind, declare_layer_params, hybrid_stack, linear
from .moe import SparseMoe
from .text_config import TextConfig

SLIDING, FULL = "sliding_attention", "full_attention"
KINDS = {SLIDING: "local", FULL: "global"}
# the target caches an assistant's ``draft`` takes, in order (the target's last
# cache-owning layer of each kind: ``meta["kv_producers"]``)
ASSISTANT_CACHES = (SLIDING, FULL)
# transformers' Gemma4TextConfig defaults for absent fields
DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, global_head_dim=512, num_global_key_value_heads=None,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0,
    attention_bias=False, sliding_window=512, final_logit_softcapping=None, use_bidirectional_attention=None,
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, attention_k_eq_v=False,
    num_kv_shared_layers=0, enable_moe_block=False, use_double_wide_mlp=False, num_experts=None, top_k_experts=None,
    moe_intermediate_size=None)
_ROPE_DEFAULTS = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                  FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


@dataclass
class LayerKind:
    """One of the decoder's IR blocks: layers of one kind (sliding or global), owning a KV
    cache or reading another layer's."""

    kind: str                   # SLIDING or FULL
    shared: bool                # reads the cache of ``sources`` instead of writing its own
    layers: list[int]           # decoder layers
    sources: list[int]          # the cache each layer attends over (its own, or the producer's)
    head_dim: int
    kv_heads: int
    k_eq_v: bool
    intermediate: int


@dataclass
class Gemma4Text:
    tc: TextConfig
    types: list[str]
    window: int
    kinds: list[LayerKind]
    rope: dict[str, dict[str, Any]]   # "local"/"global" -> rope_freqs attributes
    ple_dim: int                      # hidden_size_per_layer_input (0: no per-layer inputs)
    ple_vocab: int
    pad_token_id: int
    final_softcap: float | None
    moe: SparseMoe | None = None      # the routed experts beside every layer's MLP


def _rope(cfg: dict[str, Any], kind: str, head_dim: int) -> dict[str, Any]:
    p = {**_ROPE_DEFAULTS[kind], **((cfg.get("rope_parameters") or {}).get(kind) or {})}
    rope_type = p.get("rope_type", "default")
    attrs: dict[str, Any] = {"kind": "default", "dim": head_dim, "theta": float(p["rope_theta"])}
    if float(p.get("factor", 1.0)) != 1.0:
        attrs["factor"] = float(p["factor"])
    if rope_type == "proportional":
        attrs["rotated"] = int(float(p.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    elif rope_type != "default":
        raise UnsupportedModelError(f"Gemma 4 {kind} rope type {rope_type!r} is not supported (default, proportional)")
    return attrs


def gemma4_text(raw: dict[str, Any], *, nested: bool, assistant: bool = False) -> Gemma4Text:
    """The decoder settings of a ``gemma4`` (``nested``: in raw["text_config"]) or
    ``gemma4_text`` config. ``assistant``: a Gemma 4 assistant's decoder, every layer of
    which reads a cache of its target: layer kind k reads the k-th of the caches it is
    given (``ASSISTANT_CACHES``)."""
    cfg = {**DEFAULTS, **{k: v for k, v in (dict(raw.get("text_config") or {}) if nested else dict(raw)).items()
                          if v is not None or k in ("final_logit_softcapping", "use_bidirectional_attention",
                                                    "num_global_key_value_heads")}}
    moe = None
    if cfg.get("enable_moe_block"):
        sizes = {k: cfg.get(k) for k in ("num_experts", "top_k_experts", "moe_intermediate_size")}
        if any(v is None for v in sizes.values()):
            raise UnsupportedModelError(f"Gemma 4 enable_moe_block needs num_experts, top_k_experts and "
                                        f"moe_intermediate_size; the config has {sizes}")
        moe = SparseMoe.from_config({"num_experts": sizes["num_experts"], "num_experts_per_tok": sizes["top_k_experts"],
                                     "moe_intermediate_size": sizes["moe_intermediate_size"],
                                     "shared_expert_intermediate_size": 0})
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"Gemma 4 use_bidirectional_attention={cfg['use_bidirectional_attention']!r} is "
                                    "not supported yet; supported: causal decoders (null)")
    n = int(cfg["num_hidden_layers"])
    types = list(cfg.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise UnsupportedModelError(f"Gemma 4 layer_types {types} do not give {n} sliding/full layers")
    types[-1] = FULL  # transformers forces the last layer global
    shared_n = n if assistant else int(cfg["num_kv_shared_layers"] or 0)
    first_shared = n - shared_n
    if assistant:
        producer = {t: ASSISTANT_CACHES.index(t) for t in set(types)}
    elif first_shared < 1 or set(types[first_shared:]) - set(types[:first_shared]):
        raise UnsupportedModelError(f"num_kv_shared_layers={shared_n}: every shared layer needs an earlier layer "
                                    "of its kind that owns a KV cache")
    else:
        producer = {t: max(i for i in range(first_shared) if types[i] == t) for t in set(types)}
    heads, kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    hd, ghd = int(cfg["head_dim"]), int(cfg.get("global_head_dim") or cfg["head_dim"])
    k_eq_v = bool(cfg.get("attention_k_eq_v"))
    gkv = int(cfg["num_global_key_value_heads"]) if k_eq_v and cfg.get("num_global_key_value_heads") else kv
    overrides = {int(i): o for i, o in (cfg.get("per_layer_config") or {}).items() if str(i).isdigit()}
    if overrides:  # transformers 5.24's layout: the global layers' head size (and KV heads) per layer
        full = [overrides.get(i, {}) for i, t in enumerate(types) if t == FULL]
        ghds = {int(o.get("head_dim", hd)) for o in full}
        gkvs = {int(o.get("num_key_value_heads", kv)) for o in full}
        if len(ghds) > 1 or len(gkvs) > 1 or any(overrides.get(i) for i, t in enumerate(types) if t == SLIDING):
            raise UnsupportedModelError(f"Gemma 4 per_layer_config {cfg['per_layer_config']} varies within a "
                                        "layer kind; supported: one shape per kind")
        ghd, gkv = (ghds.pop(), gkvs.pop()) if full else (ghd, gkv)
    ff = int(cfg["intermediate_size"])
    kinds: list[LayerKind] = []
    for shared in (False, True):
        for t in (SLIDING, FULL):
            layers = [i for i in range(n) if types[i] == t and (i >= first_shared) == shared]
            if not layers:
                continue
            full = t == FULL
            kinds.append(LayerKind(kind=t, shared=shared, layers=layers,
                                   sources=[producer[t]] * len(layers) if shared else list(layers),
                                   head_dim=ghd if full else hd, kv_heads=gkv if full else kv,
                                   k_eq_v=k_eq_v and full,
                                   intermediate=ff * (2 if shared and cfg.get("use_double_wide_mlp") else 1)))
    tie = raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    tc = TextConfig(
        model_type="gemma4_text", hidden_size=int(cfg["hidden_size"]), num_layers=n, num_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=ff, vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg["rms_norm_eps"]), rope_theta=_rope(cfg, SLIDING, hd)["theta"], rope_kind="default",
        mrope_sections=None, hidden_act=str(cfg["hidden_activation"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]), tie_word_embeddings=True if tie is None else bool(tie),
        qkv_bias=bool(cfg["attention_bias"]), o_bias=bool(cfg["attention_bias"]), mlp_bias=False)
    softcap = cfg.get("final_logit_softcapping")
    return Gemma4Text(tc=tc, types=types, window=int(cfg["sliding_window"]), kinds=kinds,
                      rope={KINDS[t]: _rope(cfg, t, ghd if t == FULL else hd) for t in dict.fromkeys(types)},
                      ple_dim=int(cfg.get("hidden_size_per_layer_input") or 0),
                      ple_vocab=int(cfg.get("vocab_size_per_layer_input") or 0),
                      pad_token_id=int(cfg.get("pad_token_id") or 0),
                      final_softcap=None if softcap is None else float(softcap), moe=moe)


def _rope_inputs(fb: FunctionBuilder, g: Gemma4Text) -> dict[str, tuple[str, str]]:
    """Every rotary table's (cos, sin) block inputs: each block takes them all."""
    out = {}
    for name, attrs in g.rope.items():
        out[name] = (fb.input(f"cos_{name}", ("B", 1, "L", attrs["dim"]), "float32"),
                     fb.input(f"sin_{name}", ("B", 1, "L", attrs["dim"]), "float32"))
    return out


def gemma4_layer(w: Weights, g: Gemma4Text, lk: LayerKind, name: str) -> Block:
    """The block of one layer kind (see the module docstring); its params are
    ``text.<name>.<i>.*`` read from the checkpoint's ``text.layers.<layer>.*``."""
    tc = g.tc
    h, nh, hd, nkv, ff, eps = tc.hidden_size, tc.num_heads, lk.head_dim, lk.kv_heads, lk.intermediate, tc.rms_norm_eps
    bias = tc.qkv_bias
    spec: LayerSpec = {
        "input_layernorm.weight": ((h,), "norm"), "post_attention_layernorm.weight": ((h,), "norm"),
        "pre_feedforward_layernorm.weight": ((h,), "norm"), "post_feedforward_layernorm.weight": ((h,), "norm"),
        "self_attn.q_proj.weight": ((nh * hd, h), "q"), "self_attn.q_norm.weight": ((hd,), "norm"),
        "self_attn.o_proj.weight": ((h, nh * hd), "o"),
        "mlp.gate_proj.weight": ((ff, h), "gate"), "mlp.up_proj.weight": ((ff, h), "up"),
        "mlp.down_proj.weight": ((h, ff), "down"), "layer_scalar": ((1,), "norm"),
    }
    if bias:
        spec.update({"self_attn.q_proj.bias": ((nh * hd,), "q"), "self_attn.o_proj.bias": ((h,), "o")})
    if not lk.shared:
        spec.update({"self_attn.k_proj.weight": ((nkv * hd, h), "k"), "self_attn.k_norm.weight": ((hd,), "norm")})
        if bias:
            spec["self_attn.k_proj.bias"] = ((nkv * hd,), "k")
        if not lk.k_eq_v:
            spec["self_attn.v_proj.weight"] = ((nkv * hd, h), "v")
            if bias:
                spec["self_attn.v_proj.bias"] = ((nkv * hd,), "v")
    if g.moe:
        e, i = g.moe.experts, g.moe.expert_dim
        spec.update({"router.proj.weight": ((e, h), "router"), "router.scale": ((h,), "norm"),
                     "router.per_expert_scale": ((e,), "norm"),
                     "experts.gate_up_proj": ((e, 2 * i, h), "experts_gate_up"),
                     "experts.down_proj": ((e, h, i), "experts_down"),
                     "pre_feedforward_layernorm_2.weight": ((h,), "norm"),
                     "post_feedforward_layernorm_1.weight": ((h,), "norm"),
                     "post_feedforward_layernorm_2.weight": ((h,), "norm")})
    if g.ple_dim:
        p = g.ple_dim
        spec.update({"per_layer_input_gate.weight": ((p, h), "gate"), "per_layer_projection.weight": ((h, p), "down"),
                     "post_per_layer_input_norm.weight": ((h,), "norm")})
    ptypes, roles = declare_layer_params(w, f"text.{name}.{{i}}.", len(lk.layers), spec, part="text",
                                         sources=lk.layers, source_fmt="text.layers.{i}.")
    fb = FunctionBuilder(name, ptypes, doc=f"Gemma 4 {'KV-shared ' if lk.shared else ''}"
                                           f"{'global' if lk.kind == FULL else 'sliding-window'} decoder layer")
    x = fb.input("x", ("B", "L", h), COMPUTE)
    ple = fb.input("ple", ("B", "L", tc.num_layers, g.ple_dim), COMPUTE) if g.ple_dim else None
    tables = _rope_inputs(fb, g)
    cos, sin = tables[KINDS[lk.kind]]
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    cache = fb.input("cache", (), "kvcache")

    def norm(v: str, weight: str | None, hint: str = "norm") -> str:
        return fb.op("rms_norm", v, None if weight is None else fb.param(weight), eps=eps, name=hint)

    def heads(v: str, count: int, hint: str) -> str:
        return fb.op("reshape", v, shape=[0, 0, count, hd], name=hint)

    n = norm(x, "input_layernorm.weight")
    q = norm(heads(linear(fb, n, "self_attn.q_proj", bias=bias), nh, "q"), "self_attn.q_norm.weight", "q")
    q = fb.op("rope", fb.op("transpose", q, axes=[0, 2, 1, 3], name="q"), cos, sin, name="q")
    if lk.shared:
        a = fb.op("shared_attention", q, cache, mask, scale=1.0, name="attn")
    else:
        k_raw = heads(linear(fb, n, "self_attn.k_proj", bias=bias), nkv, "k")
        v = k_raw if lk.k_eq_v else heads(linear(fb, n, "self_attn.v_proj", bias=bias), nkv, "v")
        k = norm(k_raw, "self_attn.k_norm.weight", "k")
        k = fb.op("rope", fb.op("transpose", k, axes=[0, 2, 1, 3], name="k"), cos, sin, name="k")
        v = fb.op("transpose", norm(v, None, "v"), axes=[0, 2, 1, 3], name="v")
        a = fb.op("cached_attention", q, k, v, cache, mask, scale=1.0, name="attn")
    a = fb.op("reshape", fb.op("transpose", a, axes=[0, 2, 1, 3], name="attn"), shape=[0, 0, nh * hd], name="attn")
    a = norm(linear(fb, a, "self_attn.o_proj", bias=bias), "post_attention_layernorm.weight")
    x = fb.op("add", x, a, name="x")
    n = norm(x, "pre_feedforward_layernorm.weight")
    act = act_kind(tc.hidden_act)
    m = fb.op("glu", linear(fb, n, "mlp.gate_proj", bias=False), linear(fb, n, "mlp.up_proj", bias=False),
              kind=act, name="mlp")
    m = linear(fb, m, "mlp.down_proj", bias=False)
    if g.moe:
        m = fb.op("add", norm(m, "post_feedforward_layernorm_1.weight"),
                  norm(_routed_experts(fb, x, g.moe, h, eps, act), "post_feedforward_layernorm_2.weight"), name="mlp")
    m = norm(m, "post_feedforward_layernorm.weight")
    x = fb.op("add", x, m, name="x")
    if ple is not None:
        gate = fb.op("act", linear(fb, x, "per_layer_input_gate", bias=False), kind=act, name="ple")
        gate = fb.op("mul", gate, fb.op("select_layer", ple, index="$layer", name="ple"), name="ple")
        y = norm(linear(fb, gate, "per_layer_projection", bias=False), "post_per_layer_input_norm.weight", "ple")
        x = fb.op("add", x, y, name="x")
    x = fb.op("mul", x, fb.param("layer_scalar"), name="x")
    rows: list[dict[str, Any]] = []
    for i, (layer, src) in enumerate(zip(lk.layers, lk.sources)):
        row: dict[str, Any] = {"index": i, "layer": layer}
        if lk.kind == SLIDING:
            row["window"] = g.window
        if lk.shared:
            row["reads"] = src
        else:
            row.update(kv_heads=nkv, head_dim=hd, kv={"layout": "dense"})
        rows.append(row)
    return make_block(name, fb.output(x), f"text.{name}.{{i}}.", ptypes, rows, roles)


def _routed_experts(fb: FunctionBuilder, x: str, moe: SparseMoe, h: int, eps: float, act: str) -> str:
    """The experts' output for the residual ``x`` (Gemma4TextRouter, Gemma4TextExperts)."""
    r = fb.op("rms_norm", x, None, eps=eps, name="router")
    r = fb.op("scale", fb.op("mul", r, fb.param("router.scale"), name="router"), value=float(h ** -0.5), name="router")
    weights, experts = fb.op("moe_route", linear(fb, r, "router.proj", bias=False), top_k=moe.top_k, normalize=True,
                             n_out=2, name="route")
    weights = fb.op("mul", weights, fb.op("take", fb.param("router.per_expert_scale"), experts, axis=0,
                                          name="route"), name="route")
    n = fb.op("rms_norm", x, fb.param("pre_feedforward_layernorm_2.weight"), eps=eps, name="experts")
    return fb.op("moe_experts", n, weights, experts, fb.param("experts.gate_up_proj"), fb.param("experts.down_proj"),
                 kind=act, name="experts")


def decoder_blocks(prog: Program, w: Weights, g: Gemma4Text) -> list[tuple[Block, list[int], list[int]]]:
    """One block per layer kind, added to ``prog``: (block, its layers, the cache each reads)."""
    names = {(SLIDING, False): "sliding_layer", (FULL, False): "global_layer",
             (SLIDING, True): "shared_sliding_layer", (FULL, True): "shared_global_layer"}
    stack = []
    for lk in g.kinds:
        blk = gemma4_layer(w, g, lk, names[(lk.kind, lk.shared)])
        prog.blocks[blk.name] = blk
        stack.append((blk, lk.layers, lk.sources))
    return stack


def gemma4_decoder(prog: Program, w: Weights, g: Gemma4Text, placeholders: Sequence[int] = ()) -> None:
    """The decoder's blocks and its entry points: embed (ids -> [embedding | per-layer
    token embeddings] rows), prefill (such rows), decode and verify (ids). ``placeholders``:
    token ids looked up as the pad token (Gemma4Model does so for its image, video and audio
    placeholders, also where the model generates one)."""
    tc = g.tc
    h, v, n = tc.hidden_size, tc.vocab_size, tc.num_layers
    stack = decoder_blocks(prog, w, g)
    w.add("text.embed_tokens.weight", (v, h), role="embed", part="text")
    w.add("text.norm.weight", (h,), role="norm", part="text")
    p, width = g.ple_dim, h + n * g.ple_dim
    if p:
        w.add("text.embed_tokens_per_layer.weight", (g.ple_vocab, n * p), role="embed", part="text")
        w.add("text.per_layer_model_projection.weight", (n * p, h), role="proj", part="text")
        w.add("text.per_layer_projection_norm.weight", (p,), role="norm", part="text")
    head = "text.embed_tokens.weight" if tc.tie_word_embeddings else "lm_head.weight"
    if not tc.tie_word_embeddings:
        w.add("lm_head.weight", (v, h), role="head", part="text")
    types = w.types()

    def rows(fb: FunctionBuilder, ids: str, name: str) -> str:
        if placeholders:
            ids = fb.op("remap_ids", ids, tokens=[int(t) for t in placeholders], to=g.pad_token_id, name="ids")
        x = fb.op("embedding", ids, fb.param("text.embed_tokens.weight"), name=name)
        x = fb.op("scale", x, value=float(h ** 0.5), name=name)
        if not p:
            return x
        t = fb.op("embedding", ids, fb.param("text.embed_tokens_per_layer.weight"), name="ple_tokens")
        return fb.op("concat", x, fb.op("scale", t, value=float(p ** 0.5), name="ple_tokens"), axis=-1, name=name)

    fb = FunctionBuilder("embed", types, doc="token ids -> [embedding | per-layer token embeddings] rows")
    prog.functions["embed"] = fb.output(rows(fb, fb.input("ids", ("B", "L"), "int32"), "embeds"))
    docs = {"prefill": "prompt rows (text + merged image features) -> logits at the last position",
            "decode": "one new token per sequence -> next-token logits",
            "verify": "several new tokens per sequence -> the logits after each of them"}
    for name, doc in docs.items():
        fb = FunctionBuilder(name, types, doc=doc)
        if name == "prefill":
            wide = fb.input("embeds", ("B", "L", width), COMPUTE)
        else:
            wide = rows(fb, fb.input("ids", ("B", 1 if name == "decode" else "L"), "int32"), "x")
        pos = fb.input("positions", ("B", "L"), "int32")
        mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
        caches = fb.input("caches", (), "kvcache")
        extra = []
        if p:
            x = fb.op("slice_axis", wide, axis=-1, start=0, stop=h, name="x")
            tok = fb.op("reshape", fb.op("slice_axis", wide, axis=-1, start=h, stop=width, name="ple_tokens"),
                        shape=[0, 0, n, p], name="ple_tokens")
            ctx = linear(fb, x, "text.per_layer_model_projection", bias=False)
            ctx = fb.op("reshape", fb.op("scale", ctx, value=float(h ** -0.5), name="ple"), shape=[0, 0, n, p],
                        name="ple")
            ctx = fb.op("rms_norm", ctx, fb.param("text.per_layer_projection_norm.weight"), eps=tc.rms_norm_eps,
                        name="ple")
            extra = [fb.op("scale", fb.op("add", ctx, tok, name="ple"), value=float(2 ** -0.5), name="ple")]
        else:
            x = wide
        rope = [t for table, attrs in g.rope.items()
                for t in fb.op("rope_freqs", pos, n_out=2, name=f"rope_{table}", **attrs)]
        x = hybrid_stack(fb, x, rope, mask, caches, stack, n, extra=extra)
        if name != "verify":
            x = fb.op("slice_axis", x, axis=1, start=-1, name="last")
        x = fb.op("rms_norm", x, fb.param("text.norm.weight"), eps=tc.rms_norm_eps, name="hidden")
        logits = fb.op("linear", x, fb.param(head), name="logits")
        if g.final_softcap is not None:
            logits = fb.op("softcap", logits, cap=g.final_softcap, name="logits")
        prog.functions[name] = fb.output(logits, x)  # the hidden rows too: an assistant drafts from them
    # the last cache-owning layer of each kind: the caches a Gemma 4 assistant reads
    own = [lk for lk in g.kinds if not lk.shared]
    prog.meta["kv_producers"] = {lk.kind: max(lk.layers) for lk in own}


def pad_rows(fb: FunctionBuilder, g: Gemma4Text, features: str, pad_ids: str) -> str:
    """Image feature rows [T, hidden] widened as ``embed``'s rows: the pad token's per-layer
    token embeddings after each (transformers looks image positions up as the pad id)."""
    if not g.ple_dim:
        return features
    t = fb.op("embedding", pad_ids, fb.param("text.embed_tokens_per_layer.weight"), name="ple_pad")
    t = fb.op("scale", t, value=float(g.ple_dim ** 0.5), name="ple_pad")
    return fb.op("concat", features, t, axis=-1, name="features")


__all__: Sequence[str] = ("Gemma4Text", "gemma4_text", "gemma4_decoder", "gemma4_layer", "decoder_blocks", "pad_rows")
