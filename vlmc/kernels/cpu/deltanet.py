"""A Gated DeltaNet layer's decode step in one C call (``vlmc_deltanet_layers`` in
``deltanet.c``), the cpu target's fast path for the ``deltanet_layer`` lowering (Qwen3.5's
linear-attention layers): the norm, the four in-projections, the causal conv step, the
L2-normed heads, the gates, the delta-rule recurrence, the gated norm, the output
projection and the gated MLP, instead of some 25 op calls, several of them lazy MLX graphs.

It applies to a decode step (one new token per sequence, up to GEMV_MAX_ROWS sequences,
never a prompt's rows) whose caches are ``StateCache``s holding a state (after a prompt).
Any other step of ``StateCache``s (a prompt chunk, a verify step's several tokens, a fresh
cache, more sequences) takes the prompt path (``_prompt_layers``): the layer's norms,
projections and MLP as the generated body's ``cpu_ops`` calls, the part between the in-
and output projections in one C call (``vlmc_deltanet_prompt`` in ``deltanet_prompt.c``,
the recurrence token by token). Otherwise it returns None (the generated layer then runs
its ops). The C code reads the cache's conv inputs and state and writes new ones; the step
is then recorded in the cache through its own interface (``conv_step``, ``delta_step``)
with the same inputs the ops would record (conv inputs; l2-normed keys, values, decays,
rates), so rewinding (``trim``), batch reshaping and prefix snapshots work on it as on an
op step. The result is the ops' to float32 rounding (the C reductions sum in their own
order, the ops' prompts use the chunked form), and a row's result depends neither on the
other rows of the batch nor on where its prompt was cut into chunks.
"""
from __future__ import annotations

import ctypes
import weakref

import mlx.core as mx
import numpy as np

from ..step_rows import in_prompt
from . import GEMV_MAX_ROWS, _check, _get_lib, enabled
from . import scratch as _scratch
from .decode_layer import _host_input, _Proj, _proj
from .host import SIGMOID_SCALE, param

_I, _F, _P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class _DeltaNet(ctypes.Structure):
    _fields_ = [("hidden", _I), ("key_heads", _I), ("value_heads", _I), ("key_dim", _I), ("value_dim", _I),
                ("conv_kernel", _I), ("inter", _I),
                ("eps1", _F), ("eps2", _F), ("eps_o", _F), ("scale", _F), ("act_a", _F), ("act_c", _F),
                ("norm1", _P), ("norm2", _P), ("conv_w", _P), ("a_log", _P), ("dt_bias", _P), ("o_norm", _P),
                ("qkv", _Proj), ("z", _Proj), ("b", _Proj), ("a", _Proj), ("out", _Proj), ("gate_up", _Proj),
                ("down", _Proj)]


class _State(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("conv", "state", "rows", "conv_out", "state_out", "k", "v", "g", "beta")]


# the order of a layer's weights (the fast path op's params)
WEIGHTS = ("norm1", "qkv", "z", "b", "a", "conv_w", "a_log", "dt_bias", "o_norm", "out", "norm2", "gate_up", "down")

# id(norm1 weight) -> (the other weights, attrs, (_DeltaNet, host arrays it points to) or None)
_layers: dict[int, tuple] = {}


def _layer(weights: tuple, attrs: tuple):
    if len(weights) != len(WEIGHTS) or not isinstance(weights[0], mx.array):
        return None
    key = id(weights[0])
    hit = _layers.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], weights[1:])) and hit[1] == attrs:
        return hit[2]
    w = dict(zip(WEIGHTS, weights))
    eps1, eps2, eps_o, hk, hv, dk, dv, kern, inter, scale, act = attrs
    projs = {n: _proj(w[n], None) for n in ("qkv", "z", "b", "a", "out", "gate_up", "down")}
    host = {n: np.ascontiguousarray(param(w[n]), dtype=np.float32)
            for n in ("norm1", "norm2", "conv_w", "a_log", "dt_bias", "o_norm")}
    chans = 2 * hk * dk + hv * dv
    shapes = {"norm1": (host["norm1"].shape[0],), "norm2": host["norm1"].shape, "conv_w": (chans, kern),
              "a_log": (hv,), "dt_bias": (hv,), "o_norm": (dv,)}
    if any(p is None for p in projs.values()) or act not in SIGMOID_SCALE \
            or any(host[n].shape != s for n, s in shapes.items()):
        layer = None
    else:
        struct = _DeltaNet(host["norm1"].shape[0], hk, hv, dk, dv, kern, inter, eps1, eps2, eps_o, scale,
                           *SIGMOID_SCALE[act], *(host[n].ctypes.data for n in
                                                  ("norm1", "norm2", "conv_w", "a_log", "dt_bias", "o_norm")),
                           *(projs[n] for n in ("qkv", "z", "b", "a", "out", "gate_up", "down")))
        layer = (struct, host)
    if hit is None:
        weakref.finalize(weights[0], _layers.pop, key, None)
    _layers[key] = (weights[1:], attrs, layer)
    return layer


def _host_f32(a: mx.array, shape: tuple) -> np.ndarray | None:
    """A contiguous float32 host array of a cache's array (a view where it is one already)."""
    if a is None or tuple(a.shape) != shape:
        return None
    h = np.asarray(a if a.dtype == mx.float32 else a.astype(mx.float32))
    return h if h.flags.c_contiguous else np.ascontiguousarray(h)


def deltanet_layer(x, mask, cache, *weights, **attrs):
    """The layer's output [B, 1, hidden] as a host array, or None (the caller runs the ops):
    ``deltanet_layers`` over this one layer."""
    return deltanet_layers(x, mask, [cache], [weights], **attrs)


def deltanet_layers(x, mask, caches, layers, *, eps1: float, eps2: float, eps_o: float, key_heads: int,
                    value_heads: int, key_dim: int, value_dim: int, conv_kernel: int, inter: int, scale: float,
                    act: str):
    """Consecutive Gated DeltaNet layers' decode step in one C call: layers[i] holds layer
    i's weights in ``WEIGHTS`` order, caches[i] its StateCache. The last layer's output, or
    None when any layer cannot take the C path (nothing has been computed or recorded)."""
    lib = _get_lib()
    f32 = x.dtype == np.float32 if type(x) is np.ndarray else isinstance(x, mx.array) and x.dtype == mx.float32
    if (lib is None or not enabled() or not f32 or x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or not layers
            or len(layers) != len(caches) or len({id(c) for c in caches}) != len(caches)):
        return None
    B, hidden = x.shape[0], x.shape[2]
    attrs = (eps1, eps2, eps_o, key_heads, value_heads, key_dim, value_dim, conv_kernel, inter, scale, act)
    found = [_layer(tuple(w), attrs) for w in layers]
    if any(f is None or f[0].hidden != hidden for f in found):
        return None
    if in_prompt() or x.shape[1] != 1 or B > GEMV_MAX_ROWS or any(getattr(c, "state", None) is None for c in caches):
        return _prompt_layers(lib, x, mask, caches, layers, found, attrs)
    if mask is not None and not bool(np.asarray(mask[:, 0, -1, -1]).all()):
        return None  # a row whose token the mask hides (padding): the ops zero it
    chans = 2 * key_heads * key_dim + value_heads * value_dim
    conv_shape, state_shape = (B, conv_kernel - 1, chans), (B, value_heads, key_dim, value_dim)
    befores = []
    for c in caches:
        if getattr(c, "layout", None) != "recurrent" or getattr(c, "_open", None) is not None:
            return None
        conv, state = getattr(c, "conv", None), getattr(c, "state", None)
        if conv is None or state is None:
            return None  # a fresh cache: the ops start it
        hc, hs = _host_f32(conv, conv_shape), _host_f32(state, state_shape)
        if hc is None or hs is None:
            return None
        befores.append((conv, state, hc, hs))
    # each layer's step outputs: the state after in one buffer, its records (rows, conv after,
    # k, v, g, beta) in another, so the records a cache keeps for many steps do not pin the
    # states it drops (a row slice keeps its whole buffer alive)
    sizes = [B * chans, B * (conv_kernel - 1) * chans, B * value_heads * key_dim * value_dim,
             B * value_heads * key_dim, B * value_heads * value_dim, B * value_heads, B * value_heads]
    outs = np.empty((len(layers), sizes[2]), np.float32)
    rec_outs = np.empty((len(layers), sum(sizes) - sizes[2]), np.float32)
    recs = []
    for i, (_, _, hc, hs) in enumerate(befores):
        parts, at = [], 0
        for j, n in enumerate(sizes):
            if j == 2:
                parts.append(outs[i])
                continue
            parts.append(rec_outs[i, at:at + n])
            at += n
        recs.append((hc.ctypes.data, hs.ctypes.data, *(p.ctypes.data for p in parts)))
    states = (_State * len(layers))(*(_State(*r) for r in recs))
    ptrs = (ctypes.c_void_p * len(layers))(*(ctypes.addressof(f[0]) for f in found))
    xn, normed = _host_input(x, layers[0][0], eps1)
    out = np.empty((B, 1, hidden), np.float32)
    from . import n_threads
    _check(lib.vlmc_deltanet_layers(ptrs, states, len(layers), xn.ctypes.data,
                                    None if normed is None else normed.ctypes.data, B, out.ctypes.data, n_threads),
           "deltanet_layers")
    for cache, (conv, state, _, _), row, state_after in zip(caches, befores, mx.array(rec_outs), mx.array(outs)):
        parts, at = [], 0
        for n in sizes[:2] + sizes[3:]:
            parts.append(row[at:at + n])
            at += n
        rows, conv_after, k, v, g, beta = parts
        cache.conv_step(conv, rows.reshape(B, 1, chans), conv_after.reshape(conv_shape))
        heads = (B, value_heads, 1)
        cache.delta_step(state, k.reshape(*heads, key_dim), v.reshape(*heads, value_dim), g.reshape(heads),
                         beta.reshape(heads), state_after.reshape(state_shape))
    return out


def _prompt_layers(lib, x, mask, caches, layers, found, attrs):
    """A prompt chunk (or any step of several tokens) through consecutive DeltaNet layers:
    per layer the norm, the projections and the MLP as the generated body computes them
    (the same ``cpu_ops`` calls: the int8 GEMM or BLAS for a prompt's rows), the part
    between the in- and output projections in one C call (``vlmc_deltanet_prompt``: the
    conv, heads, gates, the recurrence token by token, the gated norm) in place of the
    ops' MLX graph. The cache records the step through ``conv_step`` and ``delta_step``
    with the inputs the ops would record. None (nothing computed) when a cache cannot
    take it."""
    from .. import cpu_ops as ops  # cpu_ops imports this module
    from . import n_threads
    eps1, eps2, eps_o, hk, hv, dk, dv, kern, inter, scale, act = attrs
    B, T, hidden = x.shape
    chans = 2 * hk * dk + hv * dv
    conv_shape, state_shape = (B, kern - 1, chans), (B, hv, dk, dv)
    befores = []
    for c in caches:
        if getattr(c, "layout", None) != "recurrent" or getattr(c, "_open", None) is not None:
            return None
        conv, state = getattr(c, "conv", None), getattr(c, "state", None)
        if (conv is None) != (state is None):
            return None
        if conv is None:
            befores.append((None, None))
            continue
        hc, hs = _host_f32(conv, conv_shape), _host_f32(state, state_shape)
        if hc is None or hs is None:
            return None
        befores.append(((conv, hc), (state, hs)))
    keep = None
    if mask is not None:  # zero_padded: rows the mask hides from themselves are padding
        m = np.asarray(mask)
        diag = np.diagonal(m[:, 0, :, m.shape[-1] - T:], axis1=1, axis2=2)
        if not diag.all():
            keep = diag[..., None].astype(np.float32)

    def lin(v, w):
        return ops.qlinear(v, w) if hasattr(w, "scales") else ops.linear(v, w)

    def host(v) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(v), dtype=np.float32)

    for (struct, _), w, cache, (conv, state) in zip(found, layers, caches, befores):
        norm1, qkv_w, z_w, b_w, a_w, _, _, _, _, out_w, norm2, gu_w, d_w = w
        n = ops.rms_norm(x, norm1, eps=eps1)
        if keep is not None:
            n = host(n) * keep
        rows, z, b, a = (host(lin(n, p)) for p in (qkv_w, z_w, b_w, a_w))
        outs = [_scratch.empty(s) for s in (conv_shape, state_shape, (B, hv, T, dk), (B, hv, T, dv), (B, hv, T),
                                            (B, hv, T))]
        o = _scratch.empty((B, T, hv * dv))
        work = _scratch.empty((B * T * (chans + 2 * hv * dk) + (kern + 1) * chans,))
        st = _State(None if conv is None else conv[1].ctypes.data, None if state is None else state[1].ctypes.data,
                    rows.ctypes.data, *(a_.ctypes.data for a_ in outs))
        _check(lib.vlmc_deltanet_prompt(ctypes.byref(struct), ctypes.byref(st), B, T, a.ctypes.data, b.ctypes.data,
                                        z.ctypes.data, o.ctypes.data, work.ctypes.data, n_threads),
               "deltanet_prompt")
        del work
        conv_after, state_after, k, v, g, beta = (mx.array(a_) for a_ in outs)
        cache.conv_step(mx.zeros(conv_shape, mx.float32) if conv is None else conv[0], mx.array(rows), conv_after)
        cache.delta_step(mx.zeros(state_shape, mx.float32) if state is None else state[0], k, v, g, beta,
                         state_after)
        x = ops.add(x, lin(o, out_w))
        gate, up = ops.split(lin(ops.rms_norm(x, norm2, eps=eps2), gu_w), sizes=[inter, inter], axis=-1)
        x = ops.add(x, lin(ops.glu(gate, up, kind=act), d_w))
    return x
