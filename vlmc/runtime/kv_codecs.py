"""How a KV cache stores one token's keys or values: dense, uniform affine, or TurboQuant.

A codec turns vectors ``x`` [B, H, L, D] into named arrays [B, H, L, width] (``encode``)
and back (``decode``). Caches store the named arrays as they are, so trimming, batching
and block export/import are the same for every layout, and a block exported from a
compressed cache is its packed codes (exact round trip).

- ``Dense(dtype)``: the vectors themselves.
- ``Affine(bits, group_size)``: affine quantization along D (as ``mx.quantize``), with
  bfloat16 scales and minimums per group: 8-bit/g64 is 0.53x, 4-bit/g64 0.28x of bf16.
- ``Turbo(bits, dim, seed)``: TurboQuant-style. A fixed random orthogonal rotation R
  spreads every vector's energy evenly over its D coordinates, so after dividing by the
  vector's norm each rotated coordinate is close to N(0, 1/D) whatever the model's
  outlier channels; each is then coded with the ``bits``-bit Lloyd-Max codebook of the
  standard normal, and the float32 norm is kept per vector. No per-group scales: 3 bits
  cost 3/16 + 4/(2D) of bf16. Attention can run in the rotated space (q·k = Rq·Rk), so
  keys never need rotating back.
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..kernels.kv_quant import affine_decode, lloyd_max, pack, rotation, turbo_decode_rotated, unpack  # noqa: F401  (pack/unpack: the codecs' packing)

AFFINE_BITS = (2, 3, 4, 8)
TURBO_BITS = (2, 3, 4)
GROUP_SIZES = (16, 32, 64, 128)


class Dense:
    kind = "dense"

    def __init__(self, dtype=mx.float32):
        self.dtype = dtype

    def widths(self, dim: int) -> dict[str, tuple[int, mx.Dtype]]:
        return {"x": (dim, self.dtype)}

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        return {"x": x.astype(self.dtype)}

    def decode(self, parts: dict[str, mx.array], dtype) -> mx.array:
        return parts["x"].astype(dtype)


class _Codec:
    """Encoding runs through ``mx.compile`` for one-token (decode-step) inputs: the ~20
    small ops per codec become a few fused kernels, one graph per batch size. Prompts
    (other lengths) run eagerly, so prompt lengths do not pile up compiled graphs."""

    _compiled = None  # mx.compile(self._encode), made on the first decode step

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        if x.ndim != 4 or x.shape[2] != 1:
            return self._encode(x)
        if self._compiled is None:
            self._compiled = mx.compile(self._encode)
        return self._compiled(x)


class Affine(_Codec):
    """Per group of ``group_size`` values: codes = round((x - min) / scale), scale =
    (max - min) / (2**bits - 1), with bfloat16 scale and minimum (the codes are computed
    against the rounded ones). Codes packed by ``pack`` (any group size that divides D,
    so small head dims work too, unlike ``mx.quantize``)."""

    kind = "affine"

    def __init__(self, bits: int, group_size: int = 64):
        if bits not in AFFINE_BITS:
            raise ValueError(f"uniform KV quantization takes {AFFINE_BITS} bits, not {bits}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"KV group size must be one of {GROUP_SIZES}, not {group_size}")
        self.bits, self.group_size = bits, group_size

    def widths(self, dim: int) -> dict[str, tuple[int, mx.Dtype]]:
        groups = dim // self.group_size
        return {"codes": (dim * self.bits // 8, mx.uint8), "scales": (groups, mx.bfloat16),
                "biases": (groups, mx.bfloat16)}

    def _encode(self, x: mx.array) -> dict[str, mx.array]:
        *lead, d = x.shape
        g = x.astype(mx.float32).reshape(*lead, d // self.group_size, self.group_size)
        lo, hi = g.min(-1), g.max(-1)
        levels = (1 << self.bits) - 1
        scales = ((hi - lo) / levels).astype(mx.bfloat16)
        biases = lo.astype(mx.bfloat16)
        s32 = mx.maximum(scales.astype(mx.float32), 1e-30)[..., None]
        codes = mx.clip(mx.round((g - biases.astype(mx.float32)[..., None]) / s32), 0, levels)
        return {"codes": pack(codes.astype(mx.uint32).reshape(*lead, d), self.bits),
                "scales": scales, "biases": biases}

    def decode(self, parts: dict[str, mx.array], dtype) -> mx.array:
        return affine_decode(parts["codes"], parts["scales"], parts["biases"], self.bits, self.group_size).astype(dtype)


class Turbo(_Codec):
    kind = "turboquant"

    def __init__(self, bits: int, dim: int, seed: int = 0):
        if bits not in TURBO_BITS:
            raise ValueError(f"TurboQuant KV takes {TURBO_BITS} bits per coordinate, not {bits}")
        if dim % 8:
            raise ValueError(f"TurboQuant KV needs a head dim divisible by 8, not {dim}")
        self.bits, self.dim, self.seed = bits, dim, seed
        self.rotation = mx.array(rotation(dim, seed))            # y = x @ R
        # host copies for the cpu kernels: R, R^T and the levels, float32 C-contiguous
        self.host = {"rotation": rotation(dim, seed), "rotation_t": np.ascontiguousarray(rotation(dim, seed).T),
                     "codebook": lloyd_max(bits)}
        self.codebook = mx.array(lloyd_max(bits))                 # centroids of N(0, 1)
        self.bounds = mx.array((lloyd_max(bits)[1:] + lloyd_max(bits)[:-1]) / 2)

    def widths(self, dim: int) -> dict[str, tuple[int, mx.Dtype]]:
        return {"codes": (dim * self.bits // 8, mx.uint8), "norms": (1, mx.float32)}

    def _encode(self, x: mx.array) -> dict[str, mx.array]:
        x = x.astype(mx.float32)
        norms = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
        unit = (x @ self.rotation) * (math.sqrt(self.dim) / mx.maximum(norms, 1e-30))
        codes = mx.sum(unit[..., None] > self.bounds, axis=-1).astype(mx.uint32)
        return {"codes": pack(codes, self.bits), "norms": norms}

    def decode_rotated(self, parts: dict[str, mx.array]) -> mx.array:
        """The vectors in the rotated space (x @ R), float32."""
        return turbo_decode_rotated(parts["codes"], parts["norms"], self.codebook, self.bits, self.dim)

    def decode(self, parts: dict[str, mx.array], dtype) -> mx.array:
        return (self.decode_rotated(parts) @ self.rotation.T).astype(dtype)


def make_codec(spec: dict, which: str, dim: int, dtype, layer: int = 0):
    """The codec of a kv-plan entry for keys (``which='k'``) or values."""
    layout = spec.get("layout", "dense")
    if layout in ("dense", "rotating"):
        return Dense(dtype)
    if layout == "quantized":
        return Affine(int(spec["bits"]), int(spec["group_size"]))
    if layout == "turboquant":
        return Turbo(int(spec[f"{which}_bits"]), dim, seed=layer * 2 + (which == "v"))
    raise ValueError(f"unknown KV layout {layout!r}")
