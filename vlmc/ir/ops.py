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
    _same_dim(t[0].shape[-1], t[2].shape[-1], "add_rms_norm weight")
    h = TensorType(broadcast(t[0].shape, t[1].shape), promote(t[0].dtype, t[1].dtype))
    return [h, h]


# The KV-cache types (``kv`` of a layer, ``ir.core.KV_LAYOUTS``) each fast path reads and
# writes: a layer whose planned cache is not listed here runs its ops (``lower`` attaches a
# block's fast path only when every layer's cache is listed). ``quantized`` lists its bits.
FAST_PATH_KV: dict[str, dict[str, tuple[int, ...] | None]] = {
    "decode_layer": {"dense": None, "quantized": (4, 8)},
}


def fast_path_reads(op: str, spec: dict) -> bool:
    """Whether fast path ``op`` handles a layer whose KV cache is ``spec``."""
    layouts = FAST_PATH_KV.get(op, {})
    if spec.get("layout") not in layouts:
        return False
    bits = layouts[spec["layout"]]
    return bits is None or spec.get("bits") in bits


@rule("decode_layer")
def _decode_layer(t, a):
    """A block's fast path (``Block.fast_path``): the layer output, x's type."""
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


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")


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
    kind "mrope_interleaved": positions [3, B, L] -> [B, 1, L, D]  (Qwen3-VL: frequency j
        takes stream h where j % 3 == 1 and j < 3 * sections[1], stream w where j % 3 == 2
        and j < 3 * sections[2], stream t elsewhere)

    ``factor`` (default 1): linear rope scaling, the inverse frequencies divided by it.
    """
    pos, dim, kind = t[0], a["dim"], a["kind"]
    if kind == "default":
        shape = (pos.shape[0], 1, pos.shape[1], dim)
    elif kind in ("mrope", "mrope_interleaved"):
        if sum(a["sections"]) * 2 != dim:
            raise ShapeError(f"mrope sections {a['sections']} do not cover head dim {dim}")
        shape = (pos.shape[1], 1, pos.shape[2], dim)
    elif kind == "axial2d":
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
    """q [B, H, L, D], k/v [B, Hkv, S, D], optional mask broadcastable to [B, H, L, S]."""
    q, k, v = t[0], t[1], t[2]
    _same_dim(q.shape[-1], k.shape[-1], "attention head dim")
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
