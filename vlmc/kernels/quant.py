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


def quantize_array(w: mx.array, *, bits: int, group_size: int, mode: str) -> QuantWeight:
    parts = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    biases = parts[2] if mode == "affine" else None
    return QuantWeight(parts[0], parts[1], biases, bits, group_size, mode)
