"""A whole pre-norm decoder layer's decode step in one C call (``vlmc_decode_layer`` in
``decode_layer.c``), the cpu target's fast path for the ``decode_layer`` lowering.

The layer's ops stay in the generated code and compute the same thing; this runs instead
of them when it applies (one token per sequence, up to GEMV_MAX_ROWS sequences, a dense
float32 cache that is not a sliding window, weights the GEMV kernels read) and returns
None otherwise. It calls the same kernels in the same order, so the result is the op-by-op
path's to the last bit (where the first layer's input is an mx.array, from an embedding
table the kernels do not gather, the ops' first norm is MLX's: so it is here too). This step's keys and values go into the
cache in place where that is safe (``KVCache.host_writable``), else as a lazy write.

``decode_layers`` runs a whole stack of such layers in one C call (the generated code tries
it before its loop over the layers): all of them or, returning None, none; ``decode_layer``
is the same call for one layer."""
from __future__ import annotations

import ctypes
import weakref

import mlx.core as mx
import numpy as np

from .. import reference as _reference
from . import GEMV_MAX_ROWS, _check, _get_lib, _host, _unpack, enabled, qplan
from .host import SIGMOID_SCALE, param
from .kv_decode import append_lazy, dense_buffers, host_starts

_I, _F, _P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class _Proj(ctypes.Structure):
    _fields_ = [("kind", _I), ("N", _I), ("K", _I), ("bits", _I), ("gs", _I), ("st", _I),
                ("w", _P), ("scales", _P), ("biases", _P), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
                ("eps1", _F), ("eps2", _F), ("scale", _F), ("act_a", _F), ("norm1", _P), ("norm2", _P),
                ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj)]


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
    norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, d_w, d_b = weights
    eps1, eps2, heads, kv_heads, head_dim, inter, scale, act = attrs
    projs = [_proj(qkv_w, qkv_b), _proj(o_w, o_b), _proj(gu_w, gu_b), _proj(d_w, d_b)]
    if any(p is None for p in projs) or act not in SIGMOID_SCALE:
        layer = None
    else:
        layer = _Layer(heads * head_dim, heads, kv_heads, head_dim, inter, eps1, eps2, scale, SIGMOID_SCALE[act],
                       param(norm1).ctypes.data, param(norm2).ctypes.data, *projs)
    if hit is None:
        weakref.finalize(norm1, _layers.pop, key, None)
    _layers[key] = (weights[1:], attrs, layer)
    return layer


# every layer of a step passes the same rope tables: (weak refs to them, their host copies)
_last_tables: list = [lambda: None, lambda: None, None]


def _tables(cos, sin) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Contiguous float32 host copies of a step's rope tables and their addresses, converted
    once per step."""
    if _last_tables[0]() is cos and _last_tables[1]() is sin:
        return _last_tables[2]
    # copies (np.array, not a view): a view would keep the step's mx.arrays alive in this cache
    c, s = (np.array(t if not isinstance(t, mx.array) else t if t.dtype == mx.float32 else t.astype(mx.float32),
                     dtype=np.float32, copy=True, order="C") for t in (cos, sin))
    out = (c, s, c.ctypes.data, s.ctypes.data)
    try:
        _last_tables[:] = [weakref.ref(cos), weakref.ref(sin), out]
    except TypeError:  # numpy tables: not cached
        pass
    return out


def _step_inputs(x, cos, sin, head_dim: int):
    """(library, B, hidden, cos/sin addresses and row stride) when a step with this x and
    these rope tables can take the C path, else None."""
    lib = _get_lib()
    f32 = x.dtype == np.float32 if type(x) is np.ndarray else isinstance(x, mx.array) and x.dtype == mx.float32
    if (lib is None or not enabled() or not f32 or x.ndim != 3 or x.shape[1] != 1
            or not 1 <= x.shape[0] <= GEMV_MAX_ROWS):
        return None
    B = x.shape[0]
    c, s, c_ptr, s_ptr = _tables(cos, sin)
    if c.shape != s.shape or c.ndim != 4 or c.shape[0] not in (1, B) or c.shape[1:] != (1, 1, head_dim):
        return None
    return lib, B, x.shape[2], c_ptr, s_ptr, head_dim if c.shape[0] > 1 else 0


def _cache_buffers(cache, kv_heads: int, head_dim: int):
    if getattr(cache, "kv_heads", None) != kv_heads or getattr(cache, "head_dim", None) != head_dim:
        return None
    return dense_buffers(cache)


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
    ``decode_layers`` over this one layer."""
    return decode_layers(x, cos, sin, mask, [cache], [weights], **attrs)


def decode_layers(x, cos, sin, mask, caches, layers, *, eps1: float, eps2: float, heads: int, kv_heads: int,
                  head_dim: int, inter: int, scale: float, act: str):
    """A stack of such layers in one C call (``vlmc_decode_layers``): layers[i] holds layer
    i's weights as decode_layer takes them, caches[i] its cache. The last layer's output,
    or None when any layer could not take the C path (the caller then runs the layers one by
    one; nothing has been computed or stored)."""
    if not layers or len(layers) != len(caches):
        return None
    step = _step_inputs(x, cos, sin, head_dim)
    if step is None:
        return None
    lib, B, hidden, c_ptr, s_ptr, ca = step
    attrs = (eps1, eps2, heads, kv_heads, head_dim, inter, scale, act)
    structs = [_layer(w, attrs) for w in layers]
    if any(lay is None or lay.hidden != hidden for lay in structs):
        return None
    buffers = [_cache_buffers(c, kv_heads, head_dim) for c in caches]
    if any(b is None for b in buffers):
        return None
    nl = len(layers)
    # cached host views: a buffer written in place stays the same array from step to step
    ptrs = np.array([[_host(kb).ptr for kb, _ in buffers], [_host(vb).ptr for _, vb in buffers],
                     [ctypes.addressof(lay) for lay in structs]], np.uintp)
    inplace = [c.host_writable() for c in caches]
    sizes = np.array([[kb.shape[2] for kb, _ in buffers], [c.held for c in caches], inplace], np.int32)
    xn, normed = _host_input(x, layers[0][0], eps1)
    starts = host_starts(mask, B)
    new_kv = np.empty((nl, 2, B, kv_heads, 1, head_dim), np.float32)
    out = np.empty((B, 1, hidden), np.float32)
    from . import n_threads  # the current setting (refresh() may change it)
    _check(lib.vlmc_decode_layers(ptrs[2].ctypes.data, nl, xn.ctypes.data,
                                  None if normed is None else normed.ctypes.data, B, c_ptr, s_ptr, ca,
                                  ptrs[0].ctypes.data, ptrs[1].ctypes.data, starts.ctypes.data, sizes[0].ctypes.data,
                                  sizes[1].ctypes.data, sizes[2].ctypes.data, new_kv.ctypes.data, out.ctypes.data,
                                  n_threads), "decode_layers")
    for cache, (k, v), written in zip(caches, new_kv, inplace):
        if written:
            cache.advance_host()
        else:
            append_lazy(cache, k, v)
    return out
