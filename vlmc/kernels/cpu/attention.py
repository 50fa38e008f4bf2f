"""Attention over many query rows (prefill, vision) on the CPU: a one-pass C kernel, or BLAS.

MLX's CPU backend runs ``scaled_dot_product_attention`` on its reference matmul, several
times slower than numpy's BLAS on a vision layer's attention. Decode steps over a short
cache stay on MLX (little work, less overhead); over ``MIN_KEYS`` or more cached tokens
they come here too, where the single query row per head is a GEMV over the cache at
memory speed.

Per (sequence, KV head) the queries of every head sharing that KV head are stacked, so
grouped-query attention is one GEMM ``[group * L, D] @ [D, S]`` per block of query rows;
blocks bound the score matrix to ``SCORE_BLOCK_ELEMS`` floats, and each block reads only the
keys its rows attend to (per-image and per-frame masks: a video's frames cost their own
blocks, not the whole clip squared). Each block runs through a one-pass C kernel where
the CPU has AVX-512 (``vlmc_attention_lanes`` for unmasked blocks over many keys: 32 query
rows across the vector lanes, online softmax over key blocks; else ``vlmc_attention_rows``:
scores of 8 query rows at a time kept in cache), elsewhere through BLAS with the C softmax. Semantics are those of
``mx.fast.scaled_dot_product_attention`` with a boolean mask (True = attend) or none.

On the BLAS path, where numpy's OpenBLAS can set its thread count per calling thread
(``openblas_set_num_threads_local``), the (KV head, block) products run on a small pool
of Python threads, one single-threaded BLAS call and softmax each (numpy and ctypes
release the GIL): on a busy host the GEMMs' own threads wait on each other at every one
of the many small calls (a vision layer took 4x the single-threaded time), and heads side
by side need no such handoffs.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .. import reference as _reference
from . import _as_mx
from .host import table
from .scratch import empty

# Query rows, or cached keys, from which the BLAS path beats MLX's SDPA.
MIN_QUERY_ROWS = 16
MIN_KEYS = 1024
SCORE_BLOCK_ELEMS = 16 * 1024 * 1024  # float32 scores held at once (64 MB)
FUSED_MIN_ROWS = 8  # query rows per head from which the one-pass kernel runs
# Keys from which an unmasked block takes the lanes kernel (query rows across the vector
# lanes, online softmax over key blocks): ahead of the rows kernel from ~1024 keys (D 64:
# 92 against 88 GFLOP per CPU second), 1.25x at SigLIP-so400m's 4096 keys of D 72.
LANES_MIN_KEYS = 1024
LANES_MIN_ROWS = 32


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, *,
              scale: float, enabled: bool = True, host: bool = False, bf16: bool = False) -> mx.array:
    """softmax(q k^T * scale, masked) v for q [B, H, L, D], k/v [B, Hkv, S, D(v)].
    q, k, v may be float32 numpy arrays; ``host=True`` returns a float32 result as one.
    ``bf16``: the lanes kernel may multiply bfloat16-rounded operands (where the CPU has
    AVX512-BF16); every other path computes in float32."""
    if q.ndim != 4 or k.ndim != 4:
        return _reference.attention(_as_mx(q), _as_mx(k), _as_mx(v), mask, scale=scale)
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    # Several query rows (prefill, a prefill chunk, verify) always take the one-pass kernel
    # where it runs, at any row count: a row's bits must not depend on how many rows the
    # call holds (a short prompt alone and the same prompt left-padded in a batch).
    rows_fused = L > 1 and _fused_available()
    if (not enabled or (L < MIN_QUERY_ROWS and S < MIN_KEYS and not rows_fused) or H % Hk
            or (mask is not None and (mask.dtype != mx.bool_ or mask.ndim != 4 or mask.shape[1] != 1))):
        return _reference.attention(_as_mx(q), _as_mx(k), _as_mx(v), mask, scale=scale)
    out_dtype = mx.float32 if type(q) is np.ndarray else q.dtype
    qn, kn, vn = (table(a) for a in (q, k, v))
    mn = None if mask is None else np.asarray(mask)  # [B or 1, 1, L or 1, S]
    group = H // Hk
    Dv = vn.shape[-1]
    out = empty((B, H, L, Dv), np.float32)
    pool = _pool()
    work = []  # (b, h, r0, r1, k0, k1, keep of the block or None)
    for b in range(B):
        keep = None if mn is None else np.broadcast_to(mn[b if mn.shape[0] > 1 else 0, 0], (L, S))
        for r0, r1, k0, k1 in _blocks(keep, L, S, group, SCORE_BLOCK_ELEMS // (pool[1] if pool else 1)):
            if k0 >= k1:  # these query rows see no key (left padding): zeros
                out[b, :, r0:r1] = 0
                continue
            block_keep = None if keep is None else keep[r0:r1, k0:k1]
            if block_keep is not None:
                block_keep = None if block_keep.all() else np.ascontiguousarray(block_keep)
            if _fused(qn[b, :, r0:r1], kn[b, :, k0:k1], vn[b, :, k0:k1], out[b, :, r0:r1], scale, block_keep,
                      any_rows=rows_fused, bf16=bf16, lanes=mn is None):
                continue
            work += [(b, h, r0, r1, k0, k1, block_keep) for h in range(Hk)]

    def one(item, threads: int | None = None) -> None:
        b, h, r0, r1, k0, k1, block_keep = item
        heads = slice(h * group, (h + 1) * group)
        s = qn[b, heads, r0:r1].reshape(-1, D) @ kn[b, h, k0:k1].T  # [group * rows, keys]
        _masked_softmax(s, scale, block_keep, threads)
        out[b, heads, r0:r1] = (s @ vn[b, h, k0:k1]).reshape(group, r1 - r0, Dv)

    if pool and len(work) > 1:
        list(pool[0].map(lambda item: one(item, 1), work))
    else:
        for item in work:
            one(item)
    if host and out_dtype == mx.float32:
        return out
    y = mx.array(out)
    return y if out_dtype == mx.float32 else y.astype(out_dtype)


def _fused_available() -> bool:
    """Whether ``vlmc_attention_rows`` runs on this machine (the kernels built with AVX-512)."""
    from . import _get_lib
    lib = _get_lib()
    return lib is not None and bool(lib.vlmc_attention_rows_available())


def _fused(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, scale: float,
           keep: np.ndarray | None, any_rows: bool = False, bf16: bool = False, lanes: bool = False) -> bool:
    """One block through ``vlmc_attention_lanes`` (``lanes``: a call without a mask, over
    long key runs) or ``vlmc_attention_rows`` (q [Hq, rows, D], k/v [Hk, keys, D(v)], every
    head at once, scores kept per tile of rows); False where it does not apply (no AVX-512,
    a layout it does not read), so the BLAS path runs. Blocks of fewer than FUSED_MIN_ROWS
    rows per head go to BLAS unless ``any_rows``. Only calls without a mask (vision towers)
    take the lanes kernel: a masked call's rows (a prompt, causal) would take it or not by
    how the rows are chunked and grouped, and its bits differ from the rows kernel's."""
    from . import _get_lib, n_threads
    lib = _get_lib()
    if lib is None or scale <= 0 or any(a.dtype != np.float32 or a.strides[-1] != 4 or any(st % 4 for st in a.strides)
                                        for a in (q, k, v, out)):
        return False
    (Hq, L, D), (Hk, S, _), Dv = q.shape, k.shape, v.shape[-1]
    if L < FUSED_MIN_ROWS and not any_rows:  # its tiles are 8 query rows: a decode row over a long cache would compute 8
        return False
    st = [a.strides[i] // 4 for a in (q, k, v, out) for i in (0, 1)]
    if lanes and keep is None and S >= LANES_MIN_KEYS and L >= LANES_MIN_ROWS:
        rc = lib.vlmc_attention_lanes(q.ctypes.data, st[0], st[1], k.ctypes.data, st[2], st[3], v.ctypes.data, st[4],
                                      st[5], out.ctypes.data, st[6], st[7], Hq, Hk, L, S, D, Dv, scale, int(bf16),
                                      n_threads)
        if rc == -7:  # no AVX512-BF16 here: float32 products
            rc = lib.vlmc_attention_lanes(q.ctypes.data, st[0], st[1], k.ctypes.data, st[2], st[3], v.ctypes.data,
                                          st[4], st[5], out.ctypes.data, st[6], st[7], Hq, Hk, L, S, D, Dv, scale, 0,
                                          n_threads)
        if rc == 0:
            return True
        if rc != -6:
            raise ValueError(f"vlmc cpu kernel attention_lanes rejected its arguments (code {rc})")
    rc = lib.vlmc_attention_rows(q.ctypes.data, st[0], st[1], k.ctypes.data, st[2], st[3], v.ctypes.data, st[4], st[5],
                                 out.ctypes.data, st[6], st[7], Hq, Hk, L, S, D, Dv, scale,
                                 None if keep is None else keep.view(np.uint8).ctypes.data,
                                 0 if keep is None else keep.shape[1], n_threads)
    if rc == -6:
        return False
    if rc != 0:
        raise ValueError(f"vlmc cpu kernel attention_rows rejected its arguments (code {rc})")
    return True


def _blocks(keep: np.ndarray | None, L: int, S: int, group: int,
            elems: int = SCORE_BLOCK_ELEMS) -> list[tuple[int, int, int, int]]:
    """(row start, row end, key start, key end) blocks covering the query rows: each block's
    keys are the span its rows attend to (a block-diagonal mask, one block per image or video
    frame, then costs its blocks, not L x S), and its score matrix fits SCORE_BLOCK_ELEMS.
    Rows are grouped by the key span they attend to where such groups are long (masks made of
    segments), else in fixed runs."""
    if keep is None:
        rows = max(1, elems // max(1, group * S))
        return [(r0, min(L, r0 + rows), 0, S) for r0 in range(0, L, rows)]
    any_key = keep.any(axis=1)
    first = np.where(any_key, keep.argmax(axis=1), S)
    last = np.where(any_key, S - keep[:, ::-1].argmax(axis=1), 0)  # exclusive
    change = np.flatnonzero((first[1:] != first[:-1]) | (last[1:] != last[:-1])) + 1
    if len(change) + 1 <= max(1, L // 16):
        groups = list(zip([0, *change.tolist()], [*change.tolist(), L]))
    else:
        groups = [(0, L)]
    out = []
    for g0, g1 in groups:
        span = max(1, int(last[g0:g1].max()) - int(first[g0:g1].min()))
        rows = max(1, elems // max(1, group * span))
        for r0 in range(g0, g1, rows):
            r1 = min(g1, r0 + rows)
            k0, k1 = int(first[r0:r1].min()), int(last[r0:r1].max())
            out.append((r0, r1, k0, max(k0, k1)))
    return out


def _masked_softmax(s: np.ndarray, scale: float, keep: np.ndarray | None, threads: int | None = None) -> None:
    """softmax(scale * s) in place along rows of s [n * R, S], where ``keep`` [R, S] (True =
    attend) masks each block of R rows: the C kernel (``threads``, default all; one exp
    pass) or numpy."""
    from . import _get_lib, n_threads
    lib = _get_lib()
    if lib is not None and s.flags.c_contiguous and s.dtype == np.float32 and scale > 0:
        rc = lib.vlmc_softmax_rows(s.ctypes.data, s.shape[0], s.shape[1], scale,
                                   None if keep is None else keep.view(np.uint8).ctypes.data,
                                   0 if keep is None else keep.shape[0], threads or n_threads)
        if rc == 0:
            return
    s *= np.float32(scale)
    if keep is not None:
        blocks = s.reshape(-1, *keep.shape)
        blocks += np.where(keep, np.float32(0), np.float32(-np.inf))
    _softmax_rows(s)


def _softmax_rows(s: np.ndarray) -> None:
    """In place along the last axis. A fully masked row (a left-padding query of a ragged
    batch) gives zeros where MLX gives the mean of v: both finite, and no result reads it."""
    m = s.max(-1, keepdims=True)
    np.maximum(m, np.float32(-3.0e38), out=m)  # all -inf -> finite, so exp gives 0, not NaN
    s -= m
    np.exp(s, out=s)
    total = s.sum(-1, keepdims=True)
    np.maximum(total, np.float32(1e-30), out=total)
    s /= total


_pool_state: list = []  # [(executor, workers) or None, pid], built on first use and in a forked child
_pool_lock = threading.Lock()


def _blas_local_setter():
    """numpy's OpenBLAS ``openblas_set_num_threads_local`` (the calling thread's BLAS
    thread count), or None where the loaded BLAS has no such function."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {p for p in (line.split()[-1] for line in f) if "openblas" in p.lower() and ".so" in p}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local")
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        return fn
    return None


def _pool():
    """(executor, workers) for head-parallel attention, or None (one thread, or no
    per-thread BLAS setting: the BLAS calls then use their own threads)."""
    from . import n_threads
    with _pool_lock:
        if not _pool_state or _pool_state[1] != os.getpid() or (_pool_state[0] and _pool_state[0][1] != n_threads):
            np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # the BLAS is loaded
            setter = _blas_local_setter() if n_threads > 1 else None
            _pool_state[:] = [(ThreadPoolExecutor(n_threads, thread_name_prefix="vlmc-attn",
                                                  initializer=setter, initargs=(1,)), n_threads)
                              if setter else None, os.getpid()]
        return _pool_state[0]
