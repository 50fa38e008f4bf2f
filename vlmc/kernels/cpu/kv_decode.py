"""One decode step's attention over a KV cache on the CPU, reading its buffers in place:
affine or TurboQuant codes (``vlmc_kv_affine_decode`` / ``vlmc_kv_turbo_decode`` in kv_attention.c,
the CPU counterparts of the GPU kernels of the same names, with the same arguments and
references in ``vlmc.kernels.kv_quant``) and dense float32 (``vlmc_kv_dense_decode``).
Decoding the whole cache to floats every step (the coded references) reads and writes
several times the bytes the codes take. For dense caches the kernel also beats the BLAS
attention path in decode steps: one pass over the cached rows, decoded once for all the
query heads that share them."""
from __future__ import annotations

import ctypes
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


# ---- TurboQuant steps and prompts over coded caches, all in C ---------------------------

def rotate(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x [..., D] @ m [D, D] row by row (``vlmc_kv_rotate``: each row's sums in a fixed order,
    whatever the row count)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _check(_get_lib().vlmc_kv_rotate(x.ctypes.data, x.size // x.shape[-1], x.shape[-1], m.ctypes.data,
                                     out.ctypes.data), "kv_rotate")
    return out


def kv_turbo_encode(x: np.ndarray, codec) -> dict[str, np.ndarray]:
    """Vectors x [..., D] (float32) as ``kv_codecs.Turbo`` stores them, coded in C
    (``vlmc_kv_turbo_encode``): {"codes": uint8 [..., D * bits / 8], "norms": float32 [..., 1]}.
    The rotation's rounding is the C kernel's, not MLX's matmul: a coordinate within float32
    rounding of a codebook boundary may take the neighbouring code."""
    x = np.ascontiguousarray(x, np.float32)
    *lead, d = x.shape
    out = {"codes": np.empty((*lead, d * codec.bits // 8), np.uint8), "norms": np.empty((*lead, 1), np.float32)}
    _check(_get_lib().vlmc_kv_turbo_encode(x.ctypes.data, x.size // d if d else 0, d, codec.bits,
                                           codec.host["rotation"].ctypes.data, codec.host["codebook"].ctypes.data,
                                           out["codes"].ctypes.data, out["norms"].ctypes.data), "kv_turbo_encode")
    return out


def _encode_host(cache, x: np.ndarray, which: str) -> dict[str, np.ndarray] | None:
    """This step's (or chunk's) keys or values as the cache stores them, coded in C."""
    codec = cache.codecs[which]
    if cache.layout == "turboquant":
        return kv_turbo_encode(x, codec)
    return kv_affine_encode(x, codec.bits, codec.group_size)


def _coded_ok(cache, head_dim_of_q: int) -> bool:
    """Whether the C kernels read and write this cache in a step or prompt of host rows:
    4/8-bit affine codes with bfloat16 scales, or TurboQuant codes; no sliding window."""
    layout = getattr(cache, "layout", None)
    if _get_lib() is None or layout not in ("affine", "turboquant") or getattr(cache, "window", None) \
            or cache.start or cache.head_dim != head_dim_of_q:
        return False
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    if layout == "turboquant":
        return kc.bits in (2, 3, 4) and vc.bits in (2, 3, 4) and cache.head_dim % 8 == 0
    return (kc.bits in (4, 8) and (vc.bits, vc.group_size) == (kc.bits, kc.group_size)
            and cache.head_dim % kc.group_size == 0 and (cache.buffers is None or all(
                parts["scales"].dtype == mx.bfloat16 for parts in cache.buffers.values())))


def _store_parts(cache, parts: dict[str, dict[str, np.ndarray]]) -> None:
    """Append T tokens in stored form ({"k": {name: [B, Hkv, T, width]}, "v": ...}): into the
    buffers' memory in place where that is safe (``host_writable`` and T free columns), else
    through MLX, evaluated now (the kernels read the buffers next)."""
    T = next(iter(parts["k"].values())).shape[2]
    settle(cache)
    if cache.host_writable() and cache.held + T <= cache.capacity:
        mx.eval(*(b for p in cache.buffers.values() for b in p.values()))
        views = {(w, name): _writable(cache.buffers[w][name], arr.dtype) for w, named in parts.items()
                 for name, arr in named.items()}
        if all(view is not None for view in views.values()):
            for (w, name), view in views.items():
                view[:, :, cache.held:cache.held + T] = parts[w][name]
            cache.offset += T
            return
    append_parts_lazy(cache, parts)
    settle(cache)


def _writable(a: mx.array, dtype) -> np.ndarray | None:
    """A writable numpy view of an evaluated array's memory as ``dtype`` (bfloat16 as its uint16
    bits), or None when it is not one C-contiguous block."""
    view = memoryview(a)
    if not view.c_contiguous:
        return None
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * a.nbytes).from_address(addr))
    return flat.view(dtype).reshape(a.shape)


# query tokens per kernel call of a prompt: the score rows a call holds (R T x the cache's
# columns, per thread) stay near 16 MB
PROMPT_SCORE_FLOATS = 4 * 1024 * 1024


def _attend_coded(qn: np.ndarray, cache, starts: np.ndarray, held: int, scale: float) -> np.ndarray:
    """The attention of q [B, H, T, D] (host, float32; the last T of ``held`` rows, causal)
    over the cache's codes, TurboQuant's in its rotated space and rotated back."""
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    if cache.layout == "turboquant":
        out = kv_turbo_decode(rotate(qn, kc.host["rotation"]), kb["codes"], kb["norms"], vb["codes"], vb["norms"],
                              kc.codebook, vc.codebook, starts, held, scale=scale, k_bits=kc.bits, v_bits=vc.bits)
        return rotate(out, vc.host["rotation_t"])
    return kv_affine_decode(qn, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"],
                            starts, held, scale=scale, bits=kc.bits, group_size=kc.group_size)


def host_coded_step(q, k, v, cache, mask, *, scale: float) -> np.ndarray | None:
    """A decode (or verify) step of host rows q [B, H, T, D] over a TurboQuant cache, all in
    C as ``decode_layers`` computes it: this step's keys and values coded (``kv_turbo_encode``)
    and stored, q rotated into the keys' space, attention over the codes, the output rotated
    back. None when this path does not apply (the caller's path then runs)."""
    from . import GEMV_MAX_ROWS
    T = q.shape[2] if type(q) is np.ndarray and q.ndim == 4 else 0
    if (not 1 <= T <= GEMV_MAX_ROWS or getattr(cache, "layout", None) != "turboquant" or not cache.held
            or not _coded_ok(cache, q.shape[-1]) or q.shape[1] % cache.kv_heads):
        return None
    kn, vn = (np.asarray(a, np.float32) if type(a) is np.ndarray else np.asarray(a.astype(mx.float32)) for a in (k, v))
    _store_parts(cache, {"k": _encode_host(cache, kn, "k"), "v": _encode_host(cache, vn, "v")})
    return _attend_coded(np.ascontiguousarray(q, np.float32), cache, host_starts(mask, q.shape[0]), cache.held, scale)


def host_coded_prompt(q, k, v, cache, mask, *, scale: float) -> np.ndarray | None:
    """A prompt chunk's rows q [B, H, L, D] over a 4/8-bit affine or TurboQuant cache on the
    C kernels: the chunk's keys and values coded in C and stored, then each query row
    attends over the codes (the chunk's own included, causal from each sequence's first
    visible key) through the decode kernels' several-token form, in blocks of query tokens.
    Every row is computed as a one-token decode step at its place would compute it, so its
    result does not depend on the batch, the chunking or the block. Returns a float32 host
    array, or None when this path does not apply (nothing stored)."""
    if q.ndim != 4 or not _coded_ok(cache, q.shape[-1]) or q.shape[1] % cache.kv_heads:
        return None
    B, H, L, D = q.shape
    if not _kv_quant.causal_step(mask, L):
        return None
    kn, vn = (np.asarray(a, np.float32) if type(a) is np.ndarray else np.asarray(_as_mx(a).astype(mx.float32))
              for a in (k, v))
    _store_parts(cache, {"k": _encode_host(cache, kn, "k"), "v": _encode_host(cache, vn, "v")})
    qn = np.ascontiguousarray(q if type(q) is np.ndarray else np.asarray(_as_mx(q).astype(mx.float32)), np.float32)
    starts = host_starts(mask, B)
    held = cache.held
    block = max(1, min(L, PROMPT_SCORE_FLOATS // max(1, H // cache.kv_heads * held)))
    out = np.empty((B, H, L, D), np.float32)
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        out[:, :, t0:t1] = _attend_coded(np.ascontiguousarray(qn[:, :, t0:t1]), cache, starts, held - L + t1, scale)
    return out
