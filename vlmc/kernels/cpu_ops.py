"""The op library of the ``cpu`` target: the reference ops, with matmuls replaced by the
CPU kernels (``vlmc.kernels.cpu``): compact-weight GEMV for decode, float32 BLAS GEMM for
prefill, and BLAS attention for many query rows (prefill, vision). Same names and
signatures as ``reference``; results agree within the tolerances stated in
tests/test_cpu_kernels.py."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import reference as _reference
from .reference import *  # noqa: F401,F403  (every op not overridden below)

from . import cpu as _cpu
from .cpu import linear, qembedding, qlinear  # noqa: F401
from . import kv_quant as _kv_quant
from .cpu.attention import attention as _blas_attention
from .cpu.kv_decode import kv_affine_decode as _kv_affine_decode, kv_dense_decode as _kv_dense_decode, \
    kv_turbo_decode as _kv_turbo_decode


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, *,
              scale: float) -> mx.array:
    return _blas_attention(q, k, v, mask, scale=scale, enabled=_cpu.enabled())


def cached_attention(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None = None,
                     *, scale: float) -> mx.array:
    if _cpu.enabled():  # decode steps read the cache in place: dense, affine or TurboQuant (C kernels)
        out = _kv_quant.coded_decode_step(q, k, v, cache, mask, scale=scale, affine=_kv_affine_decode,
                                          turbo=_kv_turbo_decode, dense=_kv_dense_decode)
        if out is not None:
            return out
    q, keys, values, finish = cache.attention_inputs(q, k, v)
    return finish(attention(q, keys, values, cache.mask_for(mask, q.shape[2]), scale=scale))


# MLX's CPU backend computes sigmoid/exp elementwise at ~90 ms for a [1024, 5120] float32
# array, numpy in ~14 ms (measured on this 2-core machine): a vision layer's activation and
# a prefill's gated MLP go through numpy from this many elements on; decode stays on MLX.
NUMPY_ACT_MIN_ELEMS = 1 << 15
_SIGMOID_SCALE = {"silu": 1.0, "quick_gelu": 1.702}


def _numpy_act_ok(x: mx.array, kind: str) -> bool:
    return _cpu.enabled() and kind in _SIGMOID_SCALE and x.dtype == mx.float32 and x.size >= NUMPY_ACT_MIN_ELEMS


def _sigmoid_gate(xn: np.ndarray, kind: str) -> np.ndarray:
    """x * sigmoid(a x) = x / (1 + exp(-a x)), in one fresh array."""
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative x: x / inf = -0, as wanted
        e = np.exp(xn * np.float32(-_SIGMOID_SCALE[kind]))
    e += np.float32(1.0)
    np.divide(xn, e, out=e)
    return e


def act(x: mx.array, kind: str) -> mx.array:
    if not _numpy_act_ok(x, kind):
        return _reference.act(x, kind)
    return mx.array(_sigmoid_gate(np.asarray(x), kind))


def glu(gate: mx.array, up: mx.array, kind: str) -> mx.array:
    if not _numpy_act_ok(gate, kind) or up.shape != gate.shape or up.dtype != mx.float32:
        return _reference.glu(gate, up, kind)
    out = _sigmoid_gate(np.asarray(gate), kind)
    out *= np.asarray(up)
    return mx.array(out)
