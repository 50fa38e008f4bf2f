"""Compile-time quantization of weights: what the ``quantize`` pass's choices become in
an artifact (``encode.write_param``, a block of rows at a time). Affine codes of up to SEARCH_BITS get each group's
range searched; every width with bf16/f16-stored parameters gets the codes nearest for
the stored parameters. The runtime side (``QuantWeight``, ``widen``) lives in
``vlmc.kernels.quant``; the search and the code choice run in C where the CPU kernels are
built (``vlmc/kernels/cpu/affine_search.c``), else as the MLX ops below.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..kernels import cpu
from ..kernels.quant import QuantWeight

# values of a weight searched or coded at a time by the MLX fallbacks, in whole rows
# (temporaries of a few float32 copies of a block: a few times 16 MB, whatever the width)
BLOCK_ELEMENTS = 1 << 22


def _block_rows(k: int) -> int:
    return max(1, BLOCK_ELEMENTS // k)

# What quantize_array writes for given options; part of the compile cache's key, so an
# artifact quantized by older code is rebuilt rather than reused. 1: mx.quantize's codes
# and parameters; 2: codes nearest for the stored (bf16/f16) parameters, and searched
# ranges up to SEARCH_BITS; 3: vision MLP hidden states widened to whole groups
# (passes/pad_hidden.py), so their down projections are quantized too.
QUANT_REVISION = 3


def quantize_array(w: mx.array, *, bits: int, group_size: int, mode: str,
                   param_dtype: mx.Dtype | None = None) -> QuantWeight:
    """``w`` [N, K] quantized. Affine codes of up to SEARCH_BITS get each group's range
    searched (``searched_params``); wider ones take ``mx.quantize``'s min/max range. Where
    the scales and biases will be stored narrower than float32 (``param_dtype``: a bf16 or
    f16 artifact) they are rounded to it first and each code re-chosen as the nearest for
    them: rounding only the parameters after the fact leaves 8-bit weights much more error,
    since a bias off by 2^-9 of the group's edge moves every value of the group by a quarter
    of an 8-bit step."""
    if mode == "affine" and bits <= SEARCH_BITS:
        scales, biases = searched_params(w, bits, group_size)
        if param_dtype is not None:
            scales, biases = scales.astype(param_dtype), biases.astype(param_dtype)
        return QuantWeight(nearest_codes(w, scales, biases, bits, group_size), scales, biases, bits, group_size, mode)
    parts = _quantize_in_blocks(w, group_size, bits, mode)
    if mode != "affine":
        return QuantWeight(parts[0], parts[1], None, bits, group_size, mode)
    scales, biases = parts[1], parts[2]
    if param_dtype is None or param_dtype == scales.dtype:
        return QuantWeight(parts[0], scales, biases, bits, group_size, mode)
    scales, biases = scales.astype(param_dtype), biases.astype(param_dtype)
    return QuantWeight(nearest_codes(w, scales, biases, bits, group_size), scales, biases, bits, group_size, mode)


def _quantize_in_blocks(w: mx.array, group_size: int, bits: int, mode: str) -> list[mx.array]:
    """``mx.quantize`` over blocks of BLOCK_ELEMENTS values (whole rows), concatenated: the
    same codes and scales (every group is quantized alone), without the temporaries MLX's
    CPU quantizer makes of the whole input (about 19 float32 copies for mxfp4 and nvfp4)."""
    step = _block_rows(w.shape[1])
    if w.shape[0] <= step:
        return list(mx.quantize(w, group_size=group_size, bits=bits, mode=mode))
    blocks = []
    for r0 in range(0, w.shape[0], step):
        blocks.append(mx.quantize(w[r0:r0 + step], group_size=group_size, bits=bits, mode=mode))
        mx.eval(blocks[-1])
    return [mx.concatenate([b[i] for b in blocks]) for i in range(len(blocks[0]))]


def dequantized(qw: QuantWeight) -> mx.array:
    """``qw``'s float32 values as the CPU kernels compute them (affine: from float32 scales
    and biases), dequantized BLOCK_ELEMENTS values at a time and concatenated: MLX's CPU
    dequantize makes temporaries of several float32 copies of its output (7 at 6 bits)."""
    f32 = mx.float32
    n, k = qw.shape

    def rows(r0: int, r1: int) -> mx.array:
        if qw.mode == "affine":
            return mx.dequantize(qw.weight[r0:r1], qw.scales[r0:r1].astype(f32), qw.biases[r0:r1].astype(f32),
                                 group_size=qw.group_size, bits=qw.bits, mode=qw.mode)
        return mx.dequantize(qw.weight[r0:r1], qw.scales[r0:r1], None, group_size=qw.group_size, bits=qw.bits,
                             mode=qw.mode).astype(f32)
    step = _block_rows(k)
    if n <= step:
        return rows(0, n)
    parts = []
    for r0 in range(0, n, step):
        parts.append(rows(r0, min(n, r0 + step)))
        mx.eval(parts[-1])
    return mx.concatenate(parts)


# Affine widths up to this get a searched range per group, and the range shrink factors
# tried: clipping a few extreme values buys finer steps for the rest, which pays at 2-4
# bits (tests/test_passes.py bounds the gain) and little from 5 bits up.
SEARCH_BITS = 4
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
REFITS = 2


def _codes(g: mx.array, s: mx.array, b: mx.array, top: int) -> mx.array:
    """The nearest code in [0, top] to each value for bias b and scale s (a zero scale
    divides by 1; as affine_search.c's as_code)."""
    return mx.clip(mx.round((g - b) / mx.where(s == 0, 1, s)), 0, top)


def _group_sse(g: mx.array, s: mx.array, b: mx.array, top: int) -> mx.array:
    return mx.sum(mx.square(_codes(g, s, b, top) * s + b - g), axis=-1, keepdims=True)


def searched_params(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array]:
    """float32 scales and biases [N, K / group_size] with small squared error: the best of
    ``mx.quantize``'s own and each group's min/max range shrunk about its middle by the
    factors of SHRINK (clipping a few extreme values buys finer steps for the rest), then
    REFITS times refitted by least squares (the scale and bias that best map the chosen
    codes onto the weights), each step kept per group only where it lowered the error.
    Through the C kernels where they are built (``kernels/cpu/affine_search.c``, several
    times faster), else MLX ops in blocks of rows."""
    w = w.astype(mx.float32)
    _, s0, b0 = mx.quantize(w, group_size=group_size, bits=bits)
    found = _search_c(np.asarray(w), bits, group_size, (np.asarray(s0), np.asarray(b0)), SHRINK, REFITS)
    if found is not None:
        return mx.array(found[0]), mx.array(found[1])
    return _searched_params_mlx(w, bits, group_size, s0, b0)


def _searched_params_mlx(w: mx.array, bits: int, group_size: int, s0: mx.array,
                         b0: mx.array) -> tuple[mx.array, mx.array]:
    n, k = w.shape
    top = (1 << bits) - 1
    out_s, out_b = [], []
    step = _block_rows(k)
    for r0 in range(0, n, step):
        g = w[r0:r0 + step].astype(mx.float32).reshape(-1, k // group_size, group_size)
        lo, hi = mx.min(g, axis=-1, keepdims=True), mx.max(g, axis=-1, keepdims=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        best_s, best_b = s0[r0:r0 + step][..., None], b0[r0:r0 + step][..., None]
        best_e = _group_sse(g, best_s, best_b, top)
        for f in SHRINK:
            s, b = 2 * half * f / top, mid - half * f
            e = _group_sse(g, s, b, top)
            keep = e < best_e
            best_s, best_b, best_e = mx.where(keep, s, best_s), mx.where(keep, b, best_b), mx.where(keep, e, best_e)
        for _ in range(REFITS):
            c = _codes(g, best_s, best_b, top)
            cm, gm = mx.mean(c, axis=-1, keepdims=True), mx.mean(g, axis=-1, keepdims=True)
            var = mx.sum(mx.square(c - cm), axis=-1, keepdims=True)
            s = mx.where(var > 0, mx.sum((c - cm) * (g - gm), axis=-1, keepdims=True) / mx.where(var > 0, var, 1), best_s)
            b = gm - s * cm
            e = _group_sse(g, s, b, top)
            keep = e < best_e
            best_s, best_b, best_e = mx.where(keep, s, best_s), mx.where(keep, b, best_b), mx.where(keep, e, best_e)
        mx.eval(best_s, best_b)
        out_s.append(best_s[..., 0])
        out_b.append(best_b[..., 0])
    cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs))
    return cat(out_s), cat(out_b)


def nearest_codes(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """MLX-packed affine codes of ``w`` [N, K]: per value the code q in [0, 2^bits) whose
    ``scales * q + biases`` (as given, any sign of scale) is nearest. In C where the kernels
    are built, else the MLX ops and numpy packing below: the same codes."""
    f32 = mx.float32
    found = _codes_c(np.asarray(w.astype(f32)), bits, group_size, np.asarray(scales.astype(f32)),
                         np.asarray(biases.astype(f32)))
    if found is not None:
        return mx.array(found)
    return _nearest_codes_mlx(w, scales, biases, bits, group_size)


def _nearest_codes_mlx(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    n, k = w.shape
    top = (1 << bits) - 1
    out = []
    step = _block_rows(k)
    for r0 in range(0, n, step):
        rows = w[r0:r0 + step].astype(mx.float32).reshape(-1, k // group_size, group_size)
        s = scales[r0:r0 + step].astype(mx.float32)[..., None]
        b = biases[r0:r0 + step].astype(mx.float32)[..., None]
        q = _codes(rows, s, b, top)
        out.append(pack_codes(np.asarray(q.astype(mx.uint32)).reshape(rows.shape[0], k), bits))
    return mx.array(np.concatenate(out) if len(out) > 1 else out[0])


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, K] (K a multiple of 32) as MLX packs them: each row one little-endian bit
    stream, code k at bits [bits k, bits k + bits), in uint32 words [N, K * bits / 32]."""
    n, k = codes.shape
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))
        return np.bitwise_or.reduce(codes.astype(np.uint32).reshape(n, k // per, per) << shifts, axis=-1)
    c = codes.astype(np.uint32).reshape(n, k // 32, 32)
    words = np.zeros((n, k // 32, bits), np.uint32)  # 32 codes fill exactly `bits` words
    for i in range(32):
        j, o = divmod(bits * i, 32)
        words[..., j] |= c[..., i] << np.uint32(o)
        if o + bits > 32:  # straddles into the next word
            words[..., j + 1] |= c[..., i] >> np.uint32(32 - o)
    return words.reshape(n, k * bits // 32)


def _search_c(w: np.ndarray, bits: int, group_size: int, first: tuple[np.ndarray, np.ndarray],
                  shrink: tuple[float, ...], refits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``searched_params`` in C (``affine_search.c``) on a float32 [N, K]
    array, ``first`` the (scales, biases) to start from: (scales, biases) float32
    [N, K / group_size], or None without the compiled kernels."""
    lib = cpu.library()
    if lib is None or group_size > 256:
        return None
    w = np.ascontiguousarray(w, np.float32)
    s0, b0 = (np.ascontiguousarray(a, np.float32) for a in first)
    n, k = w.shape
    sh = np.asarray(shrink, np.float32)
    scales = np.empty((n, k // group_size), np.float32)
    biases = np.empty_like(scales)
    _check(lib.vlmc_affine_search(w.ctypes.data, n, k, group_size, bits, s0.ctypes.data, b0.ctypes.data,
                                  sh.ctypes.data, sh.size, refits, scales.ctypes.data, biases.ctypes.data,
                                  cpu.n_threads), "affine_search")
    return scales, biases


def _codes_c(w: np.ndarray, bits: int, group_size: int, scales: np.ndarray,
                 biases: np.ndarray) -> np.ndarray | None:
    """``nearest_codes`` in C (``affine_search.c``), bit for bit: uint32
    words [N, K * bits / 32] for a float32 [N, K] array and float32 [N, K / group_size]
    scales and biases, or None without the compiled kernels."""
    lib = cpu.library()
    if lib is None:
        return None
    w = np.ascontiguousarray(w, np.float32)
    s, b = (np.ascontiguousarray(a, np.float32) for a in (scales, biases))
    n, k = w.shape
    out = np.empty((n, k * bits // 32), np.uint32)
    _check(lib.vlmc_affine_codes(w.ctypes.data, n, k, group_size, bits, s.ctypes.data, b.ctypes.data,
                                 out.ctypes.data, cpu.n_threads), "affine_codes")
    return out


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"vlmc cpu kernel {what} rejected its arguments (code {rc})")
