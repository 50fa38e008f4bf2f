"""One decode step's attention over an affine-coded KV cache, on the CPU, reading the
packed codes in place (``vlmc_kv_affine_decode`` in gemv.c): the CPU counterpart of the
GPU kernel ``kv_affine_decode``, with the same arguments and the same reference
(``vlmc.kernels.kv_quant.kv_affine_decode``). Decoding the whole cache to floats every
step (the reference) reads and writes several times the bytes the codes take."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import kv_quant as _kv_quant
from . import _check, _get_lib, _to_numpy


def _np(a: mx.array) -> np.ndarray:
    """A C-contiguous numpy view (bf16 as raw uint16) of an evaluated array."""
    return np.ascontiguousarray(_to_numpy(a))


def kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts, held: int, *,
                     scale: float, bits: int, group_size: int) -> mx.array:
    """float32 [B, H, D] attention of q [B, H, D] over the first ``held`` coded tokens."""
    lib = _get_lib()
    B, H, D = q.shape
    if (lib is None or bits not in (4, 8) or k_scales.dtype != mx.bfloat16 or D % group_size
            or k_codes.ndim != 4 or H % k_codes.shape[1]):
        return _kv_quant.kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts,
                                          held, scale=scale, bits=bits, group_size=group_size)
    mx.eval(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts)
    qn = _np(q.astype(mx.float32))
    arrays = [_np(a) for a in (k_codes, k_scales, k_biases, v_codes, v_scales, v_biases)]
    st = _np(starts.astype(mx.int32))
    out = np.empty((B, H, D), np.float32)
    from . import n_threads  # the current setting (refresh() may change it)
    _check(lib.vlmc_kv_affine_decode(qn.ctypes.data, *(a.ctypes.data for a in arrays), st.ctypes.data, B, H,
                                     k_codes.shape[1], D, k_codes.shape[2], held, bits, group_size, scale,
                                     out.ctypes.data, n_threads), "kv_affine_decode")
    return mx.array(out)
