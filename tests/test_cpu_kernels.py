"""The CPU kernels (vlmc.kernels.cpu) against MLX's own ops.

Tolerances, as max |ours - reference| / max |reference| over the output:
- float32 and bfloat16 weights vs ``reference.linear``: 1e-5 (both compute in float32;
  only the summation order differs);
- affine-quantized weights vs ``mx.quantized_matmul``: 1e-4 (we use
  s*sum(q*x) + b*sum(x) per group instead of sum((s*q + b)*x));
- dequantize vs ``mx.dequantize`` with float32 scales: 1e-6;
- 4- and 8-bit weights with int8 activations (GEMVs of up to 16 rows on AVX512-VNNI machines, the
  default there): 2e-2, and relative L2 error 1e-2 (measured max 0.4-1.3%, L2 about
  0.6%: x rounded to int8 per 64 values). The exact 4-bit tests run with it turned off.
Every path is exercised: GEMV (rows <= 8, with N not a multiple of the row blocks or the
thread split, K chunked or not), numpy GEMM (rows > 8), the portable scalar build, and
the MLX fallbacks.
"""
from __future__ import annotations

import types

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops, quant, reference
from vlmc.kernels.cpu import build

pytestmark = pytest.mark.skipif(cpu._get_lib() is None, reason="no C compiler: CPU kernels unavailable")

DENSE_TOL = 1e-5
QUANT_TOL = 1e-4
SHAPES = [(37, 64), (133, 320), (259, 1536), (67, 4096), (23, 4608)]  # (N, K): N odd; K 64..4608
ROWS = [1, 3, 8, 17]  # 17 takes the GEMM path (GEMV_MAX_ROWS = 16)


def rel_err(a: mx.array, b: mx.array) -> float:
    a = np.asarray(a.astype(mx.float32))
    b = np.asarray(b.astype(mx.float32))
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture
def float_activations(monkeypatch):
    """4-bit GEMVs with float32 x (VLMC_CPU_INT8_ACTIVATIONS=0) for the exact tests."""
    monkeypatch.setenv("VLMC_CPU_INT8_ACTIVATIONS", "0")
    cpu.refresh()
    yield
    monkeypatch.undo()
    cpu.refresh()


def rand(*shape, scale=1.0):
    return mx.random.normal(shape, scale=scale)


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(1234)


# ---- dense -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("N,K", SHAPES)
def test_linear_matches_reference(dtype, N, K):
    w = rand(N, K, scale=0.05).astype(dtype)
    b = rand(N)
    for M in ROWS:
        x = rand(M, K)
        for bias in (None, b):
            y = cpu.linear(x, w, bias)
            ref = reference.linear(x, w, bias)
            assert y.dtype == ref.dtype and y.shape == ref.shape
            assert rel_err(y, ref) < DENSE_TOL, (M, N, K, dtype, bias is not None)


def test_linear_odd_k():
    """K not a multiple of the SIMD width: scalar tails (and K chunks for several rows)."""
    for N, K in [(29, 203), (11, 5001)]:
        w = rand(N, K, scale=0.05)
        for M in (1, 2, 6, 8, 17):
            x = rand(M, K)
            for wd in (w, w.astype(mx.bfloat16)):
                assert rel_err(cpu.linear(x, wd), reference.linear(x, wd)) < DENSE_TOL, (N, K, M)


def test_linear_leading_dims_bias_dtype_and_views():
    w = rand(96, 128)
    x = rand(2, 3, 128)
    b = rand(96).astype(mx.bfloat16)
    assert rel_err(cpu.linear(x, w, b), reference.linear(x, w, b)) < DENSE_TOL
    assert cpu.linear(x, w, b).shape == (2, 3, 96)
    wt = rand(128, 96).T  # a non-contiguous view
    assert rel_err(cpu.linear(x[0], wt), reference.linear(x[0], wt)) < DENSE_TOL
    xb = x.astype(mx.bfloat16)  # bf16 activations: computed in f32, output dtype as MLX's
    y, ref = cpu.linear(xb, w), reference.linear(xb, w)
    assert y.dtype == ref.dtype and rel_err(y, ref) < 1e-2


def test_threads_do_not_change_results(monkeypatch):
    w = rand(1000, 512).astype(mx.bfloat16)
    x = rand(2, 512)
    monkeypatch.setattr(cpu, "n_threads", 1)
    y1 = np.asarray(cpu.linear(x, w))
    monkeypatch.setattr(cpu, "n_threads", 3)
    y3 = np.asarray(cpu.linear(x, w))
    assert np.array_equal(y1, y3)  # each output row is computed by one thread, same order


# ---- quantized ---------------------------------------------------------------------------

def quantized(N, K, bits, gs, sdtype):
    w = rand(N, K, scale=0.05).astype(sdtype)
    return mx.quantize(w, group_size=gs, bits=bits)


def qref(x, wq, s, b, bits, gs, bias=None):
    y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.bfloat16])
def test_qlinear_simd_bits(bits, gs, sdtype, float_activations):
    # K = 384 with gs 32/128 leaves no remainder; K = 160 (gs 32) exercises the 4-bit
    # kernel's half-span tail (K % 64 == 32) and, for 2/3/5/6 bits, the portable path
    # (they are widened 64 codes at a time); 4096 is chunked in K for several rows.
    # K = 4608 with one row takes the long-row kernels (several weight rows per x load).
    # 2/3/5/6-bit rows are widened into scratch for the 8-bit kernels (float x).
    for N, K in [(77, 384), (259, 1536), (35, 4096), (23, 4608)] + ([(45, 160)] if gs == 32 else []):
        wq, s, b = quantized(N, K, bits, gs, sdtype)
        bias = rand(N)
        for M in ROWS:
            x = rand(M, K)
            for bb in (None, bias):
                y = cpu.qlinear(x, wq, s, b, bb, bits=bits, group_size=gs)
                ref = qref(x, wq, s, b, bits, gs, bb)
                assert y.dtype == ref.dtype and y.shape == ref.shape
                assert rel_err(y, ref) < QUANT_TOL, (bits, gs, sdtype, N, K, M, bb is not None)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.bfloat16])
def test_qlinear_int8_activations(gs, sdtype, bits):
    """2- to 8-bit GEMVs (up to 16 rows) with x rounded to int8 per 64 values (the default where the CPU
    has AVX512-VNNI): within the stated tolerance, really taken (results differ from the
    float path), and off with VLMC_CPU_INT8_ACTIVATIONS=0. The relative L2 error must stay
    near that of W @ (x_int8 - x) (~0.6%): computing the bias terms from the unrounded x
    instead doubles it, because the codes' mean (7.5 at 4 bits) then no longer cancels."""
    if not cpu.int8_activations():
        pytest.skip("no AVX512-VNNI on this CPU (or turned off)")
    for (N, K), M in zip([(259, 1536), (35, 4096), (23, 4608), (77, 384), (1536, 8960), (130, 640)],
                         [1, 1, 3, 8, 1, 13]):  # 13 rows: slices of 8 and 5 (no zero padding)
        wq, s, b = mx.quantize(mx.random.normal((N, K), scale=0.02).astype(sdtype), group_size=gs, bits=bits)
        x = rand(M, K)
        y = np.asarray(cpu.qlinear(x, wq, s, b, bits=bits, group_size=gs).astype(mx.float32))
        ref = qref(x, wq, s, b, bits, gs)
        r = np.asarray(ref.astype(mx.float32))
        l2 = float(np.linalg.norm(y - r) / np.linalg.norm(r))
        # 8-bit codes also take x's rounding residual: ~2e-5 where one rounding gives ~6e-3
        assert 1e-6 < l2 < (1e-4 if bits == 8 else 1e-2) and rel_err(mx.array(y), ref) < 2e-2, (N, K, l2)
    import os
    os.environ["VLMC_CPU_INT8_ACTIVATIONS"] = "0"
    try:
        cpu.refresh()
        assert not cpu.int8_activations()
        assert rel_err(cpu.qlinear(x, wq, s, b, bits=bits, group_size=gs), ref) < QUANT_TOL
    finally:
        del os.environ["VLMC_CPU_INT8_ACTIVATIONS"]
        cpu.refresh()


def unpack_codes(wq, bits: int, K: int) -> np.ndarray:
    """MLX's packed codes [N, K * bits / 32] as int64 [N, K]: a little-endian bit stream
    (6-bit codes straddle the uint32 words)."""
    stream = np.unpackbits(np.asarray(wq).view(np.uint8), axis=1, bitorder="little")
    fields = stream[:, :K * bits].reshape(-1, K, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(axis=2)


def int8x_ref(x, wq, s, b, bits, gs, residual=None):
    """What the int8-activation GEMV computes, in float64: x rounded to int8 per 64 values
    (scale amax / 127, float32 arithmetic, ties to even), exact integer dots per 64-block,
    scaled by the weight group's scale and the block's scale, plus each group's bias times
    the group sum of the rounded x. With ``residual`` (the GEMV's default for 8-bit codes)
    x is 256 q + qr in steps of scale / 256, qr = rint(256 (x / scale - q)) saturated."""
    residual = bits == 8 if residual is None else residual
    x = np.asarray(x, np.float32)
    M, K = x.shape
    blocks = x.reshape(M, K // 64, 64)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    t = (blocks * inv).astype(np.float32)
    q = np.rint(t).astype(np.int64)  # [M, nb, 64]
    xsc = (amax / np.float32(127)).astype(np.float64)[..., 0]  # [M, nb]
    if residual:
        qr = np.minimum(np.rint((t - q.astype(np.float32)) * np.float32(256)), 127).astype(np.int64)
        q, xsc = 256 * q + qr, xsc / 256
    codes = unpack_codes(wq, bits, K).reshape(-1, K // 64, 64)  # [N, nb, 64]
    dots = np.einsum("mbk,nbk->mnb", q, codes).astype(np.float64)  # exact
    sc = np.asarray(s.astype(mx.float32), np.float64)
    bi = np.asarray(b.astype(mx.float32), np.float64)
    g_of_block = np.arange(K // 64) * 64 // gs
    y = np.einsum("mnb,nb,mb->mn", dots, sc[:, g_of_block], xsc)
    xsum = q.sum(axis=2) * xsc  # [M, nb]: sums of the rounded x per block
    return y + np.einsum("nb,mb->mn", bi[:, g_of_block], xsum)


@pytest.mark.parametrize("bits,gs,sdtype", [(4, 64, mx.bfloat16), (4, 64, mx.float32), (4, 128, mx.bfloat16),
                                            (4, 192, mx.float32), (4, 256, mx.bfloat16), (8, 64, mx.bfloat16),
                                            (6, 64, mx.bfloat16), (6, 128, mx.float32), (5, 64, mx.bfloat16),
                                            (3, 64, mx.float32), (3, 128, mx.bfloat16), (2, 64, mx.bfloat16)])
def test_qlinear_int8_activations_exact(bits, gs, sdtype):
    """The int8-activation GEMV against its own arithmetic done exactly (int8x_ref): only
    float summation order may differ. K covers the 4-bit kernel's cases: whole 512-code
    steps, 128-code pairs after them, a last unpaired 64-block (K % 128 == 64), and K
    chunks that split a 512-step (M = 3); N = 131 rows for one x row (8-row groups and a
    rest); gs 192 and 256 take the scale path with no fast
    load (random codes and parameters: MLX quantizes only to groups of 32, 64 and 128).
    The panel kernels' parameter tables: 16 groups a step (bfloat16 in pairs) or 8
    (float32), a last step overlapping the one before, a last odd group by itself (K = 2240:
    35 groups of 64)."""
    if not cpu.int8_activations():
        pytest.skip("no AVX512-VNNI on this CPU (or turned off)")
    for K in (192, 576, 640, 1536, 8960, 1024, 2240):
        if K % gs:
            continue
        for M in (1, 3, 8, 13):
            N = 37 if M > 1 else 131
            wq = mx.random.randint(0, 1 << 31, (N, K * bits // 32)).astype(mx.uint32) * 2 + (mx.arange(N)[:, None] % 2).astype(mx.uint32)
            s = rand(N, K // gs, scale=0.01).astype(sdtype)
            b = rand(N, K // gs, scale=0.05).astype(sdtype)
            x = rand(M, K)
            x = mx.where(mx.arange(K) % 97 == 0, 4.0 * x, x)  # a few larger values per block
            bias = rand(N) if M == 1 else None  # M = 1, gs 64: 8 rows summed and biased as one vector
            y = np.asarray(cpu.qlinear(x, wq, s, b, bias, bits=bits, group_size=gs).astype(mx.float32), np.float64)
            ref = int8x_ref(x, wq, s, b, bits, gs) + (0.0 if bias is None else np.asarray(bias, np.float64))
            err = np.abs(y - ref).max() / np.abs(ref).max()
            assert err < 2e-6, (K, M, err)


@pytest.mark.parametrize("bits,gs,sdtype", [(4, 64, mx.bfloat16), (4, 128, mx.float32), (8, 64, mx.bfloat16),
                                            (6, 128, mx.float32), (5, 64, mx.float32), (3, 64, mx.bfloat16),
                                            (2, 128, mx.bfloat16)])
def test_qlinear_int8_gemm_for_many_rows(bits, gs, sdtype, monkeypatch):
    """Products of more than GEMV_MAX_ROWS rows from INT8_GEMM_MIN_MACS multiply-adds on
    (prefill, vision) take the int8 GEMM where the CPU has AVX512-VNNI: same tolerance as
    the GEMV (x rounded per 64 values), with row counts that are not multiples of 8, column
    counts that are not multiples of 16, and a bias; smaller products take int8 GEMVs in
    passes of rows, with the GEMM's bits (tests/test_batch_invariance.py).
    Every code width is unpacked to bytes per panel (4 bits: nibbles, 8: as stored, 2/3/5/6:
    expand_packed)."""
    if not cpu.int8_activations() or not cpu._get_lib().vlmc_gemm_q_i8_available():
        pytest.skip("no AVX512-VNNI on this CPU (or turned off)")
    for M, N, K in [(37, 517, 1024), (64, 512, 512), (19, 1536, 1280)]:
        assert M * N * K >= cpu.INT8_GEMM_MIN_MACS and M > cpu.GEMV_MAX_ROWS
        wq, s, b = mx.quantize(mx.random.normal((N, K), scale=0.02).astype(sdtype), group_size=gs, bits=bits)
        x, bias = rand(M, K), rand(N)
        y = np.asarray(cpu.qlinear(x, wq, s, b, bias, bits=bits, group_size=gs))
        ref = np.asarray(qref(x, wq, s, b, bits, gs, bias))
        l2 = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        assert 1e-6 < l2 < (1e-4 if bits == 8 else 1e-2) and rel_err(mx.array(y), mx.array(ref)) < 2e-2, (M, N, K, l2)
        exact = int8x_ref(x, wq, s, b, bits, gs) + np.asarray(bias, np.float64)  # its own arithmetic, exactly
        assert np.abs(y - exact).max() / np.abs(exact).max() < 2e-6, (M, N, K)
    monkeypatch.setattr(cpu, "INT8_GEMM_MIN_MACS", 1 << 40)  # below the threshold: GEMVs, the same bits
    assert np.array_equal(np.asarray(cpu.qlinear(x, wq, s, b, bias, bits=bits, group_size=gs)), y)


def test_qlinear_quant_weight_object_and_leading_dims(float_activations):
    wq, s, b = quantized(70, 256, 4, 64, mx.bfloat16)
    qw = types.SimpleNamespace(weight=wq, scales=s, biases=b, bits=4, group_size=64, mode="affine")
    x = rand(2, 3, 256)
    bias = rand(70)
    y = cpu.qlinear(x, qw, bias)
    assert y.shape == (2, 3, 70)
    assert rel_err(y, qref(x, wq, s, b, 4, 64, bias)) < QUANT_TOL


def test_qlinear_mixed_scale_dtypes_and_many_rows_through_gemv(monkeypatch):
    wq, s, b = quantized(90, 320, 8, 32, mx.float32)
    b16 = b.astype(mx.bfloat16)
    x = rand(11, 320)
    monkeypatch.setattr(cpu, "GEMV_MAX_ROWS", 16)  # M = 11: the C side slices x into 8 + 3 rows
    ref = mx.quantized_matmul(x, wq, s, b16.astype(mx.float32), transpose=True, group_size=32, bits=8)
    assert rel_err(cpu.qlinear(x, wq, s, b16, bits=8, group_size=32), ref) < QUANT_TOL
    y = cpu.linear(x, rand(90, 320))  # dense GEMV with M > 8 as well
    assert y.shape == (11, 90)


def test_qlinear_unsupported_modes_fall_back():
    w = rand(64, 128, scale=0.05)
    try:
        wq, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")[:2]
    except (ValueError, RuntimeError):
        pytest.skip("this MLX has no mxfp4")
    x = rand(2, 128)
    y = cpu.qlinear(x, wq, s, None, bits=4, group_size=32, mode="mxfp4")
    ref = mx.quantized_matmul(x, wq, s, None, transpose=True, group_size=32, bits=4, mode="mxfp4")
    assert rel_err(y, ref) < 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dequantize_matches_mlx(bits):
    for gs, sdtype in [(32, mx.float32), (64, mx.bfloat16), (128, mx.bfloat16)]:
        wq, s, b = quantized(19, 256, bits, gs, sdtype)
        ours = cpu.dequantize(wq, s, b, bits=bits, group_size=gs)
        ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
        assert ours.dtype == mx.float32
        assert rel_err(ours, ref) < 1e-6, (bits, gs, sdtype)


@pytest.mark.parametrize("bits,gs,sdtype", [(4, 64, mx.bfloat16), (8, 32, mx.float32), (3, 128, mx.float32)])
def test_qembedding_matches_reference(bits, gs, sdtype):
    wq, s, b = quantized(50, 256, bits, gs, sdtype)
    ids = mx.array([[3, 0, 49], [7, 7, 1]])
    table = types.SimpleNamespace(weight=wq, scales=s, biases=b, bits=bits, group_size=gs, mode="affine")
    ref = reference.qembedding(ids, table) if hasattr(reference, "qembedding") else \
        mx.dequantize(wq[ids.reshape(-1)], s[ids.reshape(-1)], b[ids.reshape(-1)], group_size=gs,
                      bits=bits).reshape(2, 3, 256)
    for got in (cpu.qembedding(ids, table), cpu.qembedding(ids, wq, s, b, bits=bits, group_size=gs)):
        assert got.shape == (2, 3, 256) and got.dtype == ref.dtype
        assert rel_err(got, ref) < (1e-6 if sdtype == mx.float32 else 1e-2)
    # host rows (the cpu target's op): float32 arrays holding exactly the rows' values
    host = cpu_ops.qembedding(ids, table)
    if cpu._get_lib() is not None and bits in (4, 8):
        assert type(host) is np.ndarray and host.dtype == np.float32 and host.shape == (2, 3, 256)
        assert np.array_equal(host, np.asarray(cpu.qembedding(ids, table).astype(mx.float32)))


# ---- row exactness ------------------------------------------------------------------------

def _assert_rows_exact(seed: int, widths=(2, 3, 4, 5, 6, 8), group_sizes=(64, 128)) -> None:
    """Every output row of a GEMV of M = 1..16 x rows is, bit for bit, that row computed
    alone (M = 1), at whatever position among the rows it comes, for the K of Qwen2-VL-2B's
    projections (1536: 3 whole 512-code steps; 8960: 17 and a half; 576: a lone last
    64-block) and N not a multiple of the kernels' row blocks; float32, bfloat16 and every
    code width, with and without a bias."""
    rng = np.random.default_rng(seed)
    for K in (1536, 8960, 576):
        N = int(rng.integers(20, 60))
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * 0.02)
        bias = mx.array(rng.standard_normal(N).astype(np.float32))
        x = rng.standard_normal((16, K)).astype(np.float32) * rng.uniform(0.1, 10, (16, 1)).astype(np.float32)
        x[:, rng.integers(0, K, 9)] *= 20  # a few outliers per row (int8 x: block scales differ)
        calls = [lambda xs, b, w=w: cpu.linear(mx.array(xs), w, b),
                 lambda xs, b, w=w.astype(mx.bfloat16): cpu.linear(mx.array(xs), w, b)]
        for bits in widths:
            gs = group_sizes[bits % len(group_sizes)] if K % 128 == 0 else 64
            wq, s, bq = mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits)
            calls.append(lambda xs, b, q=(wq, s, bq, bits, gs): cpu.qlinear(mx.array(xs), *q[:3], b, bits=q[3],
                                                                              group_size=q[4]))
        for i, call in enumerate(calls):
            for b in (None, bias) if i % 2 else (bias,):
                alone = np.concatenate([np.asarray(call(x[r:r + 1], b)) for r in range(16)])
                for M in range(2, 17):
                    rows = rng.permutation(16)[:M]
                    got = np.asarray(call(x[rows], b))
                    assert np.array_equal(got.view(np.uint32), alone[rows].view(np.uint32)), (K, i, M)


@pytest.mark.parametrize("int8", [True, False])
def test_gemv_rows_are_exact_for_any_row_count(int8, monkeypatch):
    """Speculative decoding checks a draft's n tokens in one call of B x n rows and must
    get the logits n one-token steps give, so a row's result may not depend on the other
    rows of its call. With int8 x (x rounded per 64 values, each row by itself) and with
    float32 x."""
    if int8 and not cpu.int8_activations():
        pytest.skip("no AVX512-VNNI on this CPU (or turned off)")
    monkeypatch.setenv("VLMC_CPU_INT8_ACTIVATIONS", "1" if int8 else "0")
    cpu.refresh()
    try:
        assert cpu.int8_activations() == int8
        _assert_rows_exact(3 if int8 else 4)
    finally:
        monkeypatch.undo()
        cpu.refresh()


def test_gemv_rows_exact_across_threads_and_chunks(monkeypatch):
    """Weights large enough for several threads and many scheduling chunks (which shrink
    towards the end of a call, each thread prefetching the next chunk it takes): every row
    of an M-row call, with 1 or 3 threads, is bit for bit that row computed alone on one
    thread, for the 4-bit panel kernel and that of 2/3/5/6-bit codes."""
    if not cpu.int8_activations():
        pytest.skip("no AVX512-VNNI on this CPU (or turned off)")
    rng = np.random.default_rng(7)
    N, K = 1001, 1536  # N odd: a last panel of 9 rows
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * 0.02)
    x = rng.standard_normal((16, K)).astype(np.float32)
    bias = mx.array(rng.standard_normal(N).astype(np.float32))
    for bits in (4, 6, 3, 5):
        wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=bits)

        def call(xs, wq=wq, s=s, b=b, bits=bits):
            return np.asarray(cpu.qlinear(mx.array(xs), wq, s, b, bias, bits=bits, group_size=64))

        monkeypatch.setattr(cpu, "n_threads", 1)
        alone = np.concatenate([call(x[r:r + 1]) for r in range(16)])
        for threads in (1, 3):
            monkeypatch.setattr(cpu, "n_threads", threads)
            for M in (2, 5, 8, 9, 16):
                rows = rng.permutation(16)[:M]
                got = call(x[rows])
                assert np.array_equal(got.view(np.uint32), alone[rows].view(np.uint32)), (bits, threads, M)


# ---- build, cache, fallbacks -------------------------------------------------------------

def test_portable_build_matches(monkeypatch, tmp_path):
    """The scalar (no AVX2) variant computes the same things, host-path and KV kernels too."""
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    lib, path, compiled = build.build(native=False)
    assert compiled and path.exists() and lib.vlmc_simd() == 0
    monkeypatch.setattr(cpu, "_lib", lib)
    monkeypatch.setattr(cpu, "_qplans", {})
    x = rand(3, 320)
    w = rand(45, 320, scale=0.05)
    assert rel_err(cpu.linear(x, w.astype(mx.bfloat16)), reference.linear(x, w.astype(mx.bfloat16))) < DENSE_TOL
    for bits, gs in [(4, 32), (8, 64), (3, 32), (6, 64), (5, 64), (2, 64)]:
        wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits)
        assert rel_err(cpu.qlinear(x, wq, s, b, bits=bits, group_size=gs), qref(x, wq, s, b, bits, gs)) < QUANT_TOL
        ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
        assert rel_err(cpu.dequantize(wq, s, b, bits=bits, group_size=gs), ref) < 1e-6
    _host_kernels_match()


def _host_kernels_match() -> None:
    """The elementwise and KV decode kernels of the library now loaded (the SIMD paths, or
    the scalar and AVX2 ones of the other builds) against the MLX references."""
    from vlmc.kernels import cpu_ops, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_affine_decode, kv_affine_encode, kv_dense_decode, kv_turbo_decode
    from vlmc.runtime.kv_cache import make_caches

    def close(got, ref, tol=5e-6):
        ref = np.asarray(ref)
        assert float(np.abs(np.asarray(got) - ref).max()) <= tol * float(np.abs(ref).max())

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 256)) * 4).astype(np.float32)  # threaded sizes
    xm, w = mx.array(x), mx.array(rng.standard_normal(256).astype(np.float32))
    for kind in ("silu", "quick_gelu"):
        close(cpu_ops.act(x, kind), reference.act(xm, kind))
    close(cpu_ops.rms_norm(x, w, eps=1e-5), reference.rms_norm(xm, w, 1e-5))
    close(cpu_ops.layer_norm(x, w, w, eps=1e-5), reference.layer_norm(xm, w, w, 1e-5))
    cos, sin = reference.rope_freqs(mx.array(rng.integers(0, 99, (1, 300)), mx.int32), "default", dim=64,
                                    theta=1e4)
    q = x.reshape(1, 300, 4, 64).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(cpu_ops.rope(q, cos, sin), np.asarray(reference.rope(mx.array(q), cos, sin)))
    mask = mx.array(np.tril(np.ones((300, 300), bool)))[None, None]
    k = x.reshape(1, 300, 4, 64)[:, :, :2].transpose(0, 2, 1, 3)
    close(cpu_ops.attention(q, k, k, mask, scale=0.125),
          reference.attention(mx.array(q), mx.array(np.repeat(k, 2, 1)), mx.array(np.repeat(k, 2, 1)), mask,
                              scale=0.125), 1e-5)
    kv = mx.random.normal((2, 2, 200, 64))
    qd, starts = mx.random.normal((2, 8, 64)), mx.array([0, 37], mx.int32)
    close(kv_dense_decode(qd, kv, kv, starts, 200, scale=0.125), kv_quant.kv_dense_decode(qd, kv, kv, starts, 200,
                                                                                         scale=0.125), 1e-5)
    for spec in ({"layout": "quantized", "bits": 4, "group_size": 32},
                 {"layout": "turboquant", "k_bits": 3, "v_bits": 4}):
        cache = make_caches([{"index": 0, "kv": spec}], 2, 2, 64)[0]
        cache.append(kv, kv)
        kb, vb = cache.buffers["k"], cache.buffers["v"]
        if spec["layout"] == "quantized":
            args = (qd, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"], starts, 200)
            kw = dict(scale=0.125, bits=4, group_size=32)
            close(kv_affine_decode(*args, **kw), kv_quant.kv_affine_decode(*args, **kw, int8_query=True), 1e-5)
            for bits in (4, 8):  # the decode_layer path's encode: the codec's bytes
                codec, xs = cache.codecs["k"], np.asarray(kv[:, :, :3])
                codec = type(codec)(bits, 32)
                ref, got = codec._encode(mx.array(xs)), kv_affine_encode(xs, bits, 32)
                assert np.array_equal(got["codes"], np.asarray(ref["codes"]))
                assert np.array_equal(got["scales"], np.asarray(ref["scales"].view(mx.uint16)))
                assert np.array_equal(got["biases"], np.asarray(ref["biases"].view(mx.uint16)))
        else:
            kc, vc = cache.codecs["k"], cache.codecs["v"]
            args = (qd, kb["codes"], kb["norms"], vb["codes"], vb["norms"], kc.codebook, vc.codebook, starts, 200)
            kw = dict(scale=0.125, k_bits=3, v_bits=4)
            close(kv_turbo_decode(*args, **kw), kv_quant.kv_turbo_decode(*args, **kw), 1e-5)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif(" avx2 " not in _cpu_flags() or " fma " not in _cpu_flags(), reason="needs AVX2+FMA")
@pytest.mark.skipif(" avx512vl " not in _cpu_flags(), reason="the native build already is the AVX2 variant")
def test_avx2_only_build_matches(monkeypatch):
    """The AVX2 variant with 16 vector registers (other kernel configurations than an
    AVX-512 machine's -march=native build), every kernel shape and M; its host-path and KV
    kernels take their non-AVX-512 paths."""
    try:
        lib = build.build(flags=build.AVX2_FLAGS)[0]  # cached in the user cache after the first run
    except RuntimeError as e:
        pytest.skip(f"compiler cannot target AVX2: {e}")
    assert lib.vlmc_simd() == 1
    monkeypatch.setattr(cpu, "_lib", lib)
    monkeypatch.setattr(cpu, "_qplans", {})
    for N, K in [(45, 384), (21, 4608)]:  # short and long rows
        w = rand(N, K, scale=0.05)
        b = rand(N)
        quants = [(bits, gs, mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits))
                  for bits, gs in [(4, 32), (8, 64), (4, 128), (6, 64), (5, 128), (3, 64)]]
        for M in range(1, 9):
            x = rand(M, K)
            for wd in (w, w.astype(mx.bfloat16)):
                assert rel_err(cpu.linear(x, wd, b), reference.linear(x, wd, b)) < DENSE_TOL, (N, K, M)
            for bits, gs, (wq, s, bq) in quants:
                assert rel_err(cpu.qlinear(x, wq, s, bq, b, bits=bits, group_size=gs),
                               qref(x, wq, s, bq, bits, gs, b)) < QUANT_TOL, (N, K, M, bits, gs)
    _assert_rows_exact(5, widths=(4, 8, 6))  # float x only: this build has no VNNI
    _host_kernels_match()


def test_padded_rows_5_to_7(float_activations):
    """M = 5..7 runs the 8-row kernels on zero-padded activations."""
    w = rand(83, 640, scale=0.05)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    wq8, s8, b8 = mx.quantize(w, group_size=32, bits=8)
    for M in (5, 6, 7):
        x = rand(M, 640)
        assert rel_err(cpu.linear(x, w), reference.linear(x, w)) < DENSE_TOL
        assert rel_err(cpu.linear(x, w.astype(mx.bfloat16)), reference.linear(x, w.astype(mx.bfloat16))) < DENSE_TOL
        assert rel_err(cpu.qlinear(x, wq, s, b, bits=4, group_size=64), qref(x, wq, s, b, 4, 64)) < QUANT_TOL
        assert rel_err(cpu.qlinear(x, wq8, s8, b8, bits=8, group_size=32), qref(x, wq8, s8, b8, 8, 32)) < QUANT_TOL


def test_build_cache_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    lib1, path1, compiled1 = build.build(native=False)
    lib2, path2, compiled2 = build.build(native=False)
    assert compiled1 and not compiled2 and path1 == path2
    assert path1.parent == tmp_path / "kernels"
    assert [p.name for p in path1.parent.iterdir()] == [path1.name]  # no temp files left behind


def test_cache_key_covers_every_source_and_the_header(monkeypatch, tmp_path):
    """The library is one translation unit per .c file plus vlmc.h: editing any of them
    (the header too) names another library, so a stale build is never loaded."""
    import shutil
    srcs = build.sources()
    assert {"gemv.c", "threadpool.c", "kv_attention.c", "decode_layer.c"} <= {p.name for p in srcs}
    cc = build.compiler()
    before = build.library_path(cc, build.PORTABLE_FLAGS)
    for name in ("vlmc.h", "threadpool.c"):
        copy = tmp_path / name
        shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        (copy / name).write_bytes((copy / name).read_bytes() + b"\n/* edited */\n")
        monkeypatch.setattr(build, "SOURCE_DIR", copy)
        assert build.library_path(cc, build.PORTABLE_FLAGS) != before, name
        monkeypatch.undo()
    assert build.library_path(cc, build.PORTABLE_FLAGS) == before


def test_abi_number_has_one_source(monkeypatch, tmp_path):
    """The ABI number lives in bindings.py: the C refuses to compile without it, the
    library reports the number it was built with, and a library reporting another one
    does not load. Every exported function has its ctypes signature declared."""
    import re
    import subprocess
    from vlmc.kernels.cpu import bindings
    lib = cpu._get_lib()
    assert lib.vlmc_abi_version() == bindings.ABI_VERSION == build.ABI_VERSION
    header = (build.SOURCE_DIR / "vlmc.h").read_text()
    assert not re.search(r"#define\s+VLMC_ABI\s+\d", header)  # no second copy of the number
    proc = subprocess.run([build.compiler(), "-fsyntax-only", str(build.SOURCE_DIR / "probe.c")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "VLMC_ABI" in proc.stderr
    exported = set(re.findall(r"^(?:int|void|float) (vlmc_\w+)\(", header, re.M))
    assert exported == set(bindings.SIGNATURES)
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    path = build.build(native=False)[1]
    monkeypatch.setattr(build, "ABI_VERSION", bindings.ABI_VERSION + 1)
    with pytest.raises(RuntimeError, match="kernel ABI"):
        build._load(path)


def test_kernels_never_import_the_backends():
    """Dependencies point one way: the backends (artifact writer, compile-time quantization)
    use the kernels, never the reverse (bf16_bits lives in vlmc.kernels.dtypes,
    quantize_array in vlmc.backends.quantize). Checked on the import-time statements of
    every module under vlmc/kernels; the one later reference is kernels.quant's forwarding
    of the names that moved, resolved only when a caller asks for one."""
    import ast
    from pathlib import Path
    import vlmc.kernels
    root = Path(vlmc.kernels.__file__).parent
    for path in root.rglob("*.py"):
        package = ["vlmc", "kernels", *path.relative_to(root).parts[:-1]]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:  # relative: level 1 is this file's package, 2 its parent, ...
                    target = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                assert not target.startswith("vlmc.backends"), (path, target)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("vlmc.backends") for a in node.names), path


def test_disabled_by_env_uses_mlx(monkeypatch):
    monkeypatch.setenv("VLMC_CPU_KERNELS", "0")
    cpu.refresh()
    try:
        assert not cpu.available()
        w, x = rand(40, 64), rand(2, 64)
        assert np.array_equal(np.asarray(cpu.linear(x, w)), np.asarray(reference.linear(x, w)))
        wq, s, b = quantized(40, 64, 4, 32, mx.float32)
        assert np.array_equal(np.asarray(cpu.qlinear(x, wq, s, b, bits=4, group_size=32)),
                              np.asarray(qref(x, wq, s, b, 4, 32)))
    finally:
        monkeypatch.delenv("VLMC_CPU_KERNELS")
        cpu.refresh()
    assert cpu.available()


def test_no_compiler_warns_once_and_returns_none(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_warned", False)
    assert build.load() is None and build.load(native=False) is None
    err = capsys.readouterr().err
    assert err.count("CPU kernels unavailable") == 1 and "no C compiler" in err


@pytest.mark.parametrize("bits,wider", [(2, 4), (3, 4), (5, 8), (6, 8)])
def test_widen_repacks_codes_exactly(bits, wider, monkeypatch):
    from vlmc.backends.quantize import quantize_array
    from vlmc.kernels import quant
    from vlmc.kernels.quant import widen
    q = quantize_array(rand(19, 256), bits=bits, group_size=64, mode="affine")
    w = widen(q, wider)
    assert w.bits == wider and w.weight.shape == (19, 256 * wider // 32)
    assert w.scales is q.scales and w.biases is q.biases
    assert mx.array_equal(w.dequantize(), q.dequantize())
    monkeypatch.setattr(quant, "widen", None)  # the load-time path must not fall back to it
    fast = cpu.widen(q, wider)  # C dequantize with unit scales
    assert fast.bits == wider and mx.array_equal(fast.weight, w.weight)
    with pytest.raises(ValueError):
        widen(w, bits)


def test_widen_works_in_row_blocks(monkeypatch):
    """Widening goes block by block (exact across block edges, including a short last
    block), so its float32/uint32 temporaries stay the size of one block: peak MLX memory
    above the inputs measured 5.0x the widened codes here (blocks of 1/8 of the rows; the
    blocks and their concatenation are 2x of it), the whole matrix at once 33x."""
    from vlmc.backends.quantize import quantize_array
    from vlmc.kernels import quant
    q = quantize_array(rand(8192 + 40, 1024), bits=6, group_size=64, mode="affine")
    mx.eval(q.weight, q.scales, q.biases)
    monkeypatch.setattr(quant, "WIDEN_ROWS", 1024)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    w = quant.widen(q, 8)
    mx.eval(w.weight)
    assert mx.get_peak_memory() - before < 6 * w.weight.nbytes
    assert mx.array_equal(w.dequantize(), q.dequantize())
    assert mx.array_equal(cpu.widen(q, 8).weight, w.weight)  # the C path, same blocks


def test_cpu_artifacts_widen_odd_bit_widths_at_load(tmp_path, monkeypatch):
    """A q3 artifact with groups of 32 (head at q6) loads with 4- and 8-bit codes on the cpu
    target (groups of 32 keep x in float32, where 6-bit codes are read faster widened),
    computing the same embeddings as the unwidened weights through MLX's own ops."""
    import vlmc
    from fixtures.checkpoints import build_checkpoint
    ck = tmp_path / "ck"
    build_checkpoint(ck, "qwen2_vl")
    art = vlmc.compile(ck, tmp_path / "q3", quantize="q3", group_size=32)
    widened = vlmc.load(art)
    bits = {w.bits for w in widened.model.params.values() if hasattr(w, "bits")}
    # q3 -> 4, and the q6 head (groups of 32: float x) -> 8
    assert bits == {4, 8}
    monkeypatch.setenv("VLMC_CPU_INT8_ACTIVATIONS", "0")  # float x: widening at load is faster
    cpu.refresh()
    try:
        assert cpu.load_width(6, 64) == 8 and cpu.load_width(5, 128) == 8
        assert {w.bits for w in vlmc.load(art).model.params.values() if hasattr(w, "bits")} == {4, 8}
    finally:
        monkeypatch.delenv("VLMC_CPU_INT8_ACTIVATIONS")
        cpu.refresh()
    monkeypatch.setenv("VLMC_CPU_KERNELS", "0")
    cpu.refresh()
    try:
        plain = vlmc.load(art)
        assert {w.bits for w in plain.model.params.values() if hasattr(w, "bits")} == {3, 6}
        ids = mx.array([[1, 5, 9, 2]], dtype=mx.int32)
        a = plain.model.embed(ids=ids)
    finally:
        monkeypatch.delenv("VLMC_CPU_KERNELS")
        cpu.refresh()
    b = widened.model.embed(ids=ids)
    assert rel_err(b, a) < 1e-6


def test_cpu_artifacts_keep_5_and_6_bit_codes_where_read_in_place(tmp_path, monkeypatch):
    """q5 layers (head at q8) with groups of 64 stay 5-bit on machines whose kernels widen
    codes in registers (AVX512-VBMI, int8 x) and give the same logits, bit for bit, as the
    8-bit copy the loader makes elsewhere (with x rounded alike: 8-bit codes otherwise also
    get x's rounding residual); 2 and 3 bits are always widened to 4."""
    import vlmc
    from fixtures.checkpoints import build_checkpoint
    from vlmc.quality import _trace
    from vlmc.runtime.sampling import Sampler, SamplingParams
    assert cpu.load_width(3, 64) == 4 and cpu.load_width(2, 128) == 4 and cpu.load_width(4, 64) is None
    if not cpu.int8_activations() or not cpu._get_lib().vlmc_packed_direct():
        pytest.skip("no AVX512-VBMI/VNNI on this CPU (or int8 x turned off): 5 and 6 bits are widened")
    assert cpu.load_width(5, 64) is None and cpu.load_width(6, 128) is None and cpu.load_width(5, 32) == 8
    ck = tmp_path / "ck"
    build_checkpoint(ck, "qwen2_vl")
    art = vlmc.compile(ck, tmp_path / "q5", quantize="q5", quantize_vision=False)
    direct = vlmc.load(art)
    assert {w.bits for w in direct.model.params.values() if hasattr(w, "bits")} == {5, 8}
    monkeypatch.setattr(cpu, "load_width", lambda bits, gs: quant.WIDER.get(bits))
    copy = vlmc.load(art)
    assert {w.bits for w in copy.model.params.values() if hasattr(w, "bits")} == {8}
    prompt = direct.build_prompt("The small robot walked across the kitchen.")
    lib = cpu._get_lib()
    lib.vlmc_set_x8_residual(0)
    try:
        toks, lp_direct = _trace(direct, prompt, Sampler(SamplingParams()), 6)
        _, lp_copy = _trace(copy, prompt, Sampler(SamplingParams()), 6)
    finally:
        lib.vlmc_set_x8_residual(1)
    assert all(np.array_equal(a, b) for a, b in zip(lp_direct, lp_copy))


@pytest.mark.parametrize("kind", ["silu", "quick_gelu"])
def test_numpy_activations_match_reference(kind):
    """Large activations run through numpy (cpu_ops.act/glu); small ones stay on MLX."""
    from vlmc.kernels import cpu_ops
    rng = np.random.default_rng(3)
    x = mx.array((rng.standard_normal((300, 512)) * 6).astype(np.float32))
    x[0, :4] = mx.array([-1e4, 1e4, 0.0, -90.0])  # exp overflow and zero stay finite and exact
    up = mx.array(rng.standard_normal((300, 512)).astype(np.float32))
    assert x.size >= cpu_ops.NUMPY_ACT_MIN_ELEMS and cpu_ops._numpy_act_ok(x, kind) == cpu.enabled()
    got, ref = cpu_ops.act(x, kind), reference.act(x, kind)
    assert got.dtype == mx.float32 and bool(mx.all(mx.isfinite(got)))
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(cpu_ops.glu(x, up, kind)), np.array(reference.glu(x, up, kind)),
                               rtol=2e-6, atol=1e-6)
    small = x[:2, :8]
    assert not cpu_ops._numpy_act_ok(small, kind)
    assert mx.array_equal(cpu_ops.act(small, kind), reference.act(small, kind))


def test_qembedding_rejects_ids_outside_the_table():
    """The host gather says which id is out of range (a clear InputError, not an IndexError)."""
    from vlmc.errors import InputError
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    wq, s, b = mx.quantize(mx.random.normal((40, 128), scale=0.02), group_size=64, bits=4)
    rows = cpu.qembedding(mx.array([[3, 39]]), wq, s, b, bits=4, group_size=64)
    assert rows.shape == (1, 2, 128)
    for bad in (40, -1):
        with pytest.raises(InputError, match=f"token id {bad} is outside the embedding table's 40 rows"):
            cpu.qembedding(mx.array([[3, bad]]), wq, s, b, bits=4, group_size=64)
