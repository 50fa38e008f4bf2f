"""The op library of the ``cpu`` target: the reference ops, with matmuls replaced by the
CPU kernels (``vlmc.kernels.cpu``): compact-weight GEMV for decode, float32 BLAS GEMM for
prefill. Same names and signatures as ``reference``; results agree within the tolerances
stated in tests/test_cpu_kernels.py."""
from __future__ import annotations

from .reference import *  # noqa: F401,F403  (every op not overridden below)
from .cpu import linear, qembedding, qlinear  # noqa: F401
