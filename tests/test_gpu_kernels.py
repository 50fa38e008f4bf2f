"""vlmc's GPU kernels (vlmc.kernels.gpu) against their pure-MLX references.

On a machine without MLX's CUDA or Metal backend only the fallbacks and the source
files are checked; with one (run on a GPU machine: ``pytest tests/test_gpu_kernels.py``)
every kernel is compared with the reference. Tolerances: float32 1e-5 relative;
bfloat16/float16 outputs within 2 units in the last place of the output type (the
kernel and MLX round the same float32 value, possibly after different summation orders).
"""
from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import gpu, gpu_ops, reference

GPU = gpu.backend()
needs_gpu = pytest.mark.skipif(GPU is None, reason="no MLX GPU backend (CUDA or Metal) on this machine")
KERNELS = {"add_rms_norm": (("a", "b", "w", "eps"), ("h", "y"), ("T", "N", "BLOCK"))}


def _close(out, ref, dtype):
    out = np.asarray(out.astype(mx.float32))
    ref = np.asarray(ref.astype(mx.float32))
    if dtype == mx.float32:
        assert np.abs(out - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)
    else:
        ulp = {mx.bfloat16: 2.0 ** -7, mx.float16: 2.0 ** -10}[dtype]
        assert (np.abs(out - ref) <= 2 * ulp * np.maximum(np.abs(ref), 1e-3)).all()


@pytest.mark.parametrize("name", KERNELS)
def test_both_sources_exist_and_use_the_same_names(name):
    inputs, outputs, template = KERNELS[name]
    for be in ("cuda", "metal"):
        src = gpu.source(name, be)
        for ident in (*inputs, *outputs, *template):
            assert re.search(rf"\b{ident}\b", src), f"{name}.{be} does not use {ident}"
    assert callable(getattr(reference, name)) and getattr(gpu_ops, name) is getattr(gpu, name)


def test_reference_add_rms_norm_is_add_then_norm():
    a, b = mx.random.normal((3, 5, 64)), mx.random.normal((3, 5, 64))
    w = mx.random.normal((64,))
    h, y = reference.add_rms_norm(a, b, w, 1e-6)
    assert mx.array_equal(h, a + b)
    assert mx.allclose(y, mx.fast.rms_norm(a + b, w, 1e-6), atol=1e-6)


def test_without_a_gpu_the_reference_runs(monkeypatch):
    monkeypatch.setattr(gpu, "backend", lambda: None)
    a, b, w = mx.ones((2, 8)), mx.ones((2, 8)), mx.ones((8,))
    h, y = gpu.add_rms_norm(a, b, w, 1e-6)
    assert mx.array_equal(h, a + b) and mx.allclose(y, mx.ones((2, 8)), atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1536), (4, 37, 1536), (2, 3, 64), (1, 7, 3584), (5, 8960)])
def test_add_rms_norm_kernel_matches_reference(dtype, shape):
    mx.random.seed(sum(shape))
    a, b = (mx.random.normal(shape).astype(dtype) for _ in range(2))
    w = (1 + 0.1 * mx.random.normal((shape[-1],))).astype(dtype)
    h, y = gpu.add_rms_norm(a, b, w, 1e-6)
    rh, ry = reference.add_rms_norm(a, b, w, 1e-6)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == a.shape
    assert mx.array_equal(h, rh)  # the same rounded sum
    _close(y, ry, dtype)
