"""The AMX tile kernels of the int8-x GEMVs (gemv.c's amx panels) against the AVX512-VNNI
panel kernels they stand in for: bit for bit the same output, on shapes that take every
edge (a last panel of fewer than 16 weight rows, K a multiple of 64 but not of 128, groups
of 64 to 192, 2 to 16 x rows and more in slices, bfloat16 and float32 scales, with and
without bias, 8-bit codes with and without x's rounding residual, 1 and 2 threads).

The comparison runs the AMX kernels on every call of 2 or more x rows (``vlmc_set_amx(2)``;
by default they take calls of 5+ rows of 8-bit codes and 9+ rows of 4-bit codes). The tests run only where the CPU has
AMX-TILE and AMX-INT8 (Intel Sapphire Rapids and later); elsewhere they skip and say so.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from vlmc.kernels import cpu
from vlmc.kernels.cpu import build


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_AMX = {"amx_tile", "amx_int8"} <= _cpu_flags()

pytestmark = [
    pytest.mark.skipif(cpu._get_lib() is None, reason="no C compiler: CPU kernels unavailable"),
    pytest.mark.skipif(not CPU_AMX, reason="this CPU has no AMX-TILE/AMX-INT8 (/proc/cpuinfo): nothing to compare"),
]

# (N, K, group size): N with a last panel of 1, 15, 1 and 5 rows (and one of 16 rows);
# K = 64 (one block), 192 and 1472 (not multiples of 128), 384 with groups of 128 and 192
SHAPES = [(17, 64, 64), (15, 192, 64), (33, 1472, 64), (48, 384, 128), (37, 384, 192), (1001, 512, 64)]
ROWS = list(range(2, 17)) + [17, 20, 33]  # over 16: slices of 16 (and a last slice of 1 on the panel path)


def _gemv(lib, x, w, s, b, st, N, bits, gs, bias, threads):
    M, K = x.shape
    y = np.full((M, N), np.nan, np.float32)
    rc = lib.vlmc_gemv_q(x.ctypes.data, M, K, w.ctypes.data, s.ctypes.data, b.ctypes.data, st, N, bits, gs,
                         None if bias is None else bias.ctypes.data, y.ctypes.data, threads)
    assert rc == 0, rc
    return y


def _weights(rng, N, K, bits, gs, st):
    w = rng.integers(0, 2**32, (N, K * bits // 32), dtype=np.uint64).astype(np.uint32)  # every code value
    s = (rng.standard_normal((N, K // gs)) * 0.02).astype(np.float32)
    b = (rng.standard_normal((N, K // gs)) * 0.1).astype(np.float32)
    if st == 1:  # bfloat16: the top halves
        s, b = ((a.view(np.uint32) >> 16).astype(np.uint16) for a in (s, b))
    return w, s, b


@pytest.fixture
def lib():
    lib = cpu.library()
    if not cpu.int8_activations():
        pytest.skip("int8 activations are off (VLMC_CPU_INT8_ACTIVATIONS=0 or no AVX512-VNNI)")
    mode = lib.vlmc_amx()
    yield lib
    lib.vlmc_set_amx(mode)
    lib.vlmc_set_x8_residual(1)


def test_amx_available_on_an_amx_cpu(lib):
    """-march=native on this CPU compiles the kernels in, and the CPU, the OS and the
    process permission (arch_prctl) let them run, in every mode."""
    for mode in (2, 0, 1):
        assert lib.vlmc_set_amx(mode) == mode and lib.vlmc_amx() == mode
    assert cpu.amx() == 1


@pytest.mark.parametrize("bits,residual", [(4, True), (8, True), (8, False)])
@pytest.mark.parametrize("st", [0, 1], ids=["f32", "bf16"])
def test_amx_equals_vnni_bit_for_bit(lib, bits, residual, st):
    rng = np.random.default_rng(bits * 10 + st)
    lib.vlmc_set_x8_residual(int(residual))
    for N, K, gs in SHAPES:
        w, s, b = _weights(rng, N, K, bits, gs, st)
        bias = rng.standard_normal(N).astype(np.float32)
        for M in ROWS:
            x = rng.standard_normal((M, K)).astype(np.float32)
            x[M // 2, : K // 2] *= 40.0  # a row of larger values: another x8 scale per block
            for threads in (1, 2):
                for bi in (None, bias) if M % 2 else (bias,):
                    assert lib.vlmc_set_amx(0) == 0
                    want = _gemv(lib, x, w, s, b, st, N, bits, gs, bi, threads)
                    assert lib.vlmc_set_amx(2) == 2
                    got = _gemv(lib, x, w, s, b, st, N, bits, gs, bi, threads)
                    assert np.isfinite(want).all()
                    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (N, K, gs, M, threads, bi is None)


@pytest.mark.parametrize("mode", [1, 2])
def test_amx_rows_equal_their_lone_runs(lib, mode):
    """A row's output does not depend on the other rows of its call (speculative verify,
    batched decode): each row of an M-row call equals that row alone (one x row: the
    one-row VNNI kernel), with the AMX kernels on calls of 2+ rows, or the default's."""
    assert lib.vlmc_set_amx(mode) == mode
    rng = np.random.default_rng(3)
    N, K, gs = 1001, 1536, 64
    for bits in (4, 8):
        w, s, b = _weights(rng, N, K, bits, gs, 1)
        x = rng.standard_normal((16, K)).astype(np.float32)
        alone = np.concatenate([_gemv(lib, x[r:r + 1], w, s, b, 1, N, bits, gs, None, 2) for r in range(16)])
        for M in (2, 7, 8, 9, 16, 25):
            rows = rng.permutation(16)[:M]
            got = _gemv(lib, np.ascontiguousarray(x[rows]), w, s, b, 1, N, bits, gs, None, 2)
            assert np.array_equal(got.view(np.uint32), alone[rows].view(np.uint32)), (bits, M)


def test_env_sets_the_mode():
    """VLMC_CPU_AMX (read once, at first use): 0 keeps a process on the VNNI kernels, 2
    puts every call of 2+ rows on AMX, unset means 1."""
    path = build.build()[1]
    code = f"import ctypes; print(ctypes.CDLL({str(path)!r}).vlmc_amx())"
    for value, want in (("0", "0"), ("", "1"), ("1", "1"), ("2", "2")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "VLMC_CPU_AMX": value})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want, (value, out.stdout)
