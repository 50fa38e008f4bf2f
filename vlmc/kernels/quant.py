"""A quantized weight as the runtime holds it: codes + scales (+ biases) + its scheme.

Keeping the scheme on the weight lets one generated block serve layers quantized
differently (mixed recipes) and keeps the generated code to ``ops.qlinear(x, w, b)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


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


# Affine widths the CPU target may repack at load (``widen``), and the width each becomes:
# codes and group scales/biases are unchanged, so the result is exactly the same matrix.
# Which of them are repacked on a given machine: ``runtime.artifact.cpu_widening``.
WIDER = {2: 4, 3: 4, 5: 8, 6: 8}


WIDEN_ROWS = 4096  # rows widened at a time (temporaries of 8 x WIDEN_ROWS x K bytes)


def widen(q: QuantWeight, bits: int) -> QuantWeight:
    """The same affine weight with its codes stored at ``bits`` (4 or 8) per value: exact,
    since a narrower code fits a wider one and the group scales and biases stay.

    Done (and evaluated) in blocks of ``WIDEN_ROWS`` rows: the codes pass through float32
    and uint32 temporaries of 4 bytes per value, which for a whole LM head at once would
    multiply a load's peak resident memory."""
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
