"""The reference ops on host arrays: float32 numpy arrays, the form activations keep
between ops on the ``cpu`` target (see ``vlmc.kernels.cpu_ops``).

Each function matches the ``vlmc.kernels.reference`` op of the same name on float32
inputs. Parameters (norm weights, rope tables) may be mx.arrays: they are read through
host views (weights cached per array, as the matmul kernels do).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import _check, _get_lib, _host
from .scratch import contiguous, empty

F32 = np.float32
# x * sigmoid(a (x + c x^3)) activations: their (a, c). GELU-tanh, 0.5 x (1 + tanh(u)), is
# x sigmoid(2 u) with u = sqrt(2 / pi) (x + 0.044715 x^3): the C gate computes it so (its
# numpy fallback keeps tanh), and so does the decode_layer fast path, to the same bits.
SIGMOID_SCALE = {"silu": (1.0, 0.0), "quick_gelu": (1.702, 0.0),
                 "gelu_tanh": (2.0 * float(np.sqrt(2.0 / np.pi)), 0.044715)}


def is_host(a) -> bool:
    return type(a) is np.ndarray


def param(a) -> np.ndarray:
    """A float32 host view of a parameter (cached while it lives) or of a host array."""
    if type(a) is np.ndarray:
        return a if a.dtype == F32 else a.astype(F32)
    return _host(a, as_f32=True).arr


def table(a) -> np.ndarray:
    """A float32 host view of a per-call array (rope tables): evaluated, not cached."""
    if type(a) is np.ndarray:
        return a
    return np.asarray(a if a.dtype == mx.float32 else a.astype(mx.float32))


def _norm_kernel(x: np.ndarray, w, b, eps: float, layer: int) -> np.ndarray | None:
    """RMSNorm (layer=0) / LayerNorm (1) / RMSNorm in MLX's arithmetic (2) of x's rows through
    the C kernel, or None."""
    lib = _get_lib()
    cols = x.shape[-1] if x.ndim else 0
    wv = None if w is None else param(w)
    bv = None if b is None else param(b)
    if lib is None or not x.size or any(v is not None and (v.shape != (cols,) or not v.flags.c_contiguous)
                                        for v in (wv, bv)):
        return None
    from . import n_threads
    xc = contiguous(x)
    out = empty(x.shape, F32)
    _check(lib.vlmc_norm(xc.ctypes.data, x.size // cols, cols, None if wv is None else wv.ctypes.data,
                         None if bv is None else bv.ctypes.data, eps, layer, out.ctypes.data, n_threads), "norm")
    return out


def _inv_rms(x: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("...i,...i->...", x, x)[..., None]
    ms *= F32(1.0 / x.shape[-1])
    ms += F32(eps)
    np.sqrt(ms, out=ms)
    return ms


def rms_norm(x: np.ndarray, w, eps: float) -> np.ndarray:
    # unweighted: in MLX's arithmetic (the op library's norm for mx.arrays), so the result
    # does not depend on which side of the host boundary the rows are
    out = _norm_kernel(x, w, None, eps, 0 if w is not None else 2)
    if out is not None:
        return out
    out = x / _inv_rms(x, eps)
    if w is not None:
        out *= param(w)
    return out


def layer_norm(x: np.ndarray, w, b, eps: float) -> np.ndarray:
    out = _norm_kernel(x, w, b, eps, 1)
    if out is not None:
        return out
    out = x - x.mean(-1, keepdims=True, dtype=F32)
    out /= _inv_rms(out, eps)
    if w is not None:
        out *= param(w)
    if b is not None:
        out += param(b)
    return out


def _rows(a: np.ndarray):
    """(a, rows, cols, row stride) for a float32 array whose last axis is contiguous and
    whose leading axes collapse into one strided axis (column slices do); else a copy."""
    if a.dtype != F32 or a.ndim == 0:
        a = contiguous(a)
    cols = a.shape[-1] if a.ndim else 1
    rows = a.size // cols if cols else 0
    st = a.strides
    ok = (st[-1] == 4 and all(st[i] == st[i + 1] * a.shape[i + 1] for i in range(a.ndim - 2))
          and (rows <= 1 or st[-2] >= 4 * cols))  # no overlapping rows (broadcasts)
    if not ok:
        a = contiguous(a)
        st = a.strides
    return a, rows, cols, (st[-2] // 4 if a.ndim > 1 and rows > 1 else cols)


def sigmoid_gate(x: np.ndarray, kind: str, up: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(a (x + c x^3)) (* up), in one fresh array: the C kernel (2 threads, one
    pass) or numpy as x / (1 + exp(-a x)) (GELU-tanh: with tanh)."""
    lib = _get_lib()
    a, c = SIGMOID_SCALE[kind]
    if lib is not None and x.size and (up is None or up.shape == x.shape):
        from . import n_threads
        xa, rows, cols, x_ld = _rows(x)
        ua, _, _, up_ld = _rows(up) if up is not None else (None, 0, 0, 0)
        out = empty(x.shape, F32)
        _check(lib.vlmc_sigmoid_gate(xa.ctypes.data, x_ld, None if ua is None else ua.ctypes.data, up_ld,
                                     out.ctypes.data, rows, cols, a, c, n_threads), "sigmoid_gate")
        return out
    if c:
        out = _gelu_tanh(x)
        return out * up if up is not None else out
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative x: x / inf = -0, as wanted
        e = np.exp(x * F32(-a))
    e += F32(1.0)
    np.divide(x, e, out=e)
    if up is not None:
        e *= up
    return e


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = F32(np.sqrt(2.0 / np.pi))
    return F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind in SIGMOID_SCALE:
        return sigmoid_gate(x, kind)
    if kind == "relu":
        return np.maximum(x, F32(0))
    if kind == "sigmoid":
        with np.errstate(over="ignore"):
            return F32(1.0) / (F32(1.0) + np.exp(-x))
    # gelu needs erf, which numpy lacks: MLX's (one copy each way; used once per projector)
    from .. import reference
    return np.asarray(reference.act(mx.array(x), kind))


def glu(gate: np.ndarray, up: np.ndarray, kind: str) -> np.ndarray:
    if kind in SIGMOID_SCALE:
        return sigmoid_gate(gate, kind, up)
    out = act(gate, kind)
    out *= up
    return out


def reshape(x: np.ndarray, shape: list) -> np.ndarray:
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    try:
        return np.reshape(x, shape, copy=False)
    except ValueError:  # not expressible as a view: copy into pooled memory
        return contiguous(x, x.dtype).reshape(shape)
    except TypeError:  # numpy < 2.1 has no copy argument
        return x.reshape(shape)


def binary(ufunc, a, b) -> np.ndarray:
    """``ufunc(a, b)`` for host operands, float32 results written to pooled memory."""
    a, b = table(a), table(b)
    if a.dtype == F32 and b.dtype == F32:
        return ufunc(a, b, out=empty(np.broadcast_shapes(a.shape, b.shape), F32))
    return ufunc(a, b)


def split(x: np.ndarray, sizes: list[int], axis: int) -> list[np.ndarray]:
    out, start = [], 0
    index = [slice(None)] * x.ndim
    for s in sizes:
        index[axis] = slice(start, start + s)
        out.append(x[tuple(index)])
        start += s
    return out


def slice_axis(x: np.ndarray, axis: int, start: int, stop: int | None = None) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _rope_kernel(x: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """The C rope for x [A, H, L, D] with tables [A or 1, 1, L or 1, D], or x [A, H, D] with
    tables [A or 1, 1, D] (the text and vision layouts); None for anything else."""
    lib = _get_lib()
    nd = x.ndim
    if (lib is None or nd not in (3, 4) or c.shape != s.shape or c.strides != s.strides or c.ndim != nd
            or x.dtype != F32 or c.dtype != F32 or s.dtype != F32 or x.strides[-1] != 4 or c.strides[-1] != 4
            or c.shape[1] != 1 or c.shape[-1] != x.shape[-1] or not x.size):
        return None
    A, H = x.shape[0], x.shape[1]
    L = x.shape[2] if nd == 4 else 1
    if c.shape[0] not in (1, A) or (nd == 4 and c.shape[2] not in (1, L)):
        return None
    sa, sh = x.strides[0] // 4, x.strides[1] // 4
    sl = x.strides[2] // 4 if nd == 4 else 0
    ca = c.strides[0] // 4 if c.shape[0] > 1 else 0
    cl = c.strides[2] // 4 if nd == 4 and c.shape[2] > 1 else 0
    from . import n_threads
    out = empty(x.shape, F32)
    _check(lib.vlmc_rope(x.ctypes.data, A, H, L, x.shape[-1], sa, sh, sl, c.ctypes.data, s.ctypes.data, ca, cl,
                         out.ctypes.data, n_threads), "rope")
    return out


def rope(x: np.ndarray, cos, sin) -> np.ndarray:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (the same products and
    sums as the reference, so the same float32 result)."""
    c, s = table(cos), table(sin)
    out = _rope_kernel(x, c, s)
    if out is not None:
        return out
    half = x.shape[-1] // 2
    out = x * c
    out[..., :half] -= x[..., half:] * s[..., :half]
    out[..., half:] += x[..., :half] * s[..., half:]
    return out
