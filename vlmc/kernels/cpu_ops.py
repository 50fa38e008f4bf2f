"""The op library of the ``cpu`` target: the reference ops, with matmuls replaced by the
CPU kernels (``vlmc.kernels.cpu``): compact-weight GEMV for decode, float32 BLAS GEMM for
prefill, and BLAS attention for many query rows (prefill, vision). Same names and
signatures as ``reference``; results agree within the tolerances stated in
tests/test_cpu_kernels.py."""
from __future__ import annotations

import mlx.core as mx

from .reference import *  # noqa: F401,F403  (every op not overridden below)

from . import cpu as _cpu
from .cpu import linear, qembedding, qlinear  # noqa: F401
from . import kv_quant as _kv_quant
from .cpu.attention import attention as _blas_attention
from .cpu.kv_decode import kv_affine_decode as _kv_affine_decode


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, *,
              scale: float) -> mx.array:
    return _blas_attention(q, k, v, mask, scale=scale, enabled=_cpu.enabled())


def cached_attention(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None = None,
                     *, scale: float) -> mx.array:
    if _cpu.enabled():  # decode over 4/8-bit affine codes in place (C kernel)
        out = _kv_quant.coded_decode_step(q, k, v, cache, mask, scale=scale, affine=_kv_affine_decode)
        if out is not None:
            return out
    q, keys, values, finish = cache.attention_inputs(q, k, v)
    return finish(attention(q, keys, values, cache.mask_for(mask, q.shape[2]), scale=scale))
