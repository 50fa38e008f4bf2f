"""Fast CPU matmuls for the ``cpu`` target: mx.array in, mx.array out (or, with
``host=True``, a float32 numpy array out; x may be a numpy array too).

MLX's CPU backend links a reference BLAS and has no fast bf16 or quantized matmul, so:

- few rows (decode, x with <= ``GEMV_MAX_ROWS`` rows): C GEMV kernels (``gemv.c``) that
  stream the weight in its stored form (float32, bfloat16, or MLX affine 2-8 bit codes)
  once, computing in float32 (codes with int8 x on AVX512-VNNI machines, see
  ``int8_activations``);
- many rows (prefill, vision): for affine codes on AVX512-VNNI machines the int8 GEMM
  (``vlmc_gemm_q_i8``); otherwise numpy's bundled OpenBLAS float32 GEMM, with bf16 or
  quantized weights converted to float32 per call in slices of rows (no persistent copy).

Semantics are those of ``vlmc.kernels.reference`` (``x @ w.T + b``) and of
``mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)`` / ``mx.dequantize``;
the output dtype follows MLX's promotion rules. With float x only the float32 summation
order differs: float32 weights agree with MLX within ~1e-5 relative, bf16/quantized
weights within ~1e-4 of the output's scale; int8 x adds ~0.6% relative L2 error (see
tests/test_cpu_kernels.py).

``VLMC_CPU_KERNELS=0`` turns all of this off (pure MLX reference ops).
``VLMC_CPU_THREADS`` sets the thread count (default: the CPUs this process may use).
Weight arrays are treated as immutable: their host pointers are cached per array object
(dropped when the array is garbage-collected).
"""
from __future__ import annotations

import ctypes
import os
import weakref

import mlx.core as mx
import numpy as np

from ...errors import InputError
from .. import quant as _quant
from ..dtypes import bf16_bits
from .. import reference as _reference
from . import scratch as _scratch
from . import build as _build

__all__ = ["linear", "qlinear", "qembedding", "dequantize", "widen", "enabled", "available", "library",
           "n_threads"]

# x rows up to which the GEMV kernels (in passes of 8 rows) beat convert + OpenBLAS GEMM
# (the crossover lies at 16-32 rows for every weight format).
GEMV_MAX_ROWS = 16
# Affine-quantized weights times int8 x for more rows (prefill, vision; AVX512-VNNI, see
# gemm_i8.c), faster than dequantize + OpenBLAS, from this many multiply-adds on; below it
# its fixed costs (rounding x, threads) do not pay.
INT8_GEMM_MIN_MACS = 1 << 24
GEMM_SLICE_ELEMS = 4 * 1024 * 1024  # float32 elements of weight converted per GEMM slice
# Threads converting GEMM slices. One: the slices alternate with OpenBLAS's GEMM, whose
# threads keep spinning after each call and would fight our workers for the cores.
GEMM_CONVERT_THREADS = 1
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)

_ST = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}
_F32 = mx.float32
_DENSE = (mx.float32, mx.bfloat16)

_enabled: bool = _build.enabled()
_lib: ctypes.CDLL | None = None
_lib_checked = False


def _get_lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or no compiler: use MLX/numpy)."""
    global _lib, _lib_checked
    if not _enabled:
        return None
    if not _lib_checked:
        _lib = _build.load()
        _lib_checked = True
        _apply_int8_activations()
    return _lib


_int8 = False  # int8 x in effect: set when the library loads and by refresh()


def int8_activations() -> bool:
    """Whether quantized matmuls round x to int8 per 64 values (AVX512-VNNI machines only):
    decode GEMVs and larger 2-6-bit products (prefill, the vision tower) then run on
    integer dot products, for ~0.6% relative output error, well under what 2-6-bit weights
    add themselves. For 8-bit weights, whose own error one rounding would match, x also
    carries its rounding residual (a second int8 pass in 1/256 steps, ~2e-5 relative
    error). ``VLMC_CPU_INT8_ACTIVATIONS=0`` keeps float32 x."""
    _get_lib()
    return _int8


def _apply_int8_activations() -> None:
    """Read ``VLMC_CPU_INT8_ACTIVATIONS`` once for the GEMVs (a flag in the library) and the
    int8 GEMM (``_int8``), so both follow the same setting."""
    global _int8
    flag = os.environ.get("VLMC_CPU_INT8_ACTIVATIONS", "1").strip().lower()
    _int8 = flag not in ("0", "false", "no", "off") and _lib is not None and bool(_lib.vlmc_int8_x_available())
    if _lib is not None:
        _lib.vlmc_set_int8_x(int(_int8))


def amx() -> int:
    """The mode of the Intel AMX kernels for the int8-x GEMVs of several x rows (batched
    decode, speculative verify): 0 off (no AMX kernels in the library, a CPU, OS or process
    without the tiles, or ``VLMC_CPU_AMX=0``), 1 (the default) where they measured faster
    than the VNNI kernels: 8-bit codes from 5 x rows, 4-bit codes from 9; 2 for 2 or more
    x rows (``VLMC_CPU_AMX=2``). Every mode gives the same output bits."""
    lib = _get_lib()
    return int(lib.vlmc_amx()) if lib is not None else 0


def load_width(bits: int, group_size: int) -> int | None:
    """The width an affine weight of ``bits`` is repacked into at load (``widen``, exact),
    or None where the kernels read it fastest as it is.

    5 and 6 bits stay where, with int8 x (groups of a multiple of 64), the kernels widen
    codes in registers (AVX512-VBMI) and so stream 5/8 or 6/8 of the bytes of an 8-bit copy.
    2 and 3 bits computed that way are slower than their 4-bit copy, whose kernel needs no
    widening; with float x every such width would be widened into a buffer per call, slower
    than reading an 8-bit copy."""
    if bits not in _quant.WIDER:
        return None
    in_place = (bits in (5, 6) and group_size % 64 == 0 and _get_lib() is not None and _int8
                and bool(_lib.vlmc_packed_direct()))
    return None if in_place else _quant.WIDER[bits]


def refresh() -> None:
    """Re-read ``VLMC_CPU_KERNELS`` / ``VLMC_CPU_THREADS`` / ``VLMC_CPU_INT8_ACTIVATIONS``
    (read once at import)."""
    global _enabled, n_threads
    _enabled = _build.enabled()
    n_threads = _default_threads()
    _apply_int8_activations()
    _qplans.clear()  # plans remember whether the kernels were available


def enabled() -> bool:
    """False when ``VLMC_CPU_KERNELS=0`` asks for the pure MLX reference ops."""
    return _enabled


def available() -> bool:
    """True when the compiled kernels are in use."""
    return _get_lib() is not None


def library() -> ctypes.CDLL | None:
    """The compiled kernels with their functions declared (``bindings``), or None."""
    return _get_lib()


def _default_threads() -> int:
    env = os.environ.get("VLMC_CPU_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


n_threads = _default_threads()


# ---- host views of immutable weight arrays, cached per array object ------------------

class _Host:
    """A C-contiguous numpy view (or owned copy) of an mx.array, and its address.

    The view is built from the raw address and does not reference the mx.array, so the
    cache never keeps a weight alive; a weakref callback drops the entry with the array.
    """
    __slots__ = ("arr", "ptr", "__weakref__")

    def __init__(self, a: np.ndarray):
        self.arr = a
        self.ptr = a.ctypes.data


_cache: dict[int, _Host] = {}


def _to_numpy(a: mx.array) -> np.ndarray:
    """numpy array with a's elements (bf16 as raw uint16); zero-copy when contiguous."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def _host(a: mx.array, *, as_f32: bool = False, cache: bool = True) -> _Host:
    """Host view of ``a``; ``cache=False`` for temporaries (the view then holds ``a``)."""
    h = _cache.get(id(a)) if cache else None
    if h is not None:
        return h
    n = _to_numpy(a)
    converted = as_f32 and a.dtype != mx.float32
    if converted:
        # small arrays only (biases, odd-typed scales); an owned copy, never a view of a temporary
        n = np.array(a.astype(mx.float32), copy=True)
    if not cache:
        return _Host(np.ascontiguousarray(n))
    if n.flags.c_contiguous and n.size and not converted:
        # An ownerless view of the same memory: valid while ``a`` lives.
        buf = (ctypes.c_byte * n.nbytes).from_address(n.ctypes.data)
        n = np.frombuffer(buf, dtype=n.dtype).reshape(n.shape)
    else:
        n = np.ascontiguousarray(n)  # an owned copy
    h = _Host(n)
    key = id(a)
    try:
        weakref.finalize(a, _cache.pop, key, None)
    except TypeError:  # not weak-referenceable: do not cache
        return h
    _cache[key] = h
    return h


def _x2d(x, K: int) -> np.ndarray:
    """Activations (an mx.array, or a float32 numpy array) as a C-contiguous float32
    [M, K] numpy array (evaluates an mx.array)."""
    if type(x) is np.ndarray:
        n = _scratch.contiguous(x)
    else:
        n = np.asarray(x if x.dtype == _F32 else x.astype(_F32))
        if not n.flags.c_contiguous:
            n = _scratch.contiguous(n)
    return n if n.ndim == 2 else n.reshape(-1, K)


def _finish(y: np.ndarray, lead: tuple, dtype, host: bool = False):
    """The [M, N] result with x's leading dims: as a numpy array when ``host`` and the
    result is float32, else as an mx.array (one copy)."""
    if host and dtype == _F32:
        return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])
    out = mx.array(y)
    if len(lead) != 1:
        out = out.reshape(*lead, y.shape[-1])
    return out if dtype == _F32 else out.astype(dtype)


def _out_dtype(x, w_or_scales: mx.array, b: mx.array | None):
    """MLX's promotion of (x, weight-or-scales, bias) without a call when all are f32/bf16
    (a numpy x is float32)."""
    x_dtype = _F32 if type(x) is np.ndarray else x.dtype
    if x_dtype == _F32 and w_or_scales.dtype in _DENSE and (b is None or b.dtype in _DENSE):
        return _F32
    if type(x) is np.ndarray:
        x = mx.array(x[:0])  # only its dtype takes part
    return mx.result_type(x, w_or_scales) if b is None else mx.result_type(x, w_or_scales, b)


def _as_mx(x):
    """An mx.array for a host (numpy) array; anything else as it is."""
    return mx.array(x) if type(x) is np.ndarray else x


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"vlmc cpu kernel {what} rejected its arguments (code {rc})")


# ---- dense linear ----------------------------------------------------------------------

def linear(x: mx.array, w: mx.array, b: mx.array | None = None, *, host: bool = False) -> mx.array:
    """``x @ w.T (+ b)`` for a float32 or bfloat16 weight ``w`` [N, K]."""
    if not _enabled or w.ndim != 2 or w.dtype not in _DENSE or x.shape[-1] != w.shape[1]:
        return _reference.linear(_as_mx(x), w, b)
    lib = _get_lib()
    N, K = w.shape
    out_dtype = _out_dtype(x, w, b)
    lead = x.shape[:-1]
    xn = _x2d(x, K)
    M = xn.shape[0]
    if M == 0:
        return mx.zeros((*lead, N), out_dtype)
    wh = _host(w)
    bh = _host(b, as_f32=True) if b is not None else None
    if M <= GEMV_MAX_ROWS and lib is not None:
        y = _scratch.empty((M, N), np.float32)
        fn = lib.vlmc_gemv_f32 if w.dtype == mx.float32 else lib.vlmc_gemv_bf16
        _check(fn(xn.ctypes.data, M, K, wh.ptr, N, bh.ptr if bh else None, y.ctypes.data, n_threads), "gemv")
        return _finish(y, lead, out_dtype, host)
    if w.dtype == mx.float32:
        y = xn @ wh.arr.T
    else:
        y = _sliced_gemm(xn, N, K, lambda n0, n1, out: _bf16_rows(lib, wh, n0, n1, K, out))
    if bh is not None:
        y += bh.arr
    return _finish(y, lead, out_dtype, host)


def _bf16_rows(lib, wh: _Host, n0: int, n1: int, K: int, out: np.ndarray) -> None:
    src = wh.arr[n0:n1]
    if lib is not None:
        lib.vlmc_bf16_to_f32(src.ctypes.data, src.size, out.ctypes.data, GEMM_CONVERT_THREADS)
    else:
        out[...] = np.left_shift(src.astype(np.uint32), 16).view(np.float32)


def _sliced_gemm(xn: np.ndarray, N: int, K: int, fill) -> np.ndarray:
    """x @ W.T where W's rows are produced as float32 slices by ``fill(n0, n1, out)``."""
    M = xn.shape[0]
    y = _scratch.empty((M, N), np.float32)
    rows = max(64, GEMM_SLICE_ELEMS // max(K, 1))
    buf = _scratch.empty((min(rows, N), K), np.float32)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        wf = buf[: n1 - n0]
        fill(n0, n1, wf)
        y[:, n0:n1] = xn @ wf.T
    return y


# ---- quantized linear ------------------------------------------------------------------

def _unpack(w, scales, biases, b, bits, group_size, mode):
    """Accept either (w, scales, biases, ...) or a QuantWeight-like object as ``w``."""
    if type(w) is not mx.array and hasattr(w, "scales") and hasattr(w, "weight"):
        if biases is not None or b is not None:
            raise TypeError("qlinear(x, quant_weight, b): pass the bias third")
        return w.weight, w.scales, w.biases, scales, w.bits, w.group_size, w.mode
    return w, scales, biases, b, bits, group_size, mode


def _q_supported(lib, w, scales, biases, bits, group_size, mode) -> bool:
    return (lib is not None and mode == "affine" and biases is not None and bits in SUPPORTED_BITS
            and w.ndim == 2 and w.dtype == mx.uint32 and scales.dtype in _ST and biases.dtype in _ST
            and group_size % 8 == 0 and scales.ndim == 2
            and scales.shape == biases.shape and scales.shape[0] == w.shape[0]
            and scales.shape[1] * group_size == w.shape[1] * 32 // bits
            and (w.shape[1] * 32) % bits == 0)


def _q_params(scales: mx.array, biases: mx.array, cache: bool = True) -> tuple[_Host, _Host, int]:
    """Host views of scales/biases and their type code; float16 or mixed types are
    converted to float32 once (the SIMD kernels read float32 or bfloat16)."""
    if scales.dtype == biases.dtype and scales.dtype in _DENSE:
        return _host(scales, cache=cache), _host(biases, cache=cache), _ST[scales.dtype]
    return _host(scales, as_f32=True, cache=cache), _host(biases, as_f32=True, cache=cache), 0


_qplans: dict[int, tuple] = {}


def _qplan(w, scales, biases, bits, group_size, mode) -> tuple:
    """Validated kernel arguments for one quantized weight, cached while ``w`` lives:
    (scales, biases, bits, group_size, mode, lib or None if unsupported, K, N, w, s, b, st)."""
    lib = _get_lib()
    head = (scales, biases, bits, group_size, mode)
    if not _q_supported(lib, w, scales, biases, bits, group_size, mode):
        plan = head + (None, None)
    else:
        sh, bh_, st = _q_params(scales, biases)
        plan = head + (lib, w.shape[1] * 32 // bits, w.shape[0], _host(w), sh, bh_, st)
    try:
        key = id(w)
        weakref.finalize(w, _qplans.pop, key, None)
        _qplans[key] = plan
    except TypeError:
        pass
    return plan


def qplan(w, scales, biases, bits: int, group_size: int, mode: str) -> tuple:
    """The cached ``_qplan`` of a quantized weight (rebuilt when its parts changed)."""
    plan = _qplans.get(id(w))
    if plan is None or plan[0] is not scales or plan[1] is not biases or plan[2] != bits \
            or plan[3] != group_size or plan[4] != mode:
        plan = _qplan(w, scales, biases, bits, group_size, mode)
    return plan


def qlinear(x: mx.array, w, scales=None, biases=None, b: mx.array | None = None, *,
            bits: int | None = None, group_size: int | None = None, mode: str = "affine",
            host: bool = False) -> mx.array:
    """``x @ dequantize(w).T (+ b)``, as ``mx.quantized_matmul(..., transpose=True)``.

    Called either as ``qlinear(x, w, scales, biases, b, bits=, group_size=, mode=)`` with
    MLX's packed uint32 codes, or as ``qlinear(x, quant_weight, b)`` with an object that has
    ``weight, scales, biases, bits, group_size, mode`` (``vlmc.kernels.quant.QuantWeight``).
    ``host=True`` returns a float32 result as a numpy array (no copy into MLX).
    """
    w, scales, biases, b, bits, group_size, mode = _unpack(w, scales, biases, b, bits, group_size, mode)
    plan = qplan(w, scales, biases, bits, group_size, mode)
    if plan[5] is None or x.shape[-1] != plan[6]:
        y = mx.quantized_matmul(_as_mx(x), w, scales, biases, transpose=True, group_size=group_size, bits=bits,
                                mode=mode)
        return y + b if b is not None else y
    lib, K, N, wh, sh, bh_, st = plan[5:]
    out_dtype = _out_dtype(x, scales, b)
    lead = x.shape[:-1]
    xn = _x2d(x, K)
    M = xn.shape[0]
    if M == 0:
        return mx.zeros((*lead, N), out_dtype)
    bias = _host(b, as_f32=True) if b is not None else None
    int8_rows = group_size % 64 == 0 and st in (0, 1) and _int8
    # few rows: the GEMVs; more rows of a small product with int8 x: GEMVs in passes of rows,
    # the int8 GEMM's arithmetic bit for bit, where the float GEMM below would round
    # differently (a row's result must not depend on the number of rows sharing the call)
    if M <= GEMV_MAX_ROWS or (int8_rows and M * N * K < INT8_GEMM_MIN_MACS):
        y = _scratch.empty((M, N), np.float32)
        _check(lib.vlmc_gemv_q(xn.ctypes.data, M, K, wh.ptr, sh.ptr, bh_.ptr, st, N, bits, group_size,
                               bias.ptr if bias else None, y.ctypes.data, n_threads), "gemv_q")
        return _finish(y, lead, out_dtype, host)
    if int8_rows and lib.vlmc_gemm_q_i8_available():
        y = _scratch.empty((M, N), np.float32)
        rc = lib.vlmc_gemm_q_i8(xn.ctypes.data, M, K, wh.ptr, sh.ptr, bh_.ptr, st, N, bits, group_size,
                                bias.ptr if bias else None, y.ctypes.data, n_threads)
        if rc != -6:  # -6: a shape the kernel does not cover; the float GEMM below does
            _check(rc, "gemm_q_i8")
            return _finish(y, lead, out_dtype, host)
    G = K // group_size
    words = w.shape[1]

    def fill(n0: int, n1: int, out: np.ndarray) -> None:
        _check(lib.vlmc_dequantize(wh.ptr + n0 * words * 4, sh.ptr + n0 * G * sh.arr.itemsize,
                                   bh_.ptr + n0 * G * bh_.arr.itemsize, st, n1 - n0, K, bits, group_size,
                                   out.ctypes.data, GEMM_CONVERT_THREADS), "dequantize")

    y = _sliced_gemm(xn, N, K, fill)
    if bias is not None:
        y += bias.arr
    return _finish(y, lead, out_dtype, host)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int,
               mode: str = "affine", cache: bool = True) -> mx.array:
    """float32 ``scales * q + biases`` for MLX-packed codes ``w`` [N, K*bits/32].

    ``cache=False`` for temporary arrays (no host-view cache entry is made for them)."""
    lib = _get_lib()
    if not _q_supported(lib, w, scales, biases, bits, group_size, mode):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    N, K = w.shape[0], w.shape[1] * 32 // bits
    wh = _host(w, cache=cache)
    sh, bh_, st = _q_params(scales, biases, cache)
    out = np.empty((N, K), np.float32)
    _check(lib.vlmc_dequantize(wh.ptr, sh.ptr, bh_.ptr, st, N, K, bits, group_size, out.ctypes.data,
                               n_threads), "dequantize")
    return mx.array(out)


def widen(q, bits: int):
    """``vlmc.kernels.quant.widen`` (the same codes at 4 or 8 bits per value, exact) through
    the threaded C dequantize with unit scales, which at load is many times faster than
    MLX's ops on an LM head."""
    lib = _get_lib()
    if (lib is None or q.mode != "affine" or bits not in (4, 8) or bits <= q.bits or q.biases is None
            or not _q_supported(lib, q.weight, q.scales, q.biases, q.bits, q.group_size, "affine")):
        return _quant.widen(q, bits)
    N, K = q.shape
    rows = max(1, min(N, _quant.WIDEN_ROWS))
    unit = np.ones((rows, K // q.group_size), np.float32)
    zero = np.zeros_like(unit)
    codes = np.empty((rows, K), np.float32)
    out = np.empty((N, K * bits // 8), np.uint8)
    wh, words = _host(q.weight, cache=False), q.weight.shape[1]
    for r0 in range(0, N, rows):
        n = min(N, r0 + rows) - r0
        _check(lib.vlmc_dequantize(wh.ptr + r0 * words * 4, unit.ctypes.data, zero.ctypes.data, 0, n, K, q.bits,
                                   q.group_size, codes.ctypes.data, n_threads), "dequantize")
        c = codes[:n].astype(np.uint8)
        out[r0:r0 + n] = c if bits == 8 else c[:, 0::2] | (c[:, 1::2] << 4)  # MLX: code k at bits [b k, b k + b)
    return _quant.QuantWeight(mx.array(out.view(np.uint32)), q.scales, q.biases, bits, q.group_size, q.mode)


def _round_to(a: np.ndarray, dtype) -> np.ndarray:
    """float32 ``a`` rounded in place to ``dtype``'s nearest values (ties to even, as MLX's
    astype rounds), kept in float32."""
    if dtype == mx.bfloat16:
        a.view(np.uint32)[...] = bf16_bits(a).astype(np.uint32) << np.uint32(16)
    elif dtype == mx.float16:
        a[...] = a.astype(np.float16)
    return a


def qembedding(ids: mx.array, w, scales=None, biases=None, *, bits: int | None = None,
               group_size: int | None = None, mode: str = "affine", host: bool = False):
    """Rows ``ids`` of a quantized table, dequantized (dtype of ``scales``, as mx.dequantize).

    Called as ``qembedding(ids, w, scales, biases, bits=, group_size=, mode=)`` or
    ``qembedding(ids, quant_weight)``. ``host=True``: where the kernel gathers the rows, a
    float32 host array holding the same values (rounded to bf16/fp16 as that dtype would),
    so that a decode step's first ops run on the host too.
    """
    w, scales, biases, _, bits, group_size, mode = _unpack(w, scales, biases, None, bits, group_size, mode)
    flat = ids.reshape(-1)
    plan = qplan(w, scales, biases, bits, group_size, mode) if biases is not None else (None,) * 6
    if plan[5] is not None:
        # the rows gathered from the table's cached host views, not by three MLX gathers
        # that would each be evaluated on their own
        lib, K, _, wh, sh, bh, st = plan[5:]
        idx = np.asarray(flat, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= wh.arr.shape[0]):
            bad = int(idx.max() if idx.max() >= wh.arr.shape[0] else idx.min())
            raise InputError(f"token id {bad} is outside the embedding table's {wh.arr.shape[0]} rows")
        rw, rs, rb = (np.ascontiguousarray(h.arr[idx]) for h in (wh, sh, bh))
        out = np.empty((idx.size, K), np.float32)
        _check(lib.vlmc_dequantize(rw.ctypes.data, rs.ctypes.data, rb.ctypes.data, st, idx.size, K, bits, group_size,
                                   out.ctypes.data, n_threads), "dequantize")
        if host:
            return _round_to(out, scales.dtype).reshape(*ids.shape, K)
        rows = mx.array(out)
        if scales.dtype != mx.float32:
            rows = rows.astype(scales.dtype)
    else:
        rows_b = None if biases is None else biases[flat]
        rows = mx.dequantize(w[flat], scales[flat], rows_b, group_size=group_size, bits=bits, mode=mode)
    return rows.reshape(*ids.shape, rows.shape[-1])
