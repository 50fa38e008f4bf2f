"""The closed op set: each op's shape/dtype rule.

Every op here has a reference MLX implementation of the same name in
``vlmc.kernels.reference`` (checked by the verifier tests). Dims may be symbolic
strings; rules keep symbols when they cannot be resolved.
"""
from __future__ import annotations

from typing import Any, Callable

from .core import Dim, TensorType, promote

Rule = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
OPS: dict[str, Rule] = {}


class ShapeError(ValueError):
    pass


def rule(name: str):
    def deco(fn: Rule) -> Rule:
        OPS[name] = fn
        return fn
    return deco


def _bdim(a: Dim, b: Dim) -> Dim:
    if a == b or b == 1:
        return a
    if a == 1:
        return b
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    raise ShapeError(f"cannot broadcast {a} with {b}")


def broadcast(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = [1] * rank
    for s in shapes:
        padded = (1,) * (rank - len(s)) + tuple(s)
        out = [_bdim(a, b) for a, b in zip(out, padded)]
    return tuple(out)


def _same_dim(a: Dim, b: Dim, what: str) -> None:
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ShapeError(f"{what}: {a} != {b}")


@rule("linear")
def _linear(t, a):
    x, w = t[0], t[1]
    _same_dim(x.shape[-1], w.shape[-1], "linear in-features")
    if len(t) > 2 and t[2] is not None:
        _same_dim(t[2].shape[-1], w.shape[0], "linear bias")
    return [TensorType(x.shape[:-1] + (w.shape[0],), promote(x.dtype, w.dtype))]


@rule("qlinear")
def _qlinear(t, a):
    """linear with a quantized weight; the scheme travels with the weight (QuantWeight)."""
    return _linear(t, a)


@rule("qqlinear")
def _qqlinear(t, a):
    """qlinear whose input is rounded to the weight's block format first (mxfp8 / nvfp4)."""
    return _linear(t, a)


@rule("qembedding")
def _qembedding(t, a):
    return _embedding(t, a)


@rule("embedding")
def _embedding(t, a):
    ids, table = t
    return [TensorType(ids.shape + (table.shape[-1],), table.dtype)]


@rule("rms_norm")
def _rms_norm(t, a):
    """x / rms(x) over the last axis, times the weight (input 1); a None weight scales by
    nothing (Gemma 4's value norm and its vision embedder's pre-projection norm)."""
    if len(t) > 1 and t[1] is not None:
        _same_dim(t[0].shape[-1], t[1].shape[-1], "rms_norm weight")
    return [t[0]]


@rule("layer_norm")
def _layer_norm(t, a):
    _same_dim(t[0].shape[-1], t[1].shape[-1], "layer_norm weight")
    return [t[0]]


@rule("add")
def _add(t, a):
    return [TensorType(broadcast(t[0].shape, t[1].shape), promote(t[0].dtype, t[1].dtype))]


@rule("add_rms_norm")
def _add_rms_norm(t, a):
    """(a + b, rms_norm(a + b, w)): the residual add fused with the norm that reads it."""
    if t[2] is not None:
        _same_dim(t[0].shape[-1], t[2].shape[-1], "add_rms_norm weight")
    h = TensorType(broadcast(t[0].shape, t[1].shape), promote(t[0].dtype, t[1].dtype))
    return [h, h]


# The KV-cache types (``kv`` of a layer, ``ir.core.KV_LAYOUTS``) each fast path reads and
# writes: a layer whose planned cache is not listed here runs its ops (``lower`` attaches a
# block's fast path only when every layer's cache is listed). ``quantized`` lists its bits,
# ``turboquant`` the bits its keys and values may each have.
FAST_PATH_KV: dict[str, dict[str, tuple[int, ...] | None]] = {
    "decode_layer": {"dense": None, "rotating": None, "quantized": (4, 8), "turboquant": (2, 3, 4)},
    "deltanet_layer": {"recurrent": None},
}


def fast_path_reads(op: str, spec: dict) -> bool:
    """Whether fast path ``op`` handles a layer whose KV cache is ``spec``."""
    layouts = FAST_PATH_KV.get(op, {})
    if spec.get("layout") not in layouts:
        return False
    bits = layouts[spec["layout"]]
    if bits is None:
        return True
    if spec["layout"] == "turboquant":
        return spec.get("k_bits") in bits and spec.get("v_bits") in bits
    return spec.get("bits") in bits


@rule("decode_layer")
def _decode_layer(t, a):
    """A block's fast path (``Block.fast_path``): the layer output, x's type."""
    return [t[0]]


@rule("deltanet_layer")
def _deltanet_layer(t, a):
    """A Gated DeltaNet block's fast path: the layer output, x's type."""
    return [t[0]]


@rule("mul")
def _mul(t, a):
    return [TensorType(broadcast(t[0].shape, t[1].shape), promote(t[0].dtype, t[1].dtype))]


@rule("scale")
def _scale(t, a):
    """x times a constant ``value``, rounded to x's dtype first (Gemma's embedding scale,
    sqrt(hidden), which transformers multiplies in the embedding's dtype)."""
    return [t[0]]


@rule("softcap")
def _softcap(t, a):
    """cap * tanh(x / cap): soft-capped logits (Gemma 2, Gemma 3 text ``final_logit_softcapping``)."""
    if not float(a["cap"]) > 0:
        raise ShapeError(f"softcap cap must be positive, got {a['cap']!r}")
    return [t[0]]


@rule("avg_pool_tokens")
def _avg_pool_tokens(t, a):
    """[N, G*G, E] tokens of a G x G patch grid (row-major) -> [N, (G/K)^2, E]: the mean of
    each K x K window, windows row-major (Gemma 3's projector: AvgPool2d over the grid)."""
    x, grid, kernel = t[0], a["grid"], a["kernel"]
    if kernel < 1 or grid % kernel:
        raise ShapeError(f"avg_pool_tokens: kernel {kernel} does not tile a {grid}x{grid} grid")
    _same_dim(x.shape[1], grid * grid, "avg_pool_tokens tokens")
    return [TensorType((x.shape[0], (grid // kernel) ** 2, x.shape[2]), x.dtype)]


@rule("sum_axis")
def _sum_axis(t, a):
    """x summed over ``axis``, which is dropped: e.g. the weighted taps of an interpolated
    position embedding (Qwen3-VL's bilinear resampling of its learned position grid)."""
    x = t[0]
    shape = list(x.shape)
    del shape[a["axis"]]
    return [TensorType(tuple(shape), x.dtype)]


@rule("pad_axis")
def _pad_axis(t, a):
    """x with ``before`` and ``after`` zeros along ``axis`` (Qwen3-VL's token embeddings,
    widened with room for the DeepStack features merged in at image tokens)."""
    x = t[0]
    axis, before, after = a["axis"], int(a.get("before", 0)), int(a["after"])
    if before < 0 or after < 0:
        raise ShapeError(f"pad_axis: negative padding {before}, {after}")
    shape = list(x.shape)
    n = shape[axis]
    shape[axis] = n + before + after if isinstance(n, int) else f"{n}+{before + after}"
    return [TensorType(tuple(shape), x.dtype)]


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "sigmoid")


@rule("act")
def _act(t, a):
    if a["kind"] not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {a['kind']!r}")
    return [t[0]]


@rule("glu")
def _glu(t, a):
    if a["kind"] not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {a['kind']!r}")
    return [TensorType(broadcast(t[0].shape, t[1].shape), promote(t[0].dtype, t[1].dtype))]


def _infer_dim(src: tuple[Dim, ...], known: list[Dim]) -> Dim:
    """The -1 of a reshape: exact when all dims are ints, else a symbol scaled by the
    ratio of the known int dims (e.g. [S, 32] -> [-1, 4, 32] gives S/4)."""
    sym_src = [d for d in src if isinstance(d, str)]
    sym_out = [d for d in known if isinstance(d, str)]
    num = 1
    for d in src:
        num *= d if isinstance(d, int) else 1
    den = 1
    for d in known:
        den *= d if isinstance(d, int) else 1
    if not sym_src and not sym_out:
        if num % den:
            raise ShapeError(f"reshape: {num} elements do not split into {den}s")
        return num // den
    rest = [d for d in sym_src if d not in sym_out or sym_out.remove(d)]
    if len(rest) != 1:
        return "?"
    if num == den:
        return rest[0]
    return f"{rest[0]}*{num // den}" if num % den == 0 else f"{rest[0]}/{den // num}"


@rule("reshape")
def _reshape(t, a):
    """shape entries: n > 0 literal, 0 = keep the input's dim at that index, -1 = infer."""
    src = t[0].shape
    out: list[Dim] = []
    for i, d in enumerate(a["shape"]):
        out.append(src[i] if d == 0 else d)
    if out.count(-1) > 1:
        raise ShapeError("reshape: at most one -1")
    if -1 in out:
        out[out.index(-1)] = _infer_dim(src, [d for d in out if d != -1])
    return [TensorType(tuple(out), t[0].dtype)]


@rule("transpose")
def _transpose(t, a):
    axes = a["axes"]
    if sorted(axes) != list(range(len(t[0].shape))):
        raise ShapeError(f"transpose axes {axes} do not match rank {len(t[0].shape)}")
    return [TensorType(tuple(t[0].shape[i] for i in axes), t[0].dtype)]


@rule("split")
def _split(t, a):
    axis, sizes = a["axis"], a["sizes"]
    x = t[0]
    if isinstance(x.shape[axis], int) and sum(sizes) != x.shape[axis]:
        raise ShapeError(f"split sizes {sizes} do not sum to {x.shape[axis]}")
    outs = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        outs.append(TensorType(tuple(shape), x.dtype))
    return outs


@rule("concat")
def _concat(t, a):
    axis = a["axis"]
    shape = list(t[0].shape)
    dims = [x.shape[axis] for x in t]
    shape[axis] = sum(dims) if all(isinstance(d, int) for d in dims) else a.get("dim", "+".join(map(str, dims)))
    return [TensorType(tuple(shape), t[0].dtype)]


@rule("take")
def _take(t, a):
    x, idx = t
    axis = a["axis"]
    shape = list(x.shape)
    shape[axis:axis + 1] = list(idx.shape)
    return [TensorType(tuple(shape), x.dtype)]


@rule("slice_axis")
def _slice_axis(t, a):
    x = t[0]
    axis, start, stop = a["axis"], a["start"], a.get("stop")
    shape = list(x.shape)
    n = shape[axis]
    if isinstance(n, int):
        shape[axis] = len(range(n)[slice(start, stop)])
    elif stop is None and start < 0:
        shape[axis] = -start
    else:
        shape[axis] = f"{n}[{start}:{stop}]"
    return [TensorType(tuple(shape), x.dtype)]


@rule("broadcast_to")
def _broadcast_to(t, a):
    return [TensorType(tuple(a["shape"]), t[0].dtype)]


@rule("cast")
def _cast(t, a):
    return [TensorType(t[0].shape, a["dtype"])]


@rule("rope_freqs")
def _rope_freqs(t, a):
    """positions -> (cos, sin) tables, ready to broadcast against q/k.

    kind "default": positions [B, L]     -> [B, 1, L, D]
    kind "mrope":   positions [3, B, L]  -> [B, 1, L, D]   (sections pick the stream)
    kind "axial2d": positions [N, 2]     -> [N, 1, D]      (h and w halves)
    kind "axial2d_alternating": positions [N, 2] -> [N, 1, D]  (Pixtral: the inverse
        frequencies of the whole head dim, h taking the even ones and w the odd ones,
        h's then w's in each half)
    kind "mrope_interleaved": positions [3, B, L] -> [B, 1, L, D]  (Qwen3-VL: frequency j
        takes stream h where j % 3 == 1 and j < 3 * sections[1], stream w where j % 3 == 2
        and j < 3 * sections[2], stream t elsewhere)

    ``factor`` (default 1): linear rope scaling, the inverse frequencies divided by it.
    ``rotated`` (kind "default", optional): only the first ``rotated`` of the D/2 inverse
        frequencies are kept, the rest are 0 (cos 1, sin 0: those channels do not turn);
        Gemma 4's "proportional" rope on its global layers.
    kind "yarn": positions [B, L] -> [B, 1, L, D]; YaRN's blend of plain and ``factor``-scaled
        frequencies (``beta_fast``, ``beta_slow``, ``original_max``, ``truncate``), cos and
        sin multiplied by ``attention_factor``.
    """
    pos, dim, kind = t[0], a["dim"], a["kind"]
    if a.get("rotated") is not None and (kind != "default" or not 0 <= int(a["rotated"]) <= dim // 2):
        raise ShapeError(f"rope_freqs rotated={a['rotated']!r} needs kind default and at most {dim // 2} frequencies")
    if kind in ("default", "yarn"):
        shape = (pos.shape[0], 1, pos.shape[1], dim)
    elif kind in ("mrope", "mrope_interleaved"):
        if sum(a["sections"]) * 2 != dim:
            raise ShapeError(f"mrope sections {a['sections']} do not cover head dim {dim}")
        shape = (pos.shape[1], 1, pos.shape[2], dim)
    elif kind in ("axial2d", "axial2d_alternating"):
        if dim % 4:
            raise ShapeError(f"2D rope needs a head dim divisible by 4, got {dim}")
        shape = (pos.shape[0], 1, dim)
    else:
        raise ShapeError(f"unknown rope kind {kind!r}")
    tt = TensorType(shape, "float32")
    return [tt, tt]


@rule("rope")
def _rope(t, a):
    x, cos = t[0], t[1]
    _same_dim(x.shape[-1], cos.shape[-1], "rope dim")
    return [x]


@rule("attention")
def _attention(t, a):
    """q [B, H, L, D], k/v [B, Hkv, S, D], optional mask broadcastable to [B, H, L, S].
    ``dot`` (optional): "float32" (default) or "bfloat16", which allows the products to be
    taken of bfloat16-rounded operands (set by the quantize pass on a quantized tower)."""
    q, k, v = t[0], t[1], t[2]
    _same_dim(q.shape[-1], k.shape[-1], "attention head dim")
    if a.get("dot", "float32") not in ("float32", "bfloat16"):
        raise ShapeError(f"attention dot must be float32 or bfloat16, got {a['dot']!r}")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


@rule("cached_attention")
def _cached_attention(t, a):
    """Like attention, but k/v of this step are first written into the layer's KV cache
    (input 3, a runtime cache object) and attention runs over everything cached.
    ``softcap`` (optional): the scaled scores soft-capped, cap * tanh(s / cap), before the
    mask and softmax (Gemma 2's ``attn_logit_softcapping``)."""
    q, v = t[0], t[2]
    if t[3].dtype != "kvcache":
        raise ShapeError("cached_attention input 3 must be a kvcache")
    if a.get("softcap") is not None and not float(a["softcap"]) > 0:
        raise ShapeError(f"cached_attention softcap must be positive, got {a['softcap']!r}")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


@rule("shared_attention")
def _shared_attention(t, a):
    """q [B, H, L, D] over the keys and values another layer's cache (input 1) holds, this
    step's included, without writing to it (Gemma 4's KV-shared layers read the cache of
    the last earlier layer of their kind); mask as cached_attention's."""
    q = t[0]
    if t[1].dtype != "kvcache":
        raise ShapeError("shared_attention input 1 must be a kvcache")
    return [q]


@rule("ordered_logits")
def _ordered_logits(t, a):
    """(h [.., H], centroids [C, H], ordering [V], head [V, H]) -> logits [.., V] over the
    tokens of the ``top_k`` best-scoring centroids only (h . centroids), each centroid
    owning V / C tokens of ``ordering``; every other token gets the smallest of those
    logits minus 1 (Gemma 4 assistants' ordered embeddings)."""
    h, cent, order, head = t[:4]
    _same_dim(h.shape[-1], cent.shape[-1], "ordered_logits centroids")
    _same_dim(h.shape[-1], head.shape[-1], "ordered_logits head")
    _same_dim(order.shape[0], head.shape[0], "ordered_logits ordering")
    c, v, k = cent.shape[0], head.shape[0], int(a["top_k"])
    if isinstance(c, int) and isinstance(v, int) and (v % c or not 1 <= k <= c):
        raise ShapeError(f"ordered_logits: {v} tokens over {c} centroids, top {k}")
    return [TensorType(h.shape[:-1] + (v,), h.dtype)]


@rule("remap_ids")
def _remap_ids(t, a):
    """Token ids with every one of ``tokens`` replaced by ``to`` (Gemma 4 looks its image,
    video and audio placeholders up as the pad token)."""
    if t[0].dtype not in ("int32", "int64", "uint32"):
        raise ShapeError(f"remap_ids takes token ids, not {t[0].dtype}")
    if not all(isinstance(i, int) for i in [*a["tokens"], a["to"]]):
        raise ShapeError("remap_ids tokens and to must be ints")
    return [t[0]]


@rule("select_layer")
def _select_layer(t, a):
    """x [.., N, D] -> x[.., index, :]: one layer's slice of an input every layer of a block
    takes (Gemma 4's per-layer input embeddings). ``index`` is an int or ``"$attr"``: the
    layer table's ``attr`` of the layer that runs."""
    x, idx = t[0], a["index"]
    if not (isinstance(idx, int) or (isinstance(idx, str) and idx.startswith("$"))):
        raise ShapeError(f"select_layer index must be an int or a '$' layer attribute, got {idx!r}")
    if len(x.shape) < 2:
        raise ShapeError("select_layer needs a [.., N, D] input")
    return [TensorType(x.shape[:-2] + x.shape[-1:], x.dtype)]


@rule("clip")
def _clip(t, a):
    """x clamped to [lo, hi] (inputs 1 and 2: scalar params, either may be None): Gemma 4's
    clippable linears bound their inputs and outputs so."""
    for b in t[1:]:
        if b is not None and len(b.shape) > 1:
            raise ShapeError(f"clip bounds must be scalars, got {b}")
    return [t[0]]


@rule("prepend")
def _prepend(t, a):
    """x [N, S, E], row [E] -> [N, S+1, E]: a learned token (CLIP's class embedding) first."""
    x = t[0]
    s = x.shape[1] + 1 if isinstance(x.shape[1], int) else f"{x.shape[1]}+1"
    return [TensorType((x.shape[0], s, x.shape[2]), x.dtype)]


@rule("patchify")
def _patchify(t, a):
    """NCHW images -> [N, (H/P)*(W/P), C*P*P] in the (C, P, P) order of a conv weight."""
    x, p = t[0], a["patch"]
    n, c, h, w = x.shape
    npatch = (h // p) * (w // p) if isinstance(h, int) and isinstance(w, int) else "P"
    return [TensorType((n, npatch, c * p * p), x.dtype)]


@rule("call_block")
def _call_block(t, a):
    """Runs layers [start, stop) of a Block on the hidden state (input 0); the other
    inputs are shared by every layer (rope tables, masks, caches). Output: the hidden state."""
    if a["stop"] < a["start"]:
        raise ShapeError("call_block: empty or reversed layer range")
    return [t[0]]


# ---- linear attention (Gated DeltaNet) -------------------------------------------------

@rule("l2_norm")
def _l2_norm(t, a):
    """x / sqrt(sum(x^2) + eps) over the last axis (Gated DeltaNet's queries and keys)."""
    return [t[0]]


@rule("rms_norm_gated")
def _rms_norm_gated(t, a):
    """rms_norm(x, w) * silu(z): x, z [..., D], w [D] (Gated DeltaNet's output norm)."""
    _same_dim(t[0].shape[-1], t[2].shape[-1], "rms_norm_gated weight")
    _same_dim(t[0].shape[-1], t[1].shape[-1], "rms_norm_gated gate")
    return [t[0]]


@rule("delta_gates")
def _delta_gates(t, a):
    """(a [.., H], b [.., H], A_log [H], dt_bias [H]) -> (g, beta) float32: the log decay
    -exp(A_log) * softplus(a + dt_bias) and the write rate sigmoid(b)."""
    _same_dim(t[0].shape[-1], t[2].shape[-1], "delta_gates A_log")
    _same_dim(t[0].shape[-1], t[3].shape[-1], "delta_gates dt_bias")
    out = TensorType(t[0].shape, "float32")
    return [out, out]


@rule("zero_padded")
def _zero_padded(t, a):
    """x [B, L, E] with left-padding rows (hidden from themselves by mask [B, 1, L, S]) zeroed."""
    return [t[0]]


def _state_cache(t, i: int, op: str) -> None:
    if t[i].dtype != "kvcache":
        raise ShapeError(f"{op} input {i} must be a layer cache (a recurrent state)")


@rule("causal_conv1d")
def _causal_conv1d(t, a):
    """x [B, L, C], w [C, K], cache: depthwise causal conv over time continuing from the
    K-1 inputs the layer's cache keeps; optional ``activation``."""
    _same_dim(t[0].shape[-1], t[1].shape[0], "causal_conv1d channels")
    _state_cache(t, 2, "causal_conv1d")
    if a.get("activation") is not None and a["activation"] not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {a['activation']!r}")
    return [t[0]]


@rule("gated_delta_rule")
def _gated_delta_rule(t, a):
    """q, k [B, L, Hk, Dk], v [B, L, Hv, Dv], g, beta [B, L, Hv], cache -> [B, L, Hv, Dv]:
    the gated delta rule from the recurrent state the layer's cache keeps (Hv a multiple
    of Hk: each key head serves Hv / Hk consecutive value heads)."""
    q, k, v, g, beta = t[:5]
    _state_cache(t, 5, "gated_delta_rule")
    _same_dim(q.shape[-1], k.shape[-1], "gated_delta_rule key dim")
    _same_dim(q.shape[-2], k.shape[-2], "gated_delta_rule key heads")
    hk, hv = k.shape[-2], v.shape[-2]
    if isinstance(hk, int) and isinstance(hv, int) and hv % hk:
        raise ShapeError(f"gated_delta_rule: {hv} value heads are not a multiple of {hk} key heads")
    _same_dim(g.shape[-1], hv, "gated_delta_rule decay heads")
    _same_dim(beta.shape[-1], hv, "gated_delta_rule rate heads")
    return [TensorType(v.shape, v.dtype)]


@rule("select_caches")
def _select_caches(t, a):
    """The caches of decoder layers ``layers`` (a hybrid stack's blocks each index their own)."""
    if t[0].dtype != "kvcache":
        raise ShapeError("select_caches takes the caches")
    return [t[0]]


# ---- mixture of experts ------------------------------------------------------------------

@rule("moe_route")
def _moe_route(t, a):
    """Router logits [.., E] -> (weights [.., K] float32, experts [.., K] int32): softmax over
    the experts in float32, the ``top_k`` most probable (most probable first), their
    probabilities renormalised to sum to 1 when ``normalize`` (default true)."""
    k = int(a["top_k"])
    e = t[0].shape[-1]
    if k < 1 or (isinstance(e, int) and k > e):
        raise ShapeError(f"moe_route: top_k {k} is not in 1..{e} experts")
    lead = t[0].shape[:-1]
    return [TensorType(lead + (k,), "float32"), TensorType(lead + (k,), "int32")]


def _moe_experts_rule(t, a, op: str):
    x, weights, experts, gate_up, down = t[:5]
    if experts.dtype != "int32":
        raise ShapeError(f"{op}: expert indices must be int32, got {experts.dtype}")
    _same_dim(weights.shape[-1], experts.shape[-1], f"{op} top-k")
    if len(gate_up.shape) != 3 or len(down.shape) != 3:
        raise ShapeError(f"{op}: expert weights must be stacked [experts, out, in]")
    _same_dim(gate_up.shape[0], down.shape[0], f"{op} experts")
    _same_dim(x.shape[-1], gate_up.shape[-1], f"{op} gate_up in-features")
    _same_dim(x.shape[-1], down.shape[1], f"{op} down out-features")
    if isinstance(gate_up.shape[1], int) and isinstance(down.shape[2], int) and gate_up.shape[1] != 2 * down.shape[2]:
        raise ShapeError(f"{op}: gate_up has {gate_up.shape[1]} rows, not twice down's {down.shape[2]} inputs")
    if a["kind"] not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {a['kind']!r}")
    return [TensorType(x.shape, promote(x.dtype, down.dtype))]


@rule("moe_experts")
def _moe_experts(t, a):
    """(x [.., H], weights [.., K], experts [.., K], gate_up [E, 2I, H], down [E, H, I]) ->
    [.., H]: each token through its K selected experts' SwiGLU (act(gate) * up, then down;
    gate the first I rows of gate_up), summed with its routing weights. Only the selected
    experts' weights are read."""
    return _moe_experts_rule(t, a, "moe_experts")


@rule("qmoe_experts")
def _qmoe_experts(t, a):
    """moe_experts with quantized expert weights (each expert quantized on its own rows; the
    scheme travels with the weight)."""
    return _moe_experts_rule(t, a, "qmoe_experts")


@rule("moe_block")
def _moe_block(t, a):
    """(x [.., H], router [E, H], gate_up [E, 2I, H], down [E, H, I][, shared_gate_up [2S, H],
    shared_down [H, S], shared_gate [1, H]][, router_x [.., H], expert_scale [E]]) -> [.., H]:
    a whole MoE block, ``moe_route`` (``top_k``, ``normalize``) over the router's logits (of
    router_x where given, else of x), the weights times expert_scale of their experts where
    given, the routed experts (``kind``), plus the shared expert (gate rows first) times
    sigmoid(shared_gate x) where given. What the cpu target's ``lower`` makes of those ops
    for one C call per layer and step."""
    x, router, gate_up, down = t[:4]
    rx, scale = (list(t[7:9]) + [None, None])[:2]
    if rx is not None:
        if len(rx.shape) != len(x.shape):
            raise ShapeError(f"moe_block: the router's input {list(rx.shape)} is not shaped as x {list(x.shape)}")
        for a_, b_ in zip(rx.shape, x.shape):
            _same_dim(a_, b_, "moe_block router input vs x")
    if scale is not None:
        if len(scale.shape) != 1:
            raise ShapeError(f"moe_block: expert_scale must be [experts], got {list(scale.shape)}")
        _same_dim(scale.shape[0], router.shape[0], "moe_block expert_scale vs router outputs")
    shared = [s for s in t[4:7] if s is not None]
    if len(shared) not in (0, 3):
        raise ShapeError("moe_block: the shared expert needs its gate_up, down and gate weights")
    if len(router.shape) != 2:
        raise ShapeError("moe_block: the router weight must be [experts, hidden]")
    _same_dim(router.shape[0], gate_up.shape[0], "moe_block router outputs")
    _same_dim(router.shape[1], x.shape[-1], "moe_block router in-features")
    k = int(a["top_k"])
    if k < 1 or (isinstance(router.shape[0], int) and k > router.shape[0]):
        raise ShapeError(f"moe_block: top_k {k} is not in 1..{router.shape[0]} experts")
    out = _moe_experts_rule([x, TensorType(x.shape[:-1] + (k,), "float32"),
                             TensorType(x.shape[:-1] + (k,), "int32"), gate_up, down], a, "moe_block")[0]
    if shared:
        sgu, sdn, sg = shared
        _same_dim(sgu.shape[-1], x.shape[-1], "moe_block shared gate_up in-features")
        _same_dim(sdn.shape[0], x.shape[-1], "moe_block shared down out-features")
        if isinstance(sgu.shape[0], int) and isinstance(sdn.shape[-1], int) and sgu.shape[0] != 2 * sdn.shape[-1]:
            raise ShapeError(f"moe_block: shared gate_up has {sgu.shape[0]} rows, not twice down's "
                             f"{sdn.shape[-1]} inputs")
        if tuple(sg.shape) != (1, x.shape[-1]):
            raise ShapeError(f"moe_block: the shared expert's gate must be [1, {x.shape[-1]}], got {list(sg.shape)}")
    return [out]
