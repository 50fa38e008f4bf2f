"""Custom GPU kernels for the ``metal`` and ``cuda`` targets.

Each kernel is a CUDA body (``NAME.cu``, for ``mx.fast.cuda_kernel``) and a Metal body
(``NAME.metal``, for ``mx.fast.metal_kernel``) with the same inputs, outputs and template
parameters, plus the pure-MLX op of the same name and signature in
``vlmc.kernels.reference``, which is the test oracle and the fallback: on a machine
with neither GPU backend, or for inputs a kernel does not cover, the reference runs.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from .. import kv_quant as _kv_quant
from .. import reference as _reference

SOURCES = Path(__file__).resolve().parent
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def backend() -> str | None:
    """'cuda' or 'metal' when MLX runs on that GPU, else None."""
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


BODY_MARKER = "// @body\n"


def source(name: str, backend_name: str) -> str:
    return (SOURCES / f"{name}.{'cu' if backend_name == 'cuda' else 'metal'}").read_text()


# Kernels that share helper files (put in front of their header).
SHARED_HELPERS = {"kv_affine_decode": "kv_common", "kv_turbo_decode": "kv_common"}


@lru_cache(maxsize=None)
def _kernel(name: str, backend_name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    """The compiled-on-first-use kernel; text above a ``// @body`` line is its header
    (helper functions), the rest the body MLX wraps in the generated signature."""
    make = mx.fast.cuda_kernel if backend_name == "cuda" else mx.fast.metal_kernel
    text = source(name, backend_name)
    header, body = text.split(BODY_MARKER, 1) if BODY_MARKER in text else ("", text)
    if name in SHARED_HELPERS:
        header = source(SHARED_HELPERS[name], backend_name) + "\n" + header
    return make(name=name, input_names=list(inputs), output_names=list(outputs), source=body, header=header)


def _block(n: int) -> int:
    """Threads per row: about 4 elements each, a multiple of 32, at most 1024 (longer rows
    give each thread more: PER = ceil(n / block) elements held in registers)."""
    return min(1024, max(32, (n // 4 + 31) // 32 * 32))


@lru_cache(maxsize=64)
def _scalar(value: float) -> mx.array:
    """A float32 [1] array per value, made once (not a host-to-device copy per call)."""
    return mx.array([value], mx.float32)


def add_rms_norm(a: mx.array, b: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(h, y) = (a + b, rms_norm(a + b) * w) in one pass over the row."""
    be = backend()
    if (be is None or a.shape != b.shape or a.dtype != b.dtype or a.dtype not in KERNEL_DTYPES
            or w.ndim != 1 or a.ndim == 0 or w.shape[0] != a.shape[-1] or a.size == 0):
        return _reference.add_rms_norm(a, b, w, eps)
    n = a.shape[-1]
    block = _block(n)
    kernel = _kernel("add_rms_norm", be, ("a", "b", "w", "eps"), ("h", "y"))
    h, y = kernel(inputs=[a, b, w if w.dtype == a.dtype else w.astype(a.dtype), _scalar(float(eps))],
                  template=[("T", a.dtype), ("N", n), ("BLOCK", block), ("PER", -(-n // block))],
                  grid=(a.size // n * block, 1, 1), threadgroup=(block, 1, 1),
                  output_shapes=[a.shape, a.shape], output_dtypes=[a.dtype, a.dtype])
    return h, y


KV_BLOCK = 128  # threads per (sequence, KV head, chunk) block in the KV decode kernels
KV_CHUNK = 64   # cached tokens per block: a 32k-token cache spreads over 500 blocks per KV head


def _kv_common(q: mx.array, codes: mx.array) -> tuple[int, int, int, int] | None:
    if q.ndim != 3 or codes.ndim != 4 or q.shape[0] != codes.shape[0] or q.shape[1] % codes.shape[1]:
        return None
    B, H, D = q.shape
    return B, H, codes.shape[1], D


@lru_cache(maxsize=256)
def _int32(value: int) -> mx.array:
    """An int32 [1] array per value, made once: every layer of a decode step passes the same."""
    return mx.array([value], mx.int32)


_merge_chunks = mx.compile(_kv_quant.merge_chunks)  # ~9 small ops per layer fused


def _kv_fits(dims: tuple[int, int, int, int] | None, held: int) -> bool:
    """Whether the kernels take this call: something cached, and the block's query rows
    and scores ([G, D] + [G, KV_CHUNK] float32) within 32 KB of shared memory."""
    if dims is None or held <= 0:
        return False
    _, H, HKV, D = dims
    return H // HKV * (D + KV_CHUNK) * 4 <= 32 * 1024


def _launch_kv(name: str, dims: tuple[int, int, int, int], held: int, scale: float,
               arrays: dict[str, mx.array], template: list[tuple[str, int]]) -> mx.array:
    """One block of KV_BLOCK threads per (sequence, KV head, chunk of KV_CHUNK cached
    tokens); inputs in the kernel's order, then starts (int32), held and scale. The
    kernel's per-chunk partial outputs and softmax statistics are merged here."""
    B, H, HKV, D = dims
    chunks = -(-held // KV_CHUNK)
    arrays = {**arrays, "starts": arrays["starts"].astype(mx.int32), "held": _int32(held),
              "scale": _scalar(float(scale))}
    kernel = _kernel(name, backend(), tuple(arrays), ("partial", "stats"))
    partial, stats = kernel(inputs=list(arrays.values()),
                            template=[("H", H), ("HKV", HKV), ("D", D), *template, ("CHUNK", KV_CHUNK),
                                      ("BLOCK", KV_BLOCK)],
                            grid=(B * HKV * chunks * KV_BLOCK, 1, 1), threadgroup=(KV_BLOCK, 1, 1),
                            output_shapes=[(B, H, chunks, D), (B, H, chunks, 2)],
                            output_dtypes=[mx.float32, mx.float32])
    return _merge_chunks(partial, stats)


def kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts, held: int, *,
                     scale: float, bits: int, group_size: int) -> mx.array:
    """Decode-step attention over affine KV codes in place (``kernels.kv_quant`` reference)."""
    be, dims = backend(), _kv_common(q, k_codes)
    if be is None or not _kv_fits(dims, held) or bits not in (2, 3, 4, 8) or q.shape[-1] % group_size:
        return _kv_quant.kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts,
                                          held, scale=scale, bits=bits, group_size=group_size)
    return _launch_kv("kv_affine_decode", dims, held, scale,
                      {"q": q.astype(mx.float32), "k_codes": k_codes, "k_scales": k_scales, "k_biases": k_biases,
                       "v_codes": v_codes, "v_scales": v_scales, "v_biases": v_biases, "starts": starts},
                      [("BITS", bits), ("GROUP", group_size)])


def kv_turbo_decode(q_rot, k_codes, k_norms, v_codes, v_norms, k_codebook, v_codebook, starts, held: int, *,
                    scale: float, k_bits: int, v_bits: int) -> mx.array:
    """Decode-step attention over TurboQuant KV codes in place, in the rotated space."""
    be, dims = backend(), _kv_common(q_rot, k_codes)
    if be is None or not _kv_fits(dims, held) or q_rot.shape[-1] % 8 or not {k_bits, v_bits} <= {2, 3, 4}:
        return _kv_quant.kv_turbo_decode(q_rot, k_codes, k_norms, v_codes, v_norms, k_codebook, v_codebook, starts,
                                         held, scale=scale, k_bits=k_bits, v_bits=v_bits)
    return _launch_kv("kv_turbo_decode", dims, held, scale,
                      {"q_rot": q_rot.astype(mx.float32), "k_codes": k_codes, "k_norms": k_norms, "v_codes": v_codes,
                       "v_norms": v_norms, "k_codebook": k_codebook, "v_codebook": v_codebook, "starts": starts},
                      [("KBITS", k_bits), ("VBITS", v_bits)])


def cached_attention(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None = None,
                     *, scale: float, softcap: float | None = None) -> mx.array:
    """Decode steps over a quantized or TurboQuant cache read the codes in place (the
    kernels above); everything else, and soft-capped scores (Gemma 2), is the reference
    (decode the held tokens, then SDPA)."""
    if softcap is not None:
        return _reference.cached_attention(q, k, v, cache, mask, scale=scale, softcap=softcap)
    out = _kv_quant.coded_decode_step(q, k, v, cache, mask, scale=scale, affine=kv_affine_decode,
                                      turbo=kv_turbo_decode)
    return out if out is not None else _reference.cached_attention(q, k, v, cache, mask, scale=scale)
