"""A whole pre-norm decoder layer's decode step in one C call (``vlmc_decode_layers`` in
``decode_layer.c``), the cpu target's fast path for the ``decode_layer`` lowering: the
Llama/Qwen2 layer and its Gemma (1, 2, 3) and Qwen3 options (QK-norm, sandwich norms,
GELU-tanh MLPs, soft-capped attention scores, sliding-window layers with their own rotary
tables) and Qwen3.5's gated full attention (partial rotary, sigmoid output gate: to float32
rounding, see ``decode_layers``).

The layer's ops stay in the generated code and compute the same thing; this runs instead
of them when it applies (B sequences of T new tokens each with B x T up to
GEMV_MAX_ROWS: a decode step, or the draft tokens ``verify`` checks; a cache of a layout
in ``SUPPORTED_KV`` that holds some tokens, weights the GEMV kernels read; never a
prompt's rows, ``kernels/step_rows.py``) and returns None otherwise. A rotating (sliding-window) cache first drops the tokens its next append
would drop (``make_room``), so its step goes in place like any other's. T tokens give, row for row and in the caches,
what T one-token steps give, to the last bit (which makes speculative decoding lossless).
It calls the same kernels in the same order, so the result is the op-by-op path's to the
last bit (where the first layer's input is an mx.array, from an embedding table the
kernels do not gather, the ops' first norm is MLX's: so it is here too). For an
affine-quantized cache the C code encodes this step's keys and values as
``kv_codecs.Affine`` does, byte for byte, and attends over the codes, as the ops'
``cached_attention`` does. This step's keys and values go into the cache in place where
that is safe (``KVCache.host_writable`` and T free columns), else as a lazy write.

``decode_layers`` runs a whole stack of such layers in one C call (the generated code tries
it before its loop over the layers): all of them or, returning None, none; dense and
quantized layers mix freely. ``decode_layer`` is the same call for one layer, one token
per sequence."""
from __future__ import annotations

import ctypes
import weakref

import mlx.core as mx
import numpy as np

from .. import kv_quant as _kv_quant
from .. import reference as _reference
from ..step_rows import in_prompt
from . import GEMV_MAX_ROWS, _check, _get_lib, _host, _unpack, enabled, qplan
from .host import SIGMOID_SCALE, param
from .kv_decode import append_lazy, append_parts_lazy, host_starts, settle

_I, _F, _P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p

# The KV layouts (kv_plan ``layout``) whose caches this path reads and extends, each with the
# bit widths it takes (None: any); ``rotating`` is a dense sliding window. The compiler
# attaches the fast path only where every layer's layout is here.
SUPPORTED_KV = {"dense": None, "rotating": None, "quantized": (4, 8), "turboquant": (2, 3, 4)}


def supports_kv(spec, head_dim: int | None = None) -> bool:
    """Whether a kv_plan layer entry's ``kv`` (a layout name or its dict) takes this path."""
    spec = {"layout": spec} if isinstance(spec, str) else spec
    layout = spec.get("layout", "dense")
    if layout not in SUPPORTED_KV:
        return False
    bits = SUPPORTED_KV[layout]
    if bits is None:
        return True
    if layout == "turboquant":
        return all(int(spec.get(f"{w}_bits", 0)) in bits for w in "kv") and (head_dim is None or head_dim % 8 == 0)
    gs = int(spec.get("group_size", 0))
    return int(spec.get("bits", 0)) in bits and gs > 0 and (head_dim is None or head_dim % gs == 0)


# vlmc_kv (vlmc.h): a layer's cache as the C path reads and extends it
_KV = np.dtype([(name, np.uintp) for name in ("k", "v", "ks", "kb", "vs", "vb", "nk", "nv", "nks", "nkb", "nvs", "nvb",
                                              "cs", "sn", "starts")]
               + [(name, np.int32) for name in ("layout", "bits", "gs", "cap", "held", "inplace", "window")]
               + [(name, np.uintp) for name in ("kn", "vn", "nkn", "nvn", "krot", "vrot", "vrot_t", "kcb", "vcb")]
               + [(name, np.int32) for name in ("kbits", "vbits")], align=True)
_DENSE, _AFFINE, _TURBO = 0, 1, 2


class _Proj(ctypes.Structure):
    _fields_ = [("kind", _I), ("N", _I), ("K", _I), ("bits", _I), ("gs", _I), ("st", _I),
                ("w", _P), ("scales", _P), ("biases", _P), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
                ("eps1", _F), ("eps2", _F), ("scale", _F), ("act_a", _F), ("act_c", _F),
                ("eps_q", _F), ("eps_k", _F), ("eps_pa", _F), ("eps_pf", _F), ("softcap", _F),
                ("norm1", _P), ("norm2", _P), ("q_norm", _P), ("k_norm", _P), ("post_attn", _P), ("post_ff", _P),
                ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj),
                ("v_norm", _I), ("eps_v", _F), ("v_norm_w", _P), ("shared", _I),
                ("ple_dim", _I), ("ple_act_a", _F), ("ple_act_c", _F), ("eps_ple", _F), ("ple_norm", _P),
                ("ple_gate", _Proj), ("ple_proj", _Proj), ("out_scale", _P), ("rope_dim", _I), ("q_gate", _I)]


# the optional weights after the ten every layer has: QK-norm, the sandwich norms, the
# value norm's weight, the per-layer input branch (gate, projection, norm), the output scalar
_OPTIONAL = ("q_norm", "k_norm", "post_attn", "post_ff", "v_norm", "ple_gate", "ple_proj", "ple_norm", "out_scale")
_N_WEIGHTS = 10 + len(_OPTIONAL)


def _proj(w, b) -> _Proj | None:
    """The kernel's view of a projection, or None when the GEMVs do not read it."""
    bias = None if b is None else _host(b, as_f32=True).ptr
    if hasattr(w, "scales") and hasattr(w, "weight"):  # a QuantWeight
        w, scales, biases, _, bits, gs, mode = _unpack(w, None, None, None, None, None, "affine")
        plan = qplan(w, scales, biases, bits, gs, mode)
        if plan[5] is None:
            return None
        K, N, wh, sh, bh, st = plan[6:]
        return _Proj(2, N, K, bits, gs, st, wh.ptr, sh.ptr, bh.ptr, bias)
    if not isinstance(w, mx.array) or w.ndim != 2 or w.dtype not in (mx.float32, mx.bfloat16):
        return None
    kind = 0 if w.dtype == mx.float32 else 1
    return _Proj(kind, w.shape[0], w.shape[1], 0, 0, 0, _host(w).ptr, None, None, bias)


# id(norm1 weight) -> (the other weights, attrs, _Layer or None). The entry leaves with that
# norm weight; it holds the layer's other weights, which the same layer owns anyway.
_layers: dict[int, tuple] = {}


def _layer(weights: tuple, attrs: tuple) -> _Layer | None:
    if not isinstance(weights[0], mx.array):
        return None
    key = id(weights[0])
    hit = _layers.get(key)
    if hit is not None and len(hit[0]) == len(weights) - 1 and all(a is b for a, b in zip(hit[0], weights[1:])) \
            and hit[1] == attrs:
        return hit[2]
    norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, d_w, d_b = weights[:10]
    extra = dict(zip(_OPTIONAL, tuple(weights[10:]) + (None,) * (_N_WEIGHTS - len(weights))))
    (eps1, eps2, heads, kv_heads, head_dim, inter, scale, act, eps_q, eps_k, eps_pa, eps_pf, softcap, eps_v, shared,
     ple_act, eps_ple, rope_dim, q_gate) = attrs
    projs = [_proj(qkv_w, qkv_b), _proj(o_w, o_b), _proj(gu_w, gu_b), _proj(d_w, d_b)]
    ple = extra["ple_gate"] is not None or extra["ple_proj"] is not None or extra["ple_norm"] is not None
    ple_projs = [_proj(extra["ple_gate"], None), _proj(extra["ple_proj"], None)] if ple else [_Proj(), _Proj()]
    hidden = param(norm1).shape[0]  # Gemma's may differ from heads x head_dim
    ple_dim = ple_projs[0].N if ple and ple_projs[0] is not None else 0
    sizes = {"q_norm": head_dim, "k_norm": head_dim, "post_attn": hidden, "post_ff": hidden, "v_norm": head_dim,
             "ple_norm": hidden, "out_scale": 1}
    eps = {"q_norm": eps_q, "k_norm": eps_k, "post_attn": eps_pa, "post_ff": eps_pf, "v_norm": eps_v,
           "ple_norm": eps_ple, "out_scale": 0.0}
    norms = {name: None if w is None else param(w) for name, w in extra.items() if name in sizes}
    if (any(p is None for p in projs + ple_projs) or act not in SIGMOID_SCALE or len(weights) > _N_WEIGHTS
            or any(n is not None and (n.shape != (sizes[k],) or eps[k] is None) for k, n in norms.items())
            or (ple and (ple_act not in SIGMOID_SCALE or norms["ple_norm"] is None or eps_ple is None
                         or ple_projs[0].K != hidden or ple_projs[1].N != hidden or ple_projs[1].K != ple_dim))):
        layer = None
    else:
        ptr = {k: None if n is None else n.ctypes.data for k, n in norms.items()}
        layer = _Layer(hidden, heads, kv_heads, head_dim, inter, eps1, eps2, scale, *SIGMOID_SCALE[act],
                       *(0.0 if e is None else e for e in (eps_q, eps_k, eps_pa, eps_pf)), softcap or 0.0,
                       param(norm1).ctypes.data, param(norm2).ctypes.data,
                       *(ptr[k] for k in ("q_norm", "k_norm", "post_attn", "post_ff")), *projs,
                       int(eps_v is not None), eps_v or 0.0, ptr["v_norm"], int(bool(shared)),
                       ple_dim, *(SIGMOID_SCALE[ple_act] if ple else (0.0, 0.0)), eps_ple or 0.0, ptr["ple_norm"],
                       *ple_projs, ptr["out_scale"], rope_dim or 0, int(bool(q_gate)))
    if hit is None:
        weakref.finalize(norm1, _layers.pop, key, None)
    _layers[key] = (weights[1:], attrs, layer)
    return layer


# the rope tables of a step (one pair, or one per kind of layer, e.g. Gemma 3's local and
# global ones): (weak refs to them, their host copies), the last few pairs
_last_tables: list = []


def _tables(cos, sin) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Contiguous float32 host copies of a step's rope tables and their addresses, converted
    once per step."""
    for wc, ws, out in _last_tables:
        if wc() is cos and ws() is sin:
            return out
    # copies (np.array, not a view): a view would keep the step's mx.arrays alive in this cache
    c, s = (np.array(t if not isinstance(t, mx.array) else t if t.dtype == mx.float32 else t.astype(mx.float32),
                     dtype=np.float32, copy=True, order="C") for t in (cos, sin))
    out = (c, s, c.ctypes.data, s.ctypes.data)
    try:
        _last_tables[:] = [(weakref.ref(cos), weakref.ref(sin), out)] + _last_tables[:3]
    except TypeError:  # numpy tables: not cached
        pass
    return out


def _step_inputs(x, cos, sin, head_dim: int, nl: int):
    """(library, B, T, hidden, each layer's cos/sin addresses, their sequence and token row
    strides) when a step with this x [B, T, hidden] and these rope tables [B or 1, 1, T,
    head_dim] (one pair, or a list of nl pairs: each layer's) can take the C path, else None."""
    lib = _get_lib()
    f32 = x.dtype == np.float32 if type(x) is np.ndarray else isinstance(x, mx.array) and x.dtype == mx.float32
    if (lib is None or not enabled() or in_prompt() or not f32 or x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1
            or x.shape[0] * x.shape[1] > GEMV_MAX_ROWS):
        return None
    B, T = x.shape[:2]
    per_layer = isinstance(cos, (list, tuple))
    if per_layer and not (isinstance(sin, (list, tuple)) and len(cos) == len(sin) == nl):
        return None
    tables = [_tables(c, s) for c, s in (zip(cos, sin) if per_layer else [(cos, sin)])]
    shape = tables[0][0].shape
    for c, s, _, _ in tables:
        if c.shape != s.shape or c.shape != shape or c.ndim != 4 or c.shape[0] not in (1, B) \
                or c.shape[1:] != (1, T, head_dim):
            return None
    ptrs = [(c_ptr, s_ptr) for _, _, c_ptr, s_ptr in tables] * (1 if per_layer else nl)
    return lib, B, T, x.shape[2], ptrs, T * head_dim if shape[0] > 1 else 0, head_dim


def _cache_view(cache, batch: int, kv_heads: int, head_dim: int):
    """(layout code, bits, group size, buffers) of a cache this path reads and extends:
    dense float32 buffers (k, v), or affine codes (k codes, v codes, then bfloat16 k scales,
    k minimums, v scales, v minimums), some tokens held (a sliding window's too); else None."""
    if (getattr(cache, "kv_heads", None) != kv_heads or getattr(cache, "head_dim", None) != head_dim
            or not hasattr(cache, "start") or cache.buffers is None or not cache.held
            or (cache.start and not getattr(cache, "window", None))):
        return None
    k, v = cache.buffers["k"], cache.buffers["v"]
    if cache.layout == "dense":
        bufs = (k["x"], v["x"])
        if bufs[0].dtype != mx.float32 or bufs[1].dtype != mx.float32:
            return None
        view = (_DENSE, 0, 0, bufs)
    elif cache.layout == "affine":
        kc, vc = cache.codecs["k"], cache.codecs["v"]
        bits, gs = kc.bits, kc.group_size
        bufs = (k["codes"], v["codes"], k["scales"], k["biases"], v["scales"], v["biases"])
        if ((vc.bits, vc.group_size) != (bits, gs) or bits not in SUPPORTED_KV["quantized"] or head_dim % gs
                or bufs[0].dtype != mx.uint8 or bufs[1].dtype != mx.uint8
                or any(b.dtype != mx.bfloat16 for b in bufs[2:])):
            return None
        view = (_AFFINE, bits, gs, bufs)
    elif cache.layout == "turboquant" and not getattr(cache, "window", None):
        kc, vc = cache.codecs["k"], cache.codecs["v"]
        bufs = (k["codes"], v["codes"], k["norms"], v["norms"])
        if (kc.bits not in SUPPORTED_KV["turboquant"] or vc.bits not in SUPPORTED_KV["turboquant"] or head_dim % 8
                or bufs[0].dtype != mx.uint8 or bufs[1].dtype != mx.uint8
                or any(b.dtype != mx.float32 for b in bufs[2:])):
            return None
        view = (_TURBO, (kc.bits, vc.bits), 0, bufs)
    else:
        return None
    return view if bufs[0].shape[:2] == (batch, kv_heads) else None


def _address(a: mx.array) -> int | None:
    """The address of an evaluated array's memory, asked afresh (a cache buffer stays the same
    Python object when a lazy write lands in it, but that write may have moved its memory),
    or None when it is not one C-contiguous block the kernel could read and write."""
    view = memoryview(a)
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if view.c_contiguous else None


def _step_kv(views: list, caches: list, B: int, T: int, kv_heads: int, head_dim: int, tables: list, mask,
             shared: bool = False):
    """The vlmc_kv array for these caches (with each layer's rope tables and first visible
    keys), the buffer receiving each layer's keys and values of this step's T tokens as
    stored, each layer's (offset, sizes) in it, and the starts arrays it points to; None
    where a buffer is not contiguous. ``shared``: the layers only read the caches (which
    hold this step's tokens already): nothing to receive, nothing written in place."""
    rows = B * kv_heads * T
    layouts, off = [], 0
    for kind, bits, gs, _ in views:
        if shared:
            sizes = ()
        elif kind == _DENSE:
            sizes = (rows * head_dim * 4,) * 2
        elif kind == _TURBO:  # k codes, v codes, k norms, v norms
            sizes = (rows * head_dim * bits[0] // 8, rows * head_dim * bits[1] // 8, rows * 4, rows * 4)
        else:
            cb, gb = rows * head_dim * bits // 8, rows * (head_dim // gs) * 2
            sizes = (cb, cb, gb, gb, gb, gb)
        layouts.append((off, sizes))
        off += sum((n + 63) // 64 * 64 for n in sizes)
    new = np.empty(off, np.uint8)
    base = new.ctypes.data
    mx.eval(*(b for view in views for b in view[3]))
    records, starts = [], []
    for (kind, bits, gs, bufs), cache, (off, sizes), (c_ptr, s_ptr) in zip(views, caches, layouts, tables):
        outs, at = [], base + off
        for n in sizes:
            outs.append(at)
            at += (n + 63) // 64 * 64
        ptrs = [_address(b) for b in bufs]
        if None in ptrs:
            return None
        turbo = [0] * 9 + [0, 0]  # kn, vn, nkn, nvn, krot, vrot, vrot_t, kcb, vcb, kbits, vbits
        if kind == _TURBO:  # codes, then the norms apart from the affine fields
            hk, hv = cache.codecs["k"].host, cache.codecs["v"].host
            outs = outs or [0] * 4
            turbo = [ptrs[2], ptrs[3], outs[2], outs[3], hk["rotation"].ctypes.data, hv["rotation"].ctypes.data,
                     hv["rotation_t"].ctypes.data, hk["codebook"].ctypes.data, hv["codebook"].ctypes.data, *bits]
            ptrs, outs, bits = ptrs[:2] + [0] * 4, outs[:2], 0
        elif kind == _DENSE:  # k, v, then no scales / minimums
            ptrs = ptrs + [0] * 4
        outs = outs + [0] * (6 - len(outs))
        # outs: k, v, k scales, k minimums, v scales, v minimums (the order of _KV's n* fields)
        # in place: host_writable() covers one token; T need that many free columns
        inplace = not shared and cache.host_writable() and cache.held + T <= bufs[0].shape[2]
        starts.append(host_starts(mask, B, cache.start))
        records.append((*ptrs, *outs, c_ptr, s_ptr, starts[-1].ctypes.data, kind, bits, gs, bufs[0].shape[2],
                        cache.held, inplace, getattr(cache, "window", None) or 0, *turbo))
    return np.array(records, _KV), new, layouts, starts


def _stored_step(new: np.ndarray, kind: int, off: int, sizes: tuple, B: int, T: int,
                 kv_heads: int) -> list[np.ndarray]:
    """Views of one layer's keys and values as stored ([B, kv_heads, T, width] each: dense
    k, v float32; affine k codes, v codes, k scales, k minimums, v scales, v minimums)."""
    out, at = [], off
    for i, n in enumerate(sizes):
        dtype = np.float32 if kind == _DENSE or (kind == _TURBO and i >= 2) else np.uint8 if i < 2 else np.uint16
        part = new[at:at + n].view(dtype)
        out.append(part.reshape(B, kv_heads, T, part.size // (B * kv_heads * T)))
        at += (n + 63) // 64 * 64
    return out


def _host_input(x, norm1, eps1: float):
    """x as a contiguous host array, and the first norm where the ops compute it with MLX
    (x is an mx.array: the first layer's input from an embedding MLX gathered), else None."""
    normed = None
    if isinstance(x, mx.array):
        normed = np.ascontiguousarray(np.asarray(_reference.rms_norm(x, norm1, eps1)), dtype=np.float32)
        x = np.asarray(x)
    return (x if x.flags.c_contiguous else np.ascontiguousarray(x)), normed


def decode_layer(x, cos, sin, mask, cache, *weights, **attrs):
    """The layer's output [B, 1, hidden] as a host array, or None (the caller runs the ops):
    ``decode_layers`` over this one layer, for one token per sequence (several take the
    stack call, which the generated code tries first, or the ops). With ``ple_layer`` (the
    layer's slot of the per-layer inputs) the first of ``weights`` is those inputs."""
    if getattr(x, "ndim", 0) != 3 or x.shape[1] != 1:
        return None
    if attrs.get("ple_layer") is None:
        return decode_layers(x, cos, sin, mask, [cache], [weights], **attrs)
    attrs["ple_layer"] = [attrs["ple_layer"]]
    return decode_layers(x, cos, sin, mask, [cache], weights[0], [weights[1:]], **attrs)


def _layer_inputs(ple, slots: list, B: int, T: int, width: int):
    """(the per-layer inputs [B, T, layers, width] as a contiguous float32 host array, each
    called layer's row address in it, the row stride in floats), or None."""
    if isinstance(ple, mx.array):
        ple = ple if ple.dtype == mx.float32 else ple.astype(mx.float32)
    a = np.asarray(ple)
    if a.dtype != np.float32 or a.ndim != 4 or a.shape[:2] != (B, T) or a.shape[3] != width \
            or not all(isinstance(s, int) and 0 <= s < a.shape[2] for s in slots):
        return None
    a = np.ascontiguousarray(a)
    rows = np.array([a.ctypes.data + s * width * 4 for s in slots], np.uintp)
    return a, rows, a.shape[2] * width


def decode_layers(x, cos, sin, mask, caches, *args, eps1: float, eps2: float, heads: int, kv_heads: int,
                  head_dim: int, inter: int, scale: float, act: str, eps_q: float | None = None,
                  eps_k: float | None = None, eps_pa: float | None = None, eps_pf: float | None = None,
                  softcap: float | None = None, eps_v: float | None = None, shared: bool = False,
                  ple_act: str | None = None, eps_ple: float | None = None, ple_layer: list | None = None,
                  rope_dim: int | None = None, q_gate: bool = False):
    """A stack of such layers in one C call (``vlmc_decode_layers``): args is (layers,), or
    (per-layer inputs [B, T, n, P], layers) with ``ple_layer`` (each layer's slot among the n).
    layers[i] holds layer i's weights as decode_layer takes them (norm1, qkv weight and
    bias, o weight and bias, norm2, gate_up weight and bias, down weight and bias, then
    optionally q_norm, k_norm, post_attn, post_ff, v_norm, ple_gate, ple_proj, ple_norm,
    out_scale: None where the layer has none), caches[i] its cache; cos, sin: the step's
    rope tables, or a list of each layer's. ``eps_v``: values RMS-normed (v_norm: the
    weight, None: unscaled); ``shared``: the qkv weight makes queries only and the layers
    read caches other layers wrote this step; ``rope_dim``: rotary on the first rope_dim of
    each head only (the tables' width); ``q_gate``: the qkv weight makes [query, gate] per
    query head and the attention output is gated by sigmoid(gate) (Qwen3.5's full
    attention; the sigmoid's exp is the C library's, so such a layer is the ops' to float32
    rounding, not to the bit). The last layer's output, or None when any
    layer could not take the C path (the caller then runs the layers one by one; nothing
    has been computed or stored)."""
    if len(args) != (1 if ple_layer is None else 2):
        return None
    ple, layers = (None, args[0]) if ple_layer is None else args
    # one cache object per writing layer: a cache given twice would get both layers' keys in
    # one column (the kernel writes each layer's at the cache's current end); readers share
    if not layers or len(layers) != len(caches) or (not shared and len({id(c) for c in caches}) != len(caches)):
        return None
    if q_gate and shared:
        return None
    step = _step_inputs(x, cos, sin, rope_dim or head_dim, len(layers))
    if step is None:
        return None
    lib, B, T, hidden, tables, ca, cl = step
    if not _kv_quant.causal_step(mask, T):
        return None  # the kernels attend causally from each sequence's start: not a family's spans
    attrs = (eps1, eps2, heads, kv_heads, head_dim, inter, scale, act, eps_q, eps_k, eps_pa, eps_pf, softcap, eps_v,
             bool(shared), ple_act, eps_ple, rope_dim, bool(q_gate))
    structs = [_layer(w, attrs) for w in layers]
    if any(lay is None or lay.hidden != hidden or (lay.ple_dim > 0) != (ple is not None) for lay in structs):
        return None
    inputs = None
    if ple is not None:
        if len(ple_layer) != len(layers) or len({lay.ple_dim for lay in structs}) != 1:
            return None
        inputs = _layer_inputs(ple, list(ple_layer), B, T, structs[0].ple_dim)
        if inputs is None:
            return None
    views = [_cache_view(c, B, kv_heads, head_dim) for c in caches]
    if any(v is None for v in views) or (shared and any(c.held < T for c in caches)):
        return None
    if (shared or softcap) and any(v[0] == _TURBO for v in views):
        return None  # the ops take those over TurboQuant codes to MLX's reference
    nl = len(layers)
    for c in caches:
        settle(c)  # deferred writes of earlier steps (or, read by a shared layer, of this one)
        if getattr(c, "window", None) and not shared:
            c.make_room()  # what the ops' append would drop first (one copy every ``slack`` steps)
    step_kv = _step_kv(views, caches, B, T, kv_heads, head_dim, tables, mask, shared)
    if step_kv is None:
        return None
    kv, new, layouts, _starts = step_kv
    ptrs = np.array([ctypes.addressof(lay) for lay in structs], np.uintp)
    xn, normed = _host_input(x, layers[0][0], eps1)
    out = np.empty((B, T, hidden), np.float32)
    from . import n_threads  # the current setting (refresh() may change it)
    _check(lib.vlmc_decode_layers(ptrs.ctypes.data, kv.ctypes.data, nl, xn.ctypes.data,
                                  None if normed is None else normed.ctypes.data, B, T, tables[0][0], tables[0][1],
                                  ca, cl, None if inputs is None else inputs[1].ctypes.data,
                                  0 if inputs is None else inputs[2], out.ctypes.data, n_threads), "decode_layers")
    if shared:
        return out
    for cache, view, rec, (off, sizes) in zip(caches, views, kv, layouts):
        if rec["inplace"]:
            for _ in range(T):
                cache.advance_host()
            continue
        parts = _stored_step(new, view[0], off, sizes, B, T, kv_heads)
        if view[0] == _DENSE:
            append_lazy(cache, *parts)
        elif view[0] == _TURBO:
            kc, vc, kn, vn = parts
            append_parts_lazy(cache, {"k": {"codes": kc, "norms": kn}, "v": {"codes": vc, "norms": vn}})
        else:
            kc, vc, ks, kb, vs, vb = parts
            append_parts_lazy(cache, {"k": {"codes": kc, "scales": ks, "biases": kb},
                                      "v": {"codes": vc, "scales": vs, "biases": vb}})
    return out
