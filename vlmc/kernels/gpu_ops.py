"""The op library of the ``metal`` and ``cuda`` targets: MLX's own kernels
(``reference``) with the custom kernels of ``vlmc.kernels.gpu`` where vlmc has one."""
from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from . import reference as _reference
from .reference import *  # noqa: F401,F403  (every op not overridden below)
from .gpu import add_rms_norm, backend, cached_attention  # noqa: F401,E402


@lru_cache(maxsize=None)
def block_scaled_matmul(mode: str) -> bool:
    """Whether MLX's ``qqmm`` (both operands in ``mode``) runs on this machine's GPU. Some
    MLX builds refuse GPUs below compute capability 10.0 (no block-scaled tensor cores),
    and only when the product is evaluated, so this evaluates one small product once."""
    if backend() != "cuda" or not hasattr(mx, "qqmm"):
        return False
    try:
        w = mx.quantize(mx.ones((128, 256), mx.bfloat16), mode=mode)
        mx.eval(mx.qqmm(mx.ones((1, 256), mx.bfloat16), w[0], w[1], mode=mode))
        return True
    except (RuntimeError, ValueError):
        return False


def qqlinear(x: mx.array, w, b: mx.array | None = None) -> mx.array:
    """``reference.qqlinear`` (x rounded to w's block format, then x @ w.T): through
    ``mx.qqmm`` where MLX runs it on this GPU, else emulated."""
    if not block_scaled_matmul(w.mode):
        return _reference.qqlinear(x, w, b)
    y = mx.qqmm(x.reshape(-1, x.shape[-1]), w.weight, w.scales, group_size=w.group_size, bits=w.bits, mode=w.mode)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y + b if b is not None else y
