"""Packed KV codes and attention over them without decoding the cache.

The packing, codebooks and rotations of ``vlmc.runtime.kv_codecs`` live here, beside the
decode-step attention ops that read the codes directly. ``kv_affine_decode`` and
``kv_turbo_decode`` are the pure-MLX references (and the test oracles) of the GPU kernels
``vlmc/kernels/gpu/kv_affine_decode.{cu,metal}`` and ``kv_turbo_decode.{cu,metal}``, which
take the same arguments: every cache buffer at full capacity (only the first ``held``
tokens are read), and each sequence's first valid key in ``starts``.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import mlx.core as mx
import numpy as np


def pack(codes: mx.array, bits: int) -> mx.array:
    """uint8 [..., D * bits / 8]: 8-bit codes as they are; otherwise each run of 8 codes
    becomes ``bits`` bytes, code i at bit i * bits of their little-endian word."""
    if bits == 8:
        return codes.astype(mx.uint8)
    *lead, d = codes.shape
    groups = codes.reshape(*lead, d // 8, 8).astype(mx.uint32)
    word = mx.sum(groups << (mx.arange(8, dtype=mx.uint32) * bits), axis=-1)        # 8*bits <= 32 bits
    parts = (word[..., None] >> (mx.arange(bits, dtype=mx.uint32) * 8)) & 0xFF
    return parts.astype(mx.uint8).reshape(*lead, d * bits // 8)


def unpack(packed: mx.array, bits: int, d: int) -> mx.array:
    if bits == 8:
        return packed.astype(mx.uint32)
    *lead, _ = packed.shape
    parts = packed.reshape(*lead, d // 8, bits).astype(mx.uint32)
    word = mx.sum(parts << (mx.arange(bits, dtype=mx.uint32) * 8), axis=-1)
    codes = (word[..., None] >> (mx.arange(8, dtype=mx.uint32) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, d)


@lru_cache(maxsize=None)
def lloyd_max(bits: int) -> np.ndarray:
    """The 2**bits reconstruction levels minimising the mean squared error of N(0, 1),
    by Lloyd's iterations on a fine grid (deterministic; cached per bit width)."""
    grid = np.linspace(-6, 6, 24001)
    pdf = np.exp(-grid ** 2 / 2)
    levels = np.quantile(np.random.default_rng(0).standard_normal(200_000), (np.arange(2 ** bits) + 0.5) / 2 ** bits)
    for _ in range(300):
        cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, grid)
        mass = np.bincount(cell, pdf, minlength=levels.size)
        levels = np.bincount(cell, pdf * grid, minlength=levels.size) / mass
    return levels.astype(np.float32)


@lru_cache(maxsize=None)
def rotation(dim: int, seed: int) -> np.ndarray:
    """A random orthogonal [dim, dim] matrix (QR of a seeded Gaussian, signs fixed)."""
    g = np.random.default_rng([seed, dim, 0x7B0]).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def affine_decode(codes: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """float32 values of affine codes: code * scale + minimum, per group of ``group_size``."""
    *lead, groups = scales.shape
    x = unpack(codes, bits, groups * group_size).astype(mx.float32).reshape(*lead, groups, group_size)
    x = x * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return x.reshape(*lead, groups * group_size)


def turbo_decode_rotated(codes: mx.array, norms: mx.array, codebook: mx.array, bits: int, dim: int) -> mx.array:
    """float32 TurboQuant vectors in the rotated space: codebook level * norm / sqrt(dim)."""
    return codebook[unpack(codes, bits, dim)] * (norms.astype(mx.float32) / dim ** 0.5)


def _valid(starts: mx.array, held: int, capacity: int, tokens: int = 1) -> mx.array:
    """[B, 1, tokens, capacity] True for the keys query t of this step's ``tokens`` sees:
    ``starts[b] <= i < held - tokens + 1 + t`` (the last ``tokens`` held are this step's)."""
    i = mx.arange(capacity)[None, None, :]
    end = held - tokens + 1 + mx.arange(tokens)[None, :, None]
    return ((i >= starts.reshape(-1, 1, 1)) & (i < end))[:, None]


def _attend(q: mx.array, keys: mx.array, values: mx.array, starts: mx.array, held: int, scale: float) -> mx.array:
    """q [B, H, D] over keys/values [B, Hkv, cap, D] (float32) -> [B, H, D]; or q [B, H, T, D]
    (T tokens of one step, causal among themselves) -> [B, H, T, D]."""
    one = q.ndim == 3
    qt = q[:, :, None] if one else q
    out = mx.fast.scaled_dot_product_attention(qt.astype(mx.float32), keys, values, scale=scale,
                                               mask=_valid(starts, held, keys.shape[2], qt.shape[2]))
    return out[:, :, 0] if one else out


def query_int8(q: mx.array, group_size: int) -> mx.array:
    """q (float32) as the cpu kernels score affine-coded keys with it, in the integer domain:
    per group of ``group_size`` values along the last axis, a = max|q| / 127, t = q * (127 /
    max|q|), an int8 code c = round(t) and an int8 residual r = round(256 (t - c)) (ties to
    even, r at most 127; a group of zeros stays zeros), the value (256 c + r) * (a / 256):
    q to ~1 / 65000 of its group's largest value (``docs/kv-cache.md``)."""
    *lead, d = q.shape
    g = q.astype(mx.float32).reshape(*lead, d // group_size, group_size)
    amax = mx.abs(g).max(-1, keepdims=True)
    f32 = lambda v: mx.array(v, mx.float32)  # noqa: E731
    t = g * mx.where(amax > 0, f32(127) / amax, f32(0))
    c = mx.clip(mx.round(t), -127, 127)
    r = mx.clip(mx.round((t - c) * f32(256)), -128, 127)
    return ((c * f32(256) + r) * (amax / f32(127) / f32(256))).reshape(*lead, d)


def kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts, held: int, *,
                     scale: float, bits: int, group_size: int, int8_query: bool = False) -> mx.array:
    """One decode step's attention over affine-coded keys/values (float32 [B, H, D], or
    [B, H, T, D] for q [B, H, T, D]: T tokens per sequence, the last T of ``held``).
    ``int8_query``: q as ``query_int8`` gives it, what the cpu kernels compute (the GPU
    kernels score with q as it is)."""
    if int8_query:
        q = query_int8(q, group_size)
    return _attend(q, affine_decode(k_codes, k_scales, k_biases, bits, group_size),
                   affine_decode(v_codes, v_scales, v_biases, bits, group_size), starts, held, scale)


def kv_dense_decode(q, keys, values, starts, held: int, *, scale: float) -> mx.array:
    """One decode step's attention over a dense cache's buffers (float32 [B, H, D], or
    [B, H, T, D] for T tokens per sequence as ``kv_affine_decode``): the reference of the
    CPU kernel that reads the buffers in place."""
    return _attend(q, keys.astype(mx.float32), values.astype(mx.float32), starts, held, scale)


def kv_turbo_decode(q_rot, k_codes, k_norms, v_codes, v_norms, k_codebook, v_codebook, starts, held: int, *,
                    scale: float, k_bits: int, v_bits: int) -> mx.array:
    """One decode step's attention over TurboQuant-coded keys/values, all in the rotated
    space: ``q_rot = q @ R``; the result is ``out @ R`` (multiply by R^T to return)."""
    d = q_rot.shape[-1]
    return _attend(q_rot, turbo_decode_rotated(k_codes, k_norms, k_codebook, k_bits, d),
                   turbo_decode_rotated(v_codes, v_norms, v_codebook, v_bits, d), starts, held, scale)


def merge_chunks(partial: mx.array, stats: mx.array) -> mx.array:
    """Attention output [B, H, D] from per-chunk partial results (the GPU kernels' split over
    the cached tokens): ``partial`` [B, H, C, D] is each chunk's sum of exp(s - m) * v and
    ``stats`` [B, H, C, 2] its (m, sum of exp(s - m)). Rescaling every chunk to the largest
    m is exact softmax; a row with no visible key gives zeros."""
    m, total = stats[..., 0], stats[..., 1]
    w = mx.exp(m - m.max(axis=-1, keepdims=True))
    norm = mx.maximum((w * total).sum(axis=-1), 1e-30)
    return (w[..., None] * partial).sum(axis=-2) / norm[..., None]


_starts_by_mask: dict[tuple[int, int], mx.array] = {}  # live masks only (entries leave with their mask)


_causal_by_mask: dict[tuple[int, int], bool] = {}  # live masks only, as _starts_by_mask


def causal_step(mask: mx.array | None, tokens: int) -> bool:
    """Whether a step's mask lets none of its ``tokens`` new tokens see a later one: what
    the KV kernels compute (causal from each sequence's start). A family's bidirectional
    spans in a prompt chunk break it; the caller then takes the reference path. The answer
    is kept while the mask lives: every layer of a step passes the same mask, and a 4k
    prompt's check reads a 16M-entry mask (~50 ms a layer)."""
    if mask is None or tokens <= 1:
        return True
    key = (id(mask), tokens)
    causal = _causal_by_mask.get(key)
    if causal is None:
        new = mask[..., -tokens:, mask.shape[-1] - tokens:]                    # [B, 1, T, T]
        causal = not bool(mx.any(new & mx.triu(mx.ones((tokens, tokens), dtype=mx.bool_), k=1)).item())
        _causal_by_mask[key] = causal
        weakref.finalize(mask, _causal_by_mask.pop, key, None)
    return causal


def starts_from_mask(mask: mx.array | None, batch: int) -> mx.array:
    """Each sequence's first visible key in a decode step's mask [B, 1, 1, S] (left padding).
    Every layer of a step passes the same mask object, so the answer is kept while that
    mask lives (and dropped with it: nothing outlives the step, e.g. after an unload)."""
    if mask is None:
        return mx.zeros((batch,), mx.int32)
    key = (id(mask), batch)
    starts = _starts_by_mask.get(key)
    if starts is None:
        row = mx.broadcast_to(mask[:, 0, -1], (batch, mask.shape[-1]))
        starts = mx.argmax(row.astype(mx.int32), axis=-1).astype(mx.int32)
        _starts_by_mask[key] = starts
        weakref.finalize(mask, _starts_by_mask.pop, key, None)
    return starts


def coded_decode_step(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None, *, scale: float,
                      affine=None, turbo=None, dense=None, max_tokens: int = 1, windows: bool = False,
                      softcap: float | None = None) -> mx.array | None:
    """A decode step (one query row) over a cache through the given kernels (functions with
    the signatures of ``kv_affine_decode`` / ``kv_turbo_decode`` / ``kv_dense_decode``) that
    read its buffers in place: stores k, v and returns the attention [B, H, 1, D]; None
    (nothing stored) when no kernel applies. Kernels that take several query tokens per
    sequence (q [B, H, T, D]; the cpu ones) take steps of up to ``max_tokens`` tokens on a
    cache that already holds some (speculative decoding's verify; a prompt still goes to
    the caller's path). Windowed caches (whose mask also hides old tokens still held) and
    soft-capped scores take the caller's other path, unless ``windows``: the dense and
    affine kernels then take ``window`` and ``softcap`` (the cpu ones). q may be a float32
    numpy array (the cpu target's host arrays); the result then comes from the kernel as is."""
    layout = getattr(cache, "layout", "dense")
    kernel = {"affine": affine, "turboquant": turbo, "dense": dense}.get(layout)
    T = q.shape[2]
    window = getattr(cache, "window", None) or 0
    if kernel is None or not 1 <= T <= max_tokens or (T > 1 and not cache.held):
        return None
    if (window or getattr(cache, "start", 0) or softcap) and not (windows and layout in ("dense", "affine")):
        return None
    cache.append(k, v)
    starts = starts_from_mask(mask, q.shape[0])
    if cache.start:  # the cache's first column holds position start
        starts = mx.maximum(starts - cache.start, 0)
    extra = dict(window=window, softcap=softcap or 0.0) if windows and layout != "turboquant" else {}
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    qk = q[:, :, 0] if T == 1 else q
    if layout == "dense":
        out = kernel(qk, kb["x"], vb["x"], starts, cache.held, scale=scale, **extra)
    elif layout == "affine":
        codec = cache.codecs["k"]
        out = kernel(qk, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"],
                     starts, cache.held, scale=scale, bits=codec.bits, group_size=codec.group_size, **extra)
    else:
        kc, vc = cache.codecs["k"], cache.codecs["v"]
        q0 = qk if isinstance(qk, mx.array) else mx.array(qk)
        out = kernel(q0.astype(mx.float32) @ kc.rotation, kb["codes"], kb["norms"], vb["codes"],
                     vb["norms"], kc.codebook, vc.codebook, starts, cache.held, scale=scale, k_bits=kc.bits,
                     v_bits=vc.bits) @ vc.rotation.T
    if T == 1:
        out = out[:, :, None]
    return out.astype(q.dtype) if isinstance(q, mx.array) and isinstance(out, mx.array) else out
