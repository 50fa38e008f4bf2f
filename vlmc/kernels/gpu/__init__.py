"""Custom GPU kernels for the ``metal`` and ``cuda`` targets.

Each kernel is a CUDA body (``NAME.cu``, for ``mx.fast.cuda_kernel``) and a Metal body
(``NAME.metal``, for ``mx.fast.metal_kernel``) with the same inputs, outputs and template
parameters, plus the pure-MLX op of the same name and signature in
``vlmc.kernels.reference``, which is the test oracle and the fallback: on a machine
with neither GPU backend, or for inputs a kernel does not cover, the reference runs.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from .. import reference as _reference

SOURCES = Path(__file__).resolve().parent
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def backend() -> str | None:
    """'cuda' or 'metal' when MLX runs on that GPU, else None."""
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def source(name: str, backend_name: str) -> str:
    return (SOURCES / f"{name}.{'cu' if backend_name == 'cuda' else 'metal'}").read_text()


@lru_cache(maxsize=None)
def _kernel(name: str, backend_name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    make = mx.fast.cuda_kernel if backend_name == "cuda" else mx.fast.metal_kernel
    return make(name=name, input_names=list(inputs), output_names=list(outputs),
                source=source(name, backend_name))


def _block(n: int) -> int:
    """Threads per row: about 4 elements each, a multiple of 32, at most 1024."""
    return min(1024, max(32, (n // 4 + 31) // 32 * 32))


def add_rms_norm(a: mx.array, b: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(h, y) = (a + b, rms_norm(a + b) * w) in one pass over the row."""
    be = backend()
    if (be is None or a.shape != b.shape or a.dtype != b.dtype or a.dtype not in KERNEL_DTYPES
            or w.ndim != 1 or a.ndim == 0 or w.shape[0] != a.shape[-1] or a.size == 0):
        return _reference.add_rms_norm(a, b, w, eps)
    n = a.shape[-1]
    block = _block(n)
    kernel = _kernel("add_rms_norm", be, ("a", "b", "w", "eps"), ("h", "y"))
    h, y = kernel(inputs=[a, b, w.astype(a.dtype), mx.array([eps], mx.float32)],
                  template=[("T", a.dtype), ("N", n), ("BLOCK", block)],
                  grid=(a.size // n * block, 1, 1), threadgroup=(block, 1, 1),
                  output_shapes=[a.shape, a.shape], output_dtypes=[a.dtype, a.dtype])
    return h, y
