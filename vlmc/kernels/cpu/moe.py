"""Routed experts on the cpu target: a loop over the experts a step selected, each running
the tokens routed to it through the compact-weight kernels (GEMV for a decode step's few
rows, GEMM for prefill), so a step reads only the selected experts' weights, in whatever
format they are stored (float, bf16, affine or microscaling codes).

Each expert's [out, in] weight is a zero-copy slice of the stacked tensor (a QuantWeight's
codes, scales and biases sliced alike), made once per stacked weight.
"""
from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx
import numpy as np

from ..quant import QuantWeight

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
