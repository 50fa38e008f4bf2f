"""A quantized weight as the runtime holds it: codes + scales (+ biases) + its scheme.

Keeping the scheme on the weight lets one generated block serve layers quantized
differently (mixed recipes) and keeps the generated code to ``ops.qlinear(x, w, b)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True, eq=False)
class QuantWeight:
    weight: mx.array          # uint32 packed codes [N, K * bits / 32]
    scales: mx.array
    biases: mx.array | None   # affine only
    bits: int
    group_size: int
    mode: str                 # "affine" | "mxfp4" | "mxfp8" | "nvfp4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    def dequantize(self, dtype=mx.float32) -> mx.array:
        w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        return w.astype(dtype)


def quantize_array(w: mx.array, *, bits: int, group_size: int, mode: str,
                   param_dtype: mx.Dtype | None = None) -> QuantWeight:
    """``mx.quantize``. For affine codes whose scales and biases will be stored in a
    narrower dtype than float32 (``param_dtype``: a bf16 or f16 artifact), the parameters
    are rounded to it first and each code re-chosen as the nearest for them: rounding only
    the parameters after the fact had left 8-bit weights 46% more error (relative 0.0079
    against 0.0054 on Gaussian rows; 6-bit 3%), since a bias off by 2^-9 of the group's
    edge moves every value of the group by a quarter of an 8-bit step."""
    parts = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    if mode != "affine":
        return QuantWeight(parts[0], parts[1], None, bits, group_size, mode)
    scales, biases = parts[1], parts[2]
    if param_dtype is None or param_dtype == scales.dtype:
        return QuantWeight(parts[0], scales, biases, bits, group_size, mode)
    scales, biases = scales.astype(param_dtype), biases.astype(param_dtype)
    return QuantWeight(nearest_codes(w, scales, biases, bits, group_size), scales, biases, bits, group_size, mode)


def nearest_codes(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """MLX-packed affine codes of ``w`` [N, K]: per value the code q in [0, 2^bits) whose
    ``scales * q + biases`` (as given, any sign of scale) is nearest, in blocks of rows."""
    n, k = w.shape
    top = (1 << bits) - 1
    out = []
    for r0 in range(0, n, WIDEN_ROWS):
        rows = w[r0:r0 + WIDEN_ROWS].astype(mx.float32).reshape(-1, k // group_size, group_size)
        s = scales[r0:r0 + WIDEN_ROWS].astype(mx.float32)[..., None]
        b = biases[r0:r0 + WIDEN_ROWS].astype(mx.float32)[..., None]
        q = mx.clip(mx.round((rows - b) / mx.where(s == 0, 1, s)), 0, top)
        out.append(pack_codes(np.asarray(q.astype(mx.uint32)).reshape(rows.shape[0], k), bits))
    return mx.array(np.concatenate(out) if len(out) > 1 else out[0])


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, K] (K a multiple of 32) as MLX packs them: each row one little-endian bit
    stream, code k at bits [bits k, bits k + bits), in uint32 words [N, K * bits / 32]."""
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n, k // 32, 32)
    words = np.zeros((n, k // 32, bits), np.uint32)  # 32 codes fill exactly `bits` words
    for i in range(32):
        j, o = divmod(bits * i, 32)
        words[..., j] |= c[..., i] << np.uint32(o)
        if o + bits > 32:  # straddles into the next word
            words[..., j + 1] |= c[..., i] >> np.uint32(32 - o)
    return words.reshape(n, k * bits // 32)


# Affine widths the CPU target may repack at load (``widen``), and the width each becomes:
# codes and group scales/biases are unchanged, so the result is exactly the same matrix.
# Which of them are repacked on a given machine: ``runtime.artifact.cpu_widening``.
WIDER = {2: 4, 3: 4, 5: 8, 6: 8}


WIDEN_ROWS = 4096  # rows widened at a time (temporaries of 8 x WIDEN_ROWS x K bytes)


def widen(q: QuantWeight, bits: int) -> QuantWeight:
    """The same affine weight with its codes stored at ``bits`` (4 or 8) per value: exact,
    since a narrower code fits a wider one and the group scales and biases stay.

    Done (and evaluated) in blocks of ``WIDEN_ROWS`` rows: the codes pass through float32
    and uint32 temporaries of 4 bytes per value, which for a whole 151936 x 1536 LM head
    raised a load's peak resident memory from 1.1 to 6.4 GB."""
    if q.mode != "affine" or bits <= q.bits or bits not in (4, 8):
        raise ValueError(f"cannot widen {q.mode} {q.bits}-bit codes to {bits} bits")
    n, k = q.shape
    shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
    parts = []
    for r0 in range(0, n, WIDEN_ROWS):
        w = q.weight[r0:r0 + WIDEN_ROWS]
        ones = mx.ones((w.shape[0], k // q.group_size), mx.float32)
        codes = mx.dequantize(w, ones, mx.zeros_like(ones), group_size=q.group_size, bits=q.bits)
        codes = codes.astype(mx.uint32).reshape(w.shape[0], k * bits // 32, 32 // bits)
        parts.append(mx.sum(codes << shifts, axis=-1).astype(mx.uint32))
        mx.eval(parts[-1])
    packed = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return QuantWeight(packed, q.scales, q.biases, bits, q.group_size, q.mode)
