"""One decode step's attention over a KV cache on the CPU, reading its buffers in place:
affine or TurboQuant codes (``vlmc_kv_affine_decode`` / ``vlmc_kv_turbo_decode`` in kv_attention.c,
the CPU counterparts of the GPU kernels of the same names, with the same arguments and
references in ``vlmc.kernels.kv_quant``) and dense float32 (``vlmc_kv_dense_decode``).
Decoding the whole cache to floats every step (the coded references) reads and writes
several times the bytes the codes take. For dense caches the kernel also beats the BLAS
attention path in decode steps: one pass over the cached rows, decoded once for all the
query heads that share them."""
from __future__ import annotations

import weakref

import mlx.core as mx
import numpy as np

from .. import kv_quant as _kv_quant
from . import _as_mx, _check, _get_lib, _to_numpy


def _np(a) -> np.ndarray:
    """A C-contiguous numpy view (bf16 as raw uint16) of an evaluated array, or a numpy one."""
    if type(a) is np.ndarray:
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(_to_numpy(a))


def _run(fn, name: str, q, buffers: tuple, starts: mx.array, shape: tuple, held: int, *params):
    """Call C kernel ``fn`` with the arguments every KV decode kernel takes: host pointers
    to q (float32), the cache buffers and starts (int32), then B, H, HKV, D, (for q
    [B, H, T, D], T tokens per sequence, to the kernel's ``_n`` variant: T), capacity, held,
    the layout's own ``params``, the output and the thread count. A numpy q (the cpu op
    library's host arrays) gets a numpy result, an mx.array q an mx.array."""
    host = type(q) is np.ndarray
    if type(starts) is np.ndarray:
        starts = np.ascontiguousarray(starts, dtype=np.int32)
    elif starts.dtype != mx.int32:
        starts = starts.astype(mx.int32)
    if host:
        mx.eval(*(a for a in (starts, *buffers) if isinstance(a, mx.array)))
        qn = np.ascontiguousarray(q, dtype=np.float32)
    else:
        q = q.astype(mx.float32)
        mx.eval(q, *(a for a in (starts, *buffers) if isinstance(a, mx.array)))
        qn = _np(q)
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    tokens = () if q.ndim == 3 else (q.shape[2],)
    hosts = [qn] + [None if a is None else _np(a) for a in (*buffers, starts)]
    out = np.empty(q.shape, np.float32)
    from . import n_threads  # the current setting (refresh() may change it)
    _check(fn(*(None if h is None else h.ctypes.data for h in hosts), B, H, shape[1], D, *tokens, shape[2], held,
              *params, out.ctypes.data, n_threads), name)
    return out if host else mx.array(out)


def _n(lib, name: str, q):
    """The kernel for q's form: ``name`` for [B, H, D], its ``_n`` variant for [B, H, T, D]."""
    return getattr(lib, name if q.ndim == 3 else name + "_n")


def kv_affine_decode(q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts, held: int, *,
                     scale: float, bits: int, group_size: int, window: int = 0, softcap: float = 0.0) -> mx.array:
    """float32 [B, H, D] attention of q [B, H, D] over the first ``held`` coded tokens; for q
    [B, H, T, D] (T tokens per sequence, the last T of ``held``; token t sees the keys up to
    its own) [B, H, T, D], each token's row what the one-token kernel gives at its place.
    ``window`` > 0: a query sees no key more than window - 1 rows before its own (the rows
    of a rotating cache); ``softcap`` > 0: soft-capped scores (both C only). The keys are
    scored against q's int8 codes per group (``kv_quant.query_int8``), in the integer
    domain where the CPU has VNNI."""
    lib = _get_lib()
    H, D = q.shape[1], q.shape[-1]
    if (lib is None or bits not in (4, 8) or k_scales.dtype != mx.bfloat16 or D % group_size
            or k_codes.ndim != 4 or H % k_codes.shape[1]):
        if window or softcap:
            raise ValueError("windowed or soft-capped KV attention needs the C kernels")
        return _kv_quant.kv_affine_decode(_as_mx(q), k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, starts,
                                          held, scale=scale, bits=bits, group_size=group_size, int8_query=True)
    return _run(_n(lib, "vlmc_kv_affine_decode", q), "kv_affine_decode", q,
                (k_codes, k_scales, k_biases, v_codes, v_scales, v_biases), starts, k_codes.shape, held,
                bits, group_size, scale, int(window), float(softcap))


def kv_affine_encode(x: np.ndarray, bits: int, group_size: int) -> dict[str, np.ndarray] | None:
    """Vectors x [..., D] (float32) as ``kv_codecs.Affine(bits, group_size)`` stores them,
    computed in C (``vlmc_kv_affine_encode``, the codec's float32 operations one for one):
    {"codes": uint8 [..., D * bits / 8], "scales", "biases": bfloat16 bits as uint16
    [..., D / group_size]}; None without the compiled kernels."""
    lib = _get_lib()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, np.float32)
    *lead, d = x.shape
    rows = x.size // d if d else 0
    out = {"codes": np.empty((*lead, d * bits // 8), np.uint8),
           "scales": np.empty((*lead, d // group_size), np.uint16),
           "biases": np.empty((*lead, d // group_size), np.uint16)}
    _check(lib.vlmc_kv_affine_encode(x.ctypes.data, rows, d, bits, group_size, out["codes"].ctypes.data,
                                     out["scales"].ctypes.data, out["biases"].ctypes.data), "kv_affine_encode")
    return out


def kv_turbo_decode(q_rot, k_codes, k_norms, v_codes, v_norms, k_codebook, v_codebook, starts, held: int, *,
                    scale: float, k_bits: int, v_bits: int) -> mx.array:
    """float32 [B, H, D] attention of q_rot [B, H, D] over the first ``held`` TurboQuant-coded
    tokens, in the rotated space (the caller rotates the result back); q_rot [B, H, T, D]:
    T tokens per sequence as ``kv_affine_decode``."""
    lib = _get_lib()
    H, D = q_rot.shape[1], q_rot.shape[-1]
    if (lib is None or not {k_bits, v_bits} <= {2, 3, 4} or D % 8 or k_codes.ndim != 4
            or H % k_codes.shape[1]):
        return _kv_quant.kv_turbo_decode(q_rot, k_codes, k_norms, v_codes, v_norms, k_codebook, v_codebook,
                                         starts, held, scale=scale, k_bits=k_bits, v_bits=v_bits)
    f32 = [a.astype(mx.float32) for a in (k_norms, v_norms, k_codebook, v_codebook)]
    return _run(_n(lib, "vlmc_kv_turbo_decode", q_rot), "kv_turbo_decode", q_rot,
                (k_codes, f32[0], v_codes, f32[1], f32[2], f32[3]), starts, k_codes.shape, held,
                k_bits, v_bits, scale)


def kv_dense_decode(q, keys, values, starts, held: int, *, scale: float, new_k=None, new_v=None, window: int = 0,
                    softcap: float = 0.0) -> mx.array:
    """float32 [B, H, D] attention of q [B, H, D] over the first ``held`` tokens of float32
    buffers [B, HKV, cap, D]; with ``new_k, new_v`` ([B, HKV, D]) the last of those tokens
    is that pair instead, and the buffers hold only the ``held - 1`` before it. For q
    [B, H, T, D] (T tokens per sequence, the last T of ``held``, as ``kv_affine_decode``):
    [B, H, T, D], and ``new_k, new_v`` [B, HKV, T, D] stand for those T tokens. ``window``,
    ``softcap``: as ``kv_affine_decode``."""
    lib = _get_lib()
    H = q.shape[1]
    T = 1 if q.ndim == 3 else q.shape[2]
    if lib is None or keys.dtype != mx.float32 or values.dtype != mx.float32 or keys.ndim != 4 or H % keys.shape[1]:
        if window or softcap:
            raise ValueError("windowed or soft-capped KV attention needs the C kernels")
        if new_k is not None:
            nk, nv = (_as_mx(a) if q.ndim == 4 else _as_mx(a)[:, :, None] for a in (new_k, new_v))
            keys = mx.concatenate([keys[:, :, :held - T], nk], axis=2)
            values = mx.concatenate([values[:, :, :held - T], nv], axis=2)
        return _kv_quant.kv_dense_decode(_as_mx(q), keys, values, starts, held, scale=scale)
    if new_k is not None:
        new_k, new_v = (np.ascontiguousarray(a if type(a) is np.ndarray else _as_mx(a).astype(mx.float32), np.float32)
                        for a in (new_k, new_v))
    return _run(_n(lib, "vlmc_kv_dense_decode", q), "kv_dense_decode", q, (keys, values, new_k, new_v), starts,
                keys.shape, held, scale, int(window), float(softcap))


def affine_values(cache) -> tuple[np.ndarray, np.ndarray] | None:
    """Every held key and value of a 4- or 8-bit affine cache as float32 host arrays [B, HKV,
    held, D] (code * scale + minimum), dequantized by the threaded C kernel (vlmc_dequantize:
    the codes are MLX's packing, the scales and minimums bfloat16) instead of MLX's unpack
    and multiply-add, which at long contexts cost a prefill chunk more than its attention;
    None for any other cache or without the kernels. The prompt's attention (BLAS) then reads
    these."""
    lib = _get_lib()
    codec = getattr(cache, "codecs", {}).get("k")
    if (lib is None or getattr(cache, "layout", None) != "affine" or cache.buffers is None or not cache.held
            or codec.bits not in (4, 8) or cache.head_dim % codec.group_size):
        return None
    settle(cache)
    out = []
    for w in ("k", "v"):
        parts = cache.buffers[w]
        if parts["scales"].dtype != mx.bfloat16 or parts["biases"].dtype != mx.bfloat16:
            return None
        mx.eval(*parts.values())
        codes, scales, mins = (_np(parts[name]) for name in ("codes", "scales", "biases"))
        B, HKV, cap, _ = codes.shape
        x = np.empty((B, HKV, cap, cache.head_dim), np.float32)
        from . import n_threads
        _check(lib.vlmc_dequantize(codes.ctypes.data, scales.ctypes.data, mins.ctypes.data, 1, B * HKV * cap,
                                   cache.head_dim, codec.bits, codec.group_size, x.ctypes.data, n_threads),
               "dequantize")
        out.append(x[:, :, :cache.held])
    return out[0], out[1]


# Caches whose last decode step's writes are still lazy MLX slice updates (host_dense_step,
# decode_layer, where KVCache.write_host could not store them in place):
# evaluated together when one of them is read next, i.e. once per decode step for all
# layers instead of one evaluation per layer.
_unsettled: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def settle(cache=None) -> None:
    """Evaluate the deferred writes of every cache (or only if ``cache`` has some)."""
    if cache is not None and id(cache) not in _unsettled:
        return
    caches = list(_unsettled.values())
    _unsettled.clear()
    mx.eval(*(buf for c in caches if c.buffers for parts in c.buffers.values() for buf in parts.values()))


def dense_buffers(cache) -> tuple[mx.array, mx.array] | None:
    """The key and value buffers of a dense float32 cache that a decode step's kernels can
    read in place and then store into (some tokens held; a rotating cache's oldest tokens
    dropped first where its next append would drop them: ``make_room``), its deferred
    writes settled; None for any other cache."""
    if getattr(cache, "layout", None) != "dense" or cache.buffers is None or not cache.held:
        return None
    settle(cache)
    if getattr(cache, "window", None):
        cache.make_room()
    kb, vb = cache.buffers["k"]["x"], cache.buffers["v"]["x"]
    return (kb, vb) if kb.dtype == mx.float32 and vb.dtype == mx.float32 else None


_zero_starts: dict[int, np.ndarray] = {}


def host_starts(mask, batch: int, first: int = 0) -> np.ndarray:
    """Each sequence's first visible key (int32 numpy) as a column of a cache whose first
    column holds position ``first`` (a rotating cache's ``start``); without a mask, one zeros
    array per batch size (a fresh mx.zeros would cost each layer an evaluation)."""
    if mask is None:
        zeros = _zero_starts.get(batch)
        if zeros is None:
            zeros = _zero_starts[batch] = np.zeros(batch, np.int32)
        return zeros
    starts = np.asarray(_kv_quant.starts_from_mask(mask, batch), np.int32)
    return np.maximum(starts - first, 0).astype(np.int32) if first else starts


def store(cache, k: np.ndarray, v: np.ndarray) -> None:
    """Keep a decode step's keys/values [B, Hkv, 1, D]: in place (``KVCache.write_host``)
    or, where that is not safe, as a lazy write that ``settle`` evaluates with every other
    layer's."""
    if not cache.write_host(k, v):
        append_lazy(cache, k, v)


def append_lazy(cache, k: np.ndarray, v: np.ndarray) -> None:
    """Append one step's keys/values as a lazy MLX update, evaluated with the others at the
    next read (settle)."""
    cache.append(mx.array(k), mx.array(v))
    _unsettled[id(cache)] = cache


def append_parts_lazy(cache, parts: dict[str, dict[str, np.ndarray]]) -> None:
    """Append one step's keys/values already in the cache's stored form ({"k": {name:
    [B, Hkv, 1, width]}, "v": ...}, bfloat16 as its uint16 bits), as a lazy MLX update like
    ``append_lazy``."""
    widths = {w: cache.codecs[w].widths(cache.head_dim) for w in ("k", "v")}
    block = {f"{w}.{name}": _mx_stored(arr, widths[w][name][1]) for w, named in parts.items()
             for name, arr in named.items()}
    cache.import_blocks([block])
    _unsettled[id(cache)] = cache


def _mx_stored(a: np.ndarray, dtype) -> mx.array:
    """A host array of a stored form as an mx.array of ``dtype`` (bfloat16 from its bits)."""
    return mx.array(a).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(a).astype(dtype)


def host_dense_step(q: np.ndarray, k, v, cache, mask, *, scale: float, softcap: float | None = None) -> np.ndarray | None:
    """A decode step of the cpu target's host arrays over a dense float32 cache: attention
    over the held tokens plus this step's k, v read from the host arrays (the kernel's
    extra rows), then k, v stored (``store``). A step of T <= GEMV_MAX_ROWS tokens per
    sequence (verify) attends causally among them, each token as a one-token step would.
    A rotating cache's window bounds the keys each query sees; ``softcap``: soft-capped
    scores. None when this path does not apply (the caller's path then runs)."""
    from . import GEMV_MAX_ROWS
    T = q.shape[2] if type(q) is np.ndarray else 0
    if not 1 <= T <= GEMV_MAX_ROWS or _get_lib() is None:
        return None
    if getattr(cache, "layout", None) != "dense" or cache.buffers is None or q.shape[1] % cache.kv_heads:
        return None
    buffers = dense_buffers(cache)
    if buffers is None:
        return None
    kn, vn = (np.asarray(a, np.float32) if type(a) is np.ndarray else np.asarray(a.astype(mx.float32))
              for a in (k, v))
    starts = host_starts(mask, q.shape[0], cache.start)
    extra = dict(window=getattr(cache, "window", None) or 0, softcap=softcap or 0.0)
    if T == 1:
        out = kv_dense_decode(q[:, :, 0], *buffers, starts, cache.held + 1, scale=scale,
                              new_k=kn[:, :, 0], new_v=vn[:, :, 0], **extra)[:, :, None]
    else:
        out = kv_dense_decode(q, *buffers, starts, cache.held + T, scale=scale, new_k=kn, new_v=vn, **extra)
    store(cache, kn, vn)
    return out


def host_shared_step(q: np.ndarray, cache, mask, *, scale: float) -> np.ndarray | None:
    """A decode step of a layer that reads another layer's cache (KV sharing: the cache holds
    this step's T tokens already, the writer stored them) through the C kernels, storing
    nothing: q [B, H, T, D] attends as its T tokens would in ``host_dense_step``, over dense
    float32 or 4/8-bit affine buffers, within a rotating cache's window. None when this
    path does not apply (the caller's path then runs)."""
    from . import GEMV_MAX_ROWS
    T = q.shape[2] if type(q) is np.ndarray and q.ndim == 4 else 0
    layout = getattr(cache, "layout", None)
    if (not 1 <= T <= GEMV_MAX_ROWS or _get_lib() is None or cache.buffers is None or cache.held < T
            or q.shape[1] % cache.kv_heads or layout not in ("dense", "affine")):
        return None
    settle(cache)
    starts = host_starts(mask, q.shape[0], cache.start)
    window = getattr(cache, "window", None) or 0
    qk = q[:, :, 0] if T == 1 else q
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    if layout == "dense":
        if kb["x"].dtype != mx.float32 or vb["x"].dtype != mx.float32:
            return None
        out = kv_dense_decode(qk, kb["x"], vb["x"], starts, cache.held, scale=scale, window=window)
    else:
        codec = cache.codecs["k"]
        vc = cache.codecs["v"]
        if (codec.bits not in (4, 8) or (vc.bits, vc.group_size) != (codec.bits, codec.group_size)
                or kb["scales"].dtype != mx.bfloat16
                or cache.head_dim % codec.group_size):
            return None
        out = kv_affine_decode(qk, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"],
                               starts, cache.held, scale=scale, bits=codec.bits, group_size=codec.group_size,
                               window=window)
    return out[:, :, None] if T == 1 else out
