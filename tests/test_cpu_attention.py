"""BLAS attention (vlmc.kernels.cpu.attention) against MLX's scaled_dot_product_attention.

Tolerance: 1e-5 of the output's scale (both float32; only the summation order differs).
Left-padding query rows of a ragged batch see no key at all: there we give zeros and
MLX the mean of v; neither is ever read, so those rows are excluded and checked finite.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu_ops, reference
from vlmc.kernels.cpu import attention as blas

TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def qkv(B, H, Hk, L, S, D, dtype=mx.float32):
    mx.random.seed(B * 1000 + H * 100 + L)
    return tuple(mx.random.normal(s).astype(dtype) for s in ((B, H, L, D), (B, Hk, S, D), (B, Hk, S, D)))


def causal_padded(L: int, S: int, starts: list[int]) -> mx.array:
    q = mx.arange(S - L, S)[:, None]
    k = mx.arange(S)[None, :]
    return ((k <= q)[None] & (k[None] >= mx.array(starts).reshape(-1, 1, 1)))[:, None]


@pytest.mark.parametrize("B,H,Hk,L,S,D", [(1, 16, 16, 256, 256, 80), (2, 12, 2, 40, 40, 64), (1, 6, 3, 17, 50, 32)])
def test_unmasked_and_gqa(B, H, Hk, L, S, D):
    q, k, v = qkv(B, H, Hk, L, S, D)
    out = blas.attention(q, k, v, None, scale=D ** -0.5)
    assert out.shape == (B, H, L, D)
    assert rel_err(out, reference.attention(q, k, v, None, scale=D ** -0.5)) < TOL


def test_causal_ragged_batch_over_a_cache():
    """Prefill of 24 rows after 16 cached ones, sequence 1 left-padded by 5."""
    q, k, v = qkv(2, 4, 2, 24, 40, 32)
    mask = causal_padded(24, 40, [0, 5])
    out = blas.attention(q, k, v, mask, scale=0.2)
    ref = reference.attention(q, k, v, mask, scale=0.2)
    assert rel_err(out, ref) < TOL  # rows 16.. of every sequence see keys: all comparable
    padded = causal_padded(24, 24, [0, 5])
    q2, k2, v2 = qkv(2, 4, 2, 24, 24, 32)
    out2 = np.asarray(blas.attention(q2, k2, v2, padded, scale=0.2))
    ref2 = np.asarray(reference.attention(q2, k2, v2, padded, scale=0.2))
    assert np.isfinite(out2).all()
    assert (out2[1, :, :5] == 0).all()  # no key visible: zeros
    np.testing.assert_allclose(out2[1, :, 5:], ref2[1, :, 5:], atol=TOL * np.abs(ref2).max())
    np.testing.assert_allclose(out2[0], ref2[0], atol=TOL * np.abs(ref2).max())


def test_segment_mask_shared_by_the_batch_and_score_blocks(monkeypatch):
    """A [1, 1, L, S] mask (vision: one block per image) over a batch, with the score
    matrix split into blocks of 7 query rows."""
    seg = mx.array([0] * 30 + [1] * 20 + [2] * 14)
    mask = (seg[:, None] == seg[None, :])[None, None]
    q, k, v = qkv(2, 4, 4, 64, 64, 16)
    whole = blas.attention(q, k, v, mask, scale=0.25)
    monkeypatch.setattr(blas, "SCORE_BLOCK_ELEMS", 7 * 64)
    blocked = blas.attention(q, k, v, mask, scale=0.25)
    ref = reference.attention(q, k, v, mask, scale=0.25)
    assert rel_err(whole, ref) < TOL
    assert rel_err(blocked, ref) < TOL


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v = qkv(1, 2, 2, 32, 32, 16, mx.bfloat16)
    out = blas.attention(q, k, v, None, scale=0.25)
    assert out.dtype == mx.bfloat16
    ref = reference.attention(*(a.astype(mx.float32) for a in (q, k, v)), None, scale=0.25)
    assert rel_err(out.astype(mx.float32), ref) < 1e-2  # the bf16 rounding of the output


def test_decode_rows_and_disabled_use_mlx(monkeypatch):
    called = []
    monkeypatch.setattr(blas._reference, "attention", lambda *a, **kw: called.append(a[0].shape[2]) or a[0])
    q, k, v = qkv(1, 2, 2, 1, 30, 16)
    blas.attention(q, k, v, None, scale=0.25)
    q, k, v = qkv(1, 2, 2, 32, 32, 16)
    blas.attention(q, k, v, None, scale=0.25, enabled=False)
    assert called == [1, 32]


def test_cpu_target_routes_attention_through_blas(monkeypatch):
    seen = []
    real = blas.attention
    monkeypatch.setattr(cpu_ops, "_blas_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q, k, v = qkv(1, 2, 2, 32, 32, 16)
    cpu_ops.attention(q, k, v, None, scale=0.25)
    assert seen and seen[0]["scale"] == 0.25


def test_decode_over_a_long_cache_takes_the_blas_path_and_matches(monkeypatch):
    q, k, v = qkv(2, 12, 2, 1, blas.MIN_KEYS + 5, 64)
    mask = causal_padded(1, blas.MIN_KEYS + 5, [0, 7])
    ref = reference.attention(q, k, v, mask, scale=0.125)
    monkeypatch.setattr(blas._reference, "attention", lambda *a, **kw: pytest.fail("took MLX's path"))
    out = blas.attention(q, k, v, mask, scale=0.125)
    assert rel_err(out, ref) < TOL


def test_per_frame_blocks_read_only_their_keys(monkeypatch):
    """A block-diagonal mask (a video's frames, each attending to itself) is computed block by
    block: no score matrix spans two frames, and the result equals MLX's."""
    seg = mx.array(sum(([f] * n for f, n in enumerate([40, 40, 40, 33])), []))
    mask = (seg[:, None] == seg[None, :])[None, None]
    q, k, v = qkv(1, 4, 2, 153, 153, 16)
    seen = []
    real, real_fused = blas._masked_softmax, blas._fused
    monkeypatch.setattr(blas, "_masked_softmax",
                        lambda s, scale, keep, *threads: (seen.append(s.shape), real(s, scale, keep, *threads)))

    def fused(q, k, v, out, scale, keep, *rest, **kw):  # the one-pass kernel: every head's rows of the block at once
        done = real_fused(q, k, v, out, scale, keep, *rest, **kw)
        if done:
            seen.append((q.shape[0] * q.shape[1], k.shape[1]))
        return done
    monkeypatch.setattr(blas, "_fused", fused)
    out = blas.attention(q, k, v, mask, scale=0.25)
    assert rel_err(out, reference.attention(q, k, v, mask, scale=0.25)) < TOL
    assert max(cols for _, cols in seen) == 40 and sum(rows for rows, _ in seen) == 2 * 2 * 153
    causal = causal_padded(24, 40, [0, 5])  # rows differ one by one: fixed runs, keys trimmed per run
    q2, k2, v2 = qkv(2, 4, 2, 24, 40, 32)
    assert rel_err(blas.attention(q2, k2, v2, causal, scale=0.2), reference.attention(q2, k2, v2, causal, scale=0.2)) < TOL


@pytest.mark.parametrize("D,L,S", [(72, 37, 53), (16, 20, 31), (128, 16, 300)])
def test_one_pass_kernel_odd_widths_and_the_blas_fallback(monkeypatch, D, L, S):
    """The one-pass kernel (vlmc_attention_rows) takes head widths that are not a multiple
    of 32 (SigLIP-so400m's 72), row counts off its 8-row tiles and key counts off its
    32-key blocks; with it declined the BLAS path gives the same result."""
    q, k, v = qkv(1, 4, 2, L, S, D)
    ran = []
    real = blas._fused
    monkeypatch.setattr(blas, "_fused", lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1])
    ref = reference.attention(q, k, v, None, scale=D ** -0.5)
    assert rel_err(blas.attention(q, k, v, None, scale=D ** -0.5), ref) < TOL
    if Path("/proc/cpuinfo").exists() and " avx512bw" in Path("/proc/cpuinfo").read_text():
        assert ran and all(ran)  # this CPU has AVX-512 (and the library is -march=native): the kernel ran
    monkeypatch.setattr(blas, "_fused", lambda *a, **kw: False)
    assert rel_err(blas.attention(q, k, v, None, scale=D ** -0.5), ref) < TOL


def test_heads_side_by_side_give_the_serial_result(monkeypatch):
    """The (KV head, block) products on the head pool (single-threaded BLAS each) give what
    the serial loop gives, bit for bit; where the pool exists at all (a per-thread BLAS
    setting and more than one thread)."""
    if blas._pool() is None:
        pytest.skip("no per-thread BLAS thread count here, or one thread: no head pool")
    monkeypatch.setattr(blas, "_fused", lambda *a, **kw: False)  # the BLAS path, where the pool works
    seg = mx.array(sum(([f] * n for f, n in enumerate([70, 61])), []))
    mask = (seg[:, None] == seg[None, :])[None, None]
    q, k, v = qkv(2, 6, 2, 131, 131, 32)
    pooled = np.asarray(blas.attention(q, k, v, mask, scale=0.2))
    monkeypatch.setattr(blas, "_pool", lambda: None)
    assert np.array_equal(pooled, np.asarray(blas.attention(q, k, v, mask, scale=0.2)))


def _avx512() -> bool:
    return Path("/proc/cpuinfo").exists() and " avx512f" in Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize("Hq,Hk,L,S,D,Dv", [(4, 2, 37, 53, 72, 72), (2, 1, 33, 241, 17, 20), (3, 3, 70, 501, 72, 72),
                                            (2, 2, 5, 13, 128, 128), (1, 1, 64, 480, 72, 40)])
@pytest.mark.parametrize("bf16", [0, 1])
def test_lanes_kernel_at_awkward_shapes(Hq, Hk, L, S, D, Dv, bf16):
    """vlmc_attention_lanes against float64 softmax attention: head widths off the 12-column
    steps (72, 20, 40), rows off its 32-row tiles, keys off its 12-key groups and 240-key
    blocks (so the online softmax rescales), odd key counts (bfloat16 pairs of keys),
    grouped-query heads, strided views. bfloat16 products: within 1.5e-2 of the output's
    scale (rounding q, k, p and v to 8-bit mantissas gives ~4e-3 here), and not the float32
    result (where the CPU has AVX512-BF16, the rounded products ran)."""
    from vlmc.kernels.cpu import _get_lib
    lib = _get_lib()
    if lib is None or not _avx512():
        pytest.skip("no C kernels or no AVX-512 here")
    has_bf16 = " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    rng = np.random.default_rng(L * S)
    q = rng.standard_normal((Hq, L, D + 3), dtype=np.float32)[..., :D] * 2  # scores spread over ~10
    k = rng.standard_normal((Hk, S, D), dtype=np.float32)
    v = rng.standard_normal((Hk, S, Dv), dtype=np.float32) + 1
    out = np.full((Hq, L, Dv + 5), np.nan, np.float32)
    o = out[..., :Dv]
    st = [a.strides[i] // 4 for a in (q, k, v, o) for i in (0, 1)]
    rc = lib.vlmc_attention_lanes(q.ctypes.data, st[0], st[1], k.ctypes.data, st[2], st[3], v.ctypes.data, st[4],
                                  st[5], o.ctypes.data, st[6], st[7], Hq, Hk, L, S, D, Dv, D ** -0.5, bf16, 2)
    if bf16 and not has_bf16:
        assert rc == -7  # the caller then asks for float32 products
        return
    assert rc == 0
    g = Hq // Hk
    s = np.einsum("hld,hsd->hls", q.astype(np.float64), np.repeat(k, g, 0).astype(np.float64)) * D ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ np.repeat(v, g, 0).astype(np.float64)
    assert np.isnan(out[..., Dv:]).all()  # nothing written past each row's Dv columns
    if not bf16:
        assert rel_err(o, ref) < TOL
        return
    err = rel_err(o, ref)
    assert 1e-4 < err < 1.5e-2


def _lanes_spy(monkeypatch, pick) -> list:
    """LANES_MIN_KEYS lowered to 100 and vlmc_attention_lanes wrapped: ``pick(args)`` of each
    call, in order (skips without the C kernels or AVX-512)."""
    from vlmc.kernels.cpu import _get_lib
    if _get_lib() is None or not _avx512():
        pytest.skip("no C kernels or no AVX-512 here")
    monkeypatch.setattr(blas, "LANES_MIN_KEYS", 100)
    lib, seen = _get_lib(), []
    real = lib.vlmc_attention_lanes
    monkeypatch.setattr(lib, "vlmc_attention_lanes", lambda *a: seen.append(pick(a)) or real(*a))
    return seen


def test_long_unmasked_blocks_take_the_lanes_kernel(monkeypatch):
    """cpu.attention routes unmasked blocks over LANES_MIN_KEYS or more keys to the lanes
    kernel, masked ones to the rows kernel; both match MLX's attention."""
    calls = _lanes_spy(monkeypatch, lambda a: a[14:18])
    q, k, v = qkv(2, 4, 2, 150, 150, 72)
    assert rel_err(blas.attention(q, k, v, None, scale=72 ** -0.5), reference.attention(q, k, v, None, scale=72 ** -0.5)) < TOL
    assert calls == [(150, 150, 72, 72)] * 2  # one call per sequence, every head at once
    seg = mx.array([0] * 80 + [1] * 70)
    mask = (seg[:, None] == seg[None, :])[None, None]
    calls.clear()
    assert rel_err(blas.attention(q, k, v, mask, scale=0.2), reference.attention(q, k, v, mask, scale=0.2)) < TOL
    assert calls == []  # per-segment blocks under 100 keys: the rows kernel


def test_bf16_allowance_reaches_the_lanes_kernel_only(monkeypatch):
    """cpu_ops.attention(dot="bfloat16") asks the lanes kernel for bfloat16 products; masked
    blocks (rows kernel) stay float32 to 1e-5; the reference ignores the allowance."""
    flags = _lanes_spy(monkeypatch, lambda a: a[19])
    q, k, v = qkv(1, 4, 4, 150, 150, 72)
    ref = reference.attention(q, k, v, None, scale=72 ** -0.5, dot="bfloat16")
    assert rel_err(ref, reference.attention(q, k, v, None, scale=72 ** -0.5)) == 0
    assert rel_err(cpu_ops.attention(q, k, v, None, scale=72 ** -0.5, dot="bfloat16"), ref) < 1.5e-2
    assert flags[-1] == 1
    assert rel_err(cpu_ops.attention(q, k, v, None, scale=72 ** -0.5), ref) < TOL
    assert flags[-1] == 0
    seg = mx.array([0] * 80 + [1] * 70)
    mask = (seg[:, None] == seg[None, :])[None, None]
    n = len(flags)
    out = cpu_ops.attention(q, k, v, mask, scale=0.2, dot="bfloat16")
    assert rel_err(out, reference.attention(q, k, v, mask, scale=0.2)) < TOL and len(flags) == n
