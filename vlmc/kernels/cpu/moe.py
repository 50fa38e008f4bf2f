"""Routed experts on the cpu target, reading only the experts a step selected, in whatever
format they are stored (float, bf16, affine codes of any width).

``fused_experts``: one C call per MoE layer and step (``vlmc_moe_experts`` in ``moe.c``)
that runs, per selected expert, its rows' gate_up GEMV, the gated activation and the down
GEMV, and sums the results with the routing weights: the same kernels in the same order as
the loop below, so the same float32 to the last bit, without a Python round trip per expert.
It covers the rows the GEMVs serve (a decode step, a verify chunk: up to ``FUSED_MAX_ROWS``);
its weights' kernel arguments are built once per stacked weight pair.

``fused_block``: the whole MoE block (``moe_block``: router GEMV, softmax, top-k, the routed
experts and the gated shared expert; or Gemma 4's routed part: the router on its own input,
per-expert scales, no shared expert) in one C call (``vlmc_moe_block_ex``) for a decode or
verify step's rows (up to ``GEMV_MAX_ROWS``); the op falls back to the separate ops.

``routed_experts``: the loop over the selected experts through the compact-weight kernels
(GEMV for few rows, the int8 GEMM for prefill: each row's result the GEMV's bit for bit
where the int8 kernels run), each expert's [out, in] weight a zero-copy slice of the
stacked tensor (a QuantWeight's codes, scales and biases sliced alike), made once per
stacked weight. It runs where the fused call does not apply.
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Callable

import mlx.core as mx
import numpy as np

from ..quant import QuantWeight
from . import SUPPORTED_BITS, _ST, _check, _get_lib, _host, _q_params, enabled
from .decode_layer import _Proj, _proj
from .host import SIGMOID_SCALE

# rows (tokens) up to which the fused call runs: past it, prefill's many rows per expert
# go through the int8 GEMM of the loop, which reads each expert once for all of them
FUSED_MAX_ROWS = 64

_I, _F, _L = ctypes.c_int, ctypes.c_float, ctypes.c_int64


class _Experts(ctypes.Structure):
    _fields_ = [("p", _Proj), ("w_stride", _L), ("s_stride", _L), ("b_stride", _L)]


class _Moe(ctypes.Structure):
    _fields_ = [("experts", _I), ("hidden", _I), ("inter", _I), ("act_a", _F), ("act_c", _F),
                ("gate_up", _Experts), ("down", _Experts)]


def _stacked(w) -> _Experts | None:
    """The kernel's view of a stacked [E, N, K] expert weight, or None where it reads none."""
    if isinstance(w, QuantWeight):
        c, s, b = w.weight, w.scales, w.biases
        if (w.mode != "affine" or b is None or w.bits not in SUPPORTED_BITS or c.ndim != 3 or c.dtype != mx.uint32
                or s.ndim != 3 or s.shape != b.shape or s.shape[:2] != c.shape[:2] or s.dtype not in _ST
                or b.dtype not in _ST or (c.shape[2] * 32) % w.bits
                or s.shape[2] * w.group_size != c.shape[2] * 32 // w.bits):
            return None
        sh, bh, st = _q_params(s, b)
        E, N, K = c.shape[0], c.shape[1], c.shape[2] * 32 // w.bits
        return _Experts(_Proj(2, N, K, w.bits, w.group_size, st, _host(c).ptr, sh.ptr, bh.ptr, None),
                        c[0].nbytes, sh.arr[0].nbytes, bh.arr[0].nbytes)
    if not isinstance(w, mx.array) or w.ndim != 3 or w.dtype not in (mx.float32, mx.bfloat16):
        return None
    h = _host(w)
    return _Experts(_Proj(0 if w.dtype == mx.float32 else 1, w.shape[1], w.shape[2], 0, 0, 0, h.ptr, None, None,
                          None), h.arr[0].nbytes, 0, 0)


# (id(gate_up), id(down), kind) -> (down, _Moe or None); the entry leaves with gate_up (it
# holds down, which the same layer owns anyway, never gate_up: that would keep it alive)
_plans: dict[tuple, tuple] = {}


def _plan(gate_up, down, kind: str) -> _Moe | None:
    key = (id(gate_up), id(down), kind)
    hit = _plans.get(key)
    if hit is not None and hit[0] is down:
        return hit[1]
    gu, dn = _stacked(gate_up), _stacked(down)
    plan = None
    if gu is not None and dn is not None and kind in SIGMOID_SCALE:
        E = (gate_up.weight if isinstance(gate_up, QuantWeight) else gate_up).shape[0]
        E_down = (down.weight if isinstance(down, QuantWeight) else down).shape[0]
        H, I2 = gu.p.K, gu.p.N
        if E == E_down and I2 % 2 == 0 and dn.p.N == H and dn.p.K == I2 // 2:
            plan = _Moe(E, H, I2 // 2, *SIGMOID_SCALE[kind], gu, dn)
    try:
        weakref.finalize(gate_up, _plans.pop, key, None)
    except TypeError:  # not weak-referenceable: nothing to key a cache on
        return plan
    _plans[key] = (down, plan)
    return plan


def fused_experts(x, weights, experts, gate_up, down, kind: str) -> np.ndarray | None:
    """``reference.moe_experts`` in one C call, as a float32 host array [.., H], or None
    (the caller runs the loop): no kernels, more than FUSED_MAX_ROWS rows, weights the
    kernels do not read."""
    lib = _get_lib()
    if lib is None or not enabled():
        return None
    lead = tuple(x.shape[:-1])
    rows = int(np.prod(lead)) if lead else 1
    if not 1 <= rows <= FUSED_MAX_ROWS:
        return None
    plan = _plan(gate_up, down, kind)
    if plan is None or x.shape[-1] != plan.hidden:
        return None
    xh = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(rows, plan.hidden))
    k = experts.shape[-1]
    idx = np.ascontiguousarray(np.asarray(experts).reshape(rows, k), dtype=np.int32)
    wts = np.ascontiguousarray(np.asarray(weights, dtype=np.float32).reshape(rows, k))
    out = np.empty((rows, plan.hidden), np.float32)
    from . import n_threads  # the current setting (refresh() may change it)
    _check(lib.vlmc_moe_experts(ctypes.addressof(plan), xh.ctypes.data, rows, k, idx.ctypes.data, wts.ctypes.data,
                                out.ctypes.data, n_threads), "moe_experts")
    return out.reshape(*lead, plan.hidden)


class _MoeLayer(ctypes.Structure):
    _fields_ = [("moe", _Moe), ("router", _Proj), ("top_k", _I), ("normalize", _I), ("shared_inter", _I),
                ("shared_gate_up", _Experts), ("shared_down", _Experts), ("shared_gate", _Proj)]


# id(router) -> (the block's other weights, top_k, normalize, kind, _MoeLayer or None); the
# entry leaves with the router (it holds the other weights, which the same layer owns)
_blocks: dict[int, tuple] = {}


def _block_plan(router, gate_up, down, shared: tuple, top_k: int, normalize: bool, kind: str) -> _MoeLayer | None:
    key, rest = id(router), (gate_up, down, *shared)
    hit = _blocks.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], rest)) and hit[1:4] == (top_k, normalize, kind):
        return hit[4]
    plan = None
    moe, rp = _plan(gate_up, down, kind), _proj(router, None)
    sp = [None if w is None else _proj(w, None) for w in shared]
    if moe is not None and rp is not None and rp.N == moe.experts and 1 <= top_k <= moe.experts and \
            (shared[0] is None or None not in sp):
        s_inter = sp[0].N // 2 if sp[0] is not None else 0
        gu, dn = (_Experts(p, 0, 0, 0) if p is not None else _Experts() for p in sp[:2])
        plan = _MoeLayer(moe, rp, top_k, int(bool(normalize)), s_inter, gu, dn, sp[2] or _Proj())
    try:
        weakref.finalize(router, _blocks.pop, key, None)
    except TypeError:  # not weak-referenceable: nothing to key a cache on
        return plan
    _blocks[key] = (rest, top_k, normalize, kind, plan)
    return plan


def fused_block(x, router, gate_up, down, shared_gate_up=None, shared_down=None, shared_gate=None,
                router_x=None, expert_scale=None, *, top_k: int, normalize: bool, kind: str, routing: bool = False):
    """``reference.moe_block`` in one C call (``vlmc_moe_block_ex``), as a float32 host array
    [.., H] (with ``routing``: and the experts [.., K] int32 and weights [.., K] it chose,
    per-expert scales applied), or None (the caller runs the separate ops): no kernels, more
    rows than the GEMVs take (``GEMV_MAX_ROWS``: the router's logits are then the op path's
    to the bit), weights the kernels do not read, a shared expert without all three of its
    weights, a router input or expert scales of another shape."""
    from . import GEMV_MAX_ROWS, n_threads  # the current settings (refresh() may change them)
    lib = _get_lib()
    if lib is None or not enabled():
        return None
    lead = tuple(x.shape[:-1])
    rows = int(np.prod(lead)) if lead else 1
    shared = (shared_gate_up, shared_down, shared_gate)
    if not 1 <= rows <= GEMV_MAX_ROWS or (shared_gate_up is None) != (shared_down is None) \
            or (shared_gate_up is None) != (shared_gate is None):
        return None
    plan = _block_plan(router, gate_up, down, shared, top_k, normalize, kind)
    if plan is None or x.shape[-1] != plan.moe.hidden:
        return None
    if (router_x is not None and tuple(router_x.shape) != tuple(x.shape)) or \
            (expert_scale is not None and tuple(expert_scale.shape) != (plan.moe.experts,)):
        return None
    xh = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(rows, plan.moe.hidden))
    rx = None if router_x is None else np.ascontiguousarray(np.asarray(router_x, dtype=np.float32)).reshape(rows, -1)
    es = None if expert_scale is None else _scales(expert_scale)
    out = np.empty((rows, plan.moe.hidden), np.float32)
    idx, wts = np.empty((rows, top_k), np.int32), np.empty((rows, top_k), np.float32)
    _check(lib.vlmc_moe_block_ex(ctypes.addressof(plan), xh.ctypes.data, None if rx is None else rx.ctypes.data,
                                 None if es is None else es.ctypes.data, rows, out.ctypes.data, idx.ctypes.data,
                                 wts.ctypes.data, n_threads), "moe_block")
    out = out.reshape(*lead, plan.moe.hidden)
    return (out, idx.reshape(*lead, top_k), wts.reshape(*lead, top_k)) if routing else out


# id(expert scales) -> their float32 host copy (a parameter, converted once); the entry
# leaves with them
_scale_copies: dict[int, np.ndarray] = {}


def _scales(s) -> np.ndarray:
    got = _scale_copies.get(id(s))
    if got is not None:
        return got
    got = np.ascontiguousarray(np.asarray(s.astype(mx.float32) if isinstance(s, mx.array) else s, dtype=np.float32))
    try:
        weakref.finalize(s, _scale_copies.pop, id(s), None)
    except TypeError:  # not weak-referenceable: nothing to key a cache on
        return got
    _scale_copies[id(s)] = got
    return got


_views: dict[int, list] = {}


def expert_views(w) -> list:
    """Expert e's weight as ``views[e]`` for a stacked [E, out, in] mx.array or QuantWeight."""
    key = id(w)
    got = _views.get(key)
    if got is not None:
        return got
    if isinstance(w, QuantWeight):
        got = [QuantWeight(w.weight[e], w.scales[e], None if w.biases is None else w.biases[e], w.bits,
                           w.group_size, w.mode) for e in range(w.weight.shape[0])]
        mx.eval([a for q in got for a in (q.weight, q.scales, q.biases) if a is not None])
    else:
        got = [w[e] for e in range(w.shape[0])]
        mx.eval(got)
    try:
        weakref.finalize(w, _views.pop, key, None)
    except TypeError:  # not weak-referenceable: nothing to key a cache on
        return got
    _views[key] = got
    return got


def routed_experts(x, weights, experts, gate_up, down, *, glu: Callable, linear: Callable,
                   qlinear: Callable) -> np.ndarray:
    """x [.., H] (float32, host or MLX) through its selected experts, as
    ``reference.moe_experts``: per expert (ascending, as transformers sums them), its
    tokens' gate_up, ``glu``, down, scaled by their routing weights and added."""
    xh = np.asarray(x, dtype=np.float32)
    lead, h = xh.shape[:-1], xh.shape[-1]
    xh = xh.reshape(-1, h)
    k = experts.shape[-1]
    idx = np.asarray(experts).reshape(-1, k)
    wts = np.asarray(weights, dtype=np.float32).reshape(-1, k)
    gus, downs = expert_views(gate_up), expert_views(down)
    out = np.zeros((xh.shape[0], downs[0].shape[0]), np.float32)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        gu = _apply(xh[rows], gus[e], linear, qlinear)
        half = gu.shape[-1] // 2
        y = _apply(np.asarray(glu(gu[:, :half], gu[:, half:])), downs[e], linear, qlinear)
        out[rows] += y * wts[rows, slot, None]
    return out.reshape(*lead, out.shape[-1])


def _apply(x: np.ndarray, w, linear: Callable, qlinear: Callable) -> np.ndarray:
    y = qlinear(np.ascontiguousarray(x), w) if isinstance(w, QuantWeight) else linear(np.ascontiguousarray(x), w)
    return np.asarray(y, dtype=np.float32)
