"""The op library of the ``cpu`` target: the reference ops, with matmuls replaced by the
CPU kernels (``vlmc.kernels.cpu``): compact-weight GEMV for decode, float32 BLAS GEMM for
prefill, and BLAS attention for many query rows (prefill, vision). Same names and
signatures as ``reference``; results agree within the tolerances stated in
tests/test_cpu_kernels.py.

Host arrays: the kernels compute in numpy buffers, so their outputs stay there, as float32
numpy arrays, and the ops between kernels (norms, rope, residual adds, activations,
reshapes) run on them in numpy (``cpu.host``): handing each kernel output to MLX would
cost a copy (``mx.array``) and MLX's per-op scheduling, which outweighs the work of a
decode step's small ops. Any op
accepts mx.arrays or host arrays; an op with no host version gets its host inputs as
mx.arrays. Entry points hand their outputs to MLX through ``result``.
"""
from __future__ import annotations

import functools
import sys

import mlx.core as mx
import numpy as np

from . import reference as _reference
from .reference import *  # noqa: F401,F403  (every op not overridden below)

from . import cpu as _cpu
from .cpu import _as_mx, host as _h
from . import kv_quant as _kv_quant
from .step_rows import in_prompt as _in_prompt
from .cpu.attention import attention as _blas_attention
from .cpu.moe import fused_block as _fused_block, fused_experts as _fused_experts, routed_experts as _routed_experts
from .moe import block_ops as _moe_block_ops
from .cpu.decode_layer import decode_layer as _decode_layer, decode_layers as _decode_layers
from .cpu.deltanet import deltanet_layer as _deltanet_layer, deltanet_layers as _deltanet_layers
from .cpu.kv_decode import affine_values as _affine_values
from .cpu.kv_decode import host_shared_step as _host_shared_step
from .cpu.kv_decode import host_coded_prompt as _host_coded_prompt, host_coded_step as _host_coded_step
from .cpu.kv_decode import host_dense_step as _host_dense_step, kv_affine_decode as _kv_affine_decode, \
    kv_dense_decode as _kv_dense_decode, kv_turbo_decode as _kv_turbo_decode

_is_host = _h.is_host


def _host_out(a) -> np.ndarray:
    """An op's result as a host array (float32 results only; others stay MLX)."""
    if type(a) is np.ndarray or a.dtype != mx.float32:
        return a
    return np.asarray(a)


def result(x):
    """An entry point's output, as an mx.array (one copy of a host array)."""
    return mx.array(x) if type(x) is np.ndarray else x


def _on_mlx(name: str):
    """The reference op, its host-array inputs (also inside lists) given as mx.arrays."""
    ref = getattr(_reference, name)

    @functools.wraps(ref)
    def op(*args, **kwargs):
        args = [_as_mx(a) if type(a) is not list else [_as_mx(b) for b in a] for a in args]
        return ref(*args, **{k: _as_mx(v) for k, v in kwargs.items()})
    return op


for _name in ("embedding", "take", "broadcast_to", "prepend", "patchify", "merge_features", "avg_pool_tokens",
              "l2_norm", "rms_norm_gated", "delta_gates", "zero_padded", "causal_conv1d", "gated_delta_rule",
              "moe_route", "clip", "remap_ids", "ordered_logits"):
    globals()[_name] = _on_mlx(_name)

_rope_freqs_mlx = _on_mlx("rope_freqs")


@functools.lru_cache(maxsize=16)
def _inv_freq(theta: float, dim: int) -> np.ndarray:
    # the reference's float32 values, copied: a view would hold MLX memory after an unload
    return np.array(_reference._inv_freq(theta, dim), copy=True)


def rope_freqs(positions, kind: str, dim: int, theta: float, sections: list[int] | None = None,
               factor: float = 1.0, rotated: int | None = None, **yarn):
    """The text rope tables (default, mrope) as host arrays: the same products as the
    reference, cos/sin rounded from float64 (through MLX a decode step's tables would be
    an evaluation of about ten small ops). Other kinds: the reference's."""
    if kind not in ("default", "mrope", "mrope_interleaved", "yarn"):
        return _rope_freqs_mlx(positions, kind=kind, dim=dim, theta=theta, sections=sections)
    if kind == "yarn":  # the reference's frequencies; cos/sin then scaled by the attention factor
        inv = _yarn_inv_freq(theta, dim, factor, *(yarn.get(k, d) for k, d in _YARN_DEFAULTS))
    else:
        inv = _inv_freq(theta, dim) if factor == 1.0 else _inv_freq(theta, dim) / np.float32(factor)
        if rotated is not None:  # proportional rope: the later frequencies are 0
            inv = np.where(np.arange(dim // 2) < rotated, inv, np.float32(0))
    f = np.asarray(positions).astype(np.float32)[..., None] * inv
    if kind == "mrope":  # [3, B, L, D/2] -> each section from its own position row
        bounds = np.cumsum([0, *sections])
        f = np.concatenate([f[i % 3, ..., a:b] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], axis=-1)
    elif kind == "mrope_interleaved":  # each frequency from the stream interleaving assigns it
        stream = np.asarray(_reference.interleaved_streams(sections, dim // 2))
        f = np.where(stream == 1, f[1], np.where(stream == 2, f[2], f[0]))
    emb = np.concatenate([f, f], axis=-1)[:, None].astype(np.float64)   # [B, 1, L, D]
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    if kind == "yarn" and float(yarn.get("attention_factor", 1.0)) != 1.0:
        scale = np.float32(yarn["attention_factor"])
        return cos * scale, sin * scale
    return cos, sin


_YARN_DEFAULTS = (("beta_fast", 32.0), ("beta_slow", 1.0), ("original_max", 0), ("truncate", True))


@functools.lru_cache(maxsize=16)
def _yarn_inv_freq(theta: float, dim: int, factor: float, beta_fast: float, beta_slow: float,
                   original_max: int, truncate: bool) -> np.ndarray:
    return np.array(_reference.yarn_inv_freq(theta, dim, factor, beta_fast, beta_slow, original_max, truncate),
                    copy=True)


# ---- matmuls: the kernels' outputs are host arrays -----------------------------------

def linear(x, w: mx.array, b: mx.array | None = None):
    return _cpu.linear(x, w, b, host=True)


def qlinear(x, w, scales=None, biases=None, b: mx.array | None = None, **kw):
    return _cpu.qlinear(x, w, scales, biases, b, host=True, **kw)


def qembedding(ids, w, scales=None, biases=None, **kw):
    """The rows as a host array where the kernel gathers them (their values as the table's
    dtype holds them): the first layer's norm then runs on the host in both the ops and the
    decode_layers path."""
    return _cpu.qembedding(_as_mx(ids), w, scales, biases, host=True, **kw)


def attention(q, k, v, mask: mx.array | None = None, *, scale: float, dot: str = "float32"):
    return _blas_attention(q, k, v, mask, scale=scale, enabled=_cpu.enabled(), host=_is_host(q),
                           bf16=dot == "bfloat16")


def decode_layer(x, cos, sin, mask, cache, *weights, **attrs):
    return _decode_layer(x, cos, sin, mask, cache, *weights, **attrs)


def decode_layers(x, cos, sin, mask, caches, *args, **attrs):
    return _decode_layers(x, cos, sin, mask, caches, *args, **attrs)


def deltanet_layer(x, mask, cache, *weights, **attrs):
    return _deltanet_layer(x, mask, cache, *weights, **attrs)


def deltanet_layers(x, mask, caches, layers, **attrs):
    return _deltanet_layers(x, mask, caches, layers, **attrs)


def cached_attention(q, k, v, cache, mask: mx.array | None = None, *, scale: float,
                     softcap: float | None = None):
    host = _is_host(q)
    # decode and verify steps read the cache in place (C kernels): dense, affine or TurboQuant;
    # sliding windows and soft-capped scores (Gemma 2/3) too, except over TurboQuant codes.
    # A prompt's rows take the prompt path below at any count (kernels/step_rows.py).
    step = _cpu.enabled() and not _in_prompt() and _kv_quant.causal_step(mask, q.shape[2])
    if host and step:
        out = _host_dense_step(q, k, v, cache, mask, scale=scale, softcap=softcap)
        if out is None and softcap is None:  # TurboQuant: coded and rotated in C, as decode_layers does
            out = _host_coded_step(q, k, v, cache, mask, scale=scale)
        if out is not None:
            return out
    if _cpu.enabled() and softcap is None and not step:
        # a prompt (chunk) over 4/8-bit or TurboQuant codes: coded in C, attention on the
        # decode kernels, each row as a decode step at its place computes it
        out = _host_coded_prompt(q, k, v, cache, mask, scale=scale)
        if out is not None:
            return out if host else mx.array(out).astype(q.dtype)
    k, v = _as_mx(k), _as_mx(v)  # the cache stores mx.arrays
    if step:
        out = _kv_quant.coded_decode_step(q, k, v, cache, mask, scale=scale, affine=_kv_affine_decode,
                                          turbo=_kv_turbo_decode, dense=_kv_dense_decode,
                                          max_tokens=_cpu.GEMV_MAX_ROWS, windows=True, softcap=softcap)
        if out is not None:
            return _host_out(out) if host else _as_mx(out)
    if softcap is not None:  # soft-capped scores (Gemma 2) elsewhere: the reference
        out = _reference.cached_attention(_as_mx(q), _as_mx(k), _as_mx(v), cache, mask, scale=scale, softcap=softcap)
        return _host_out(out) if host else out
    if _cpu.enabled() and getattr(cache, "layout", None) == "affine" and cache.codecs["k"].bits in (4, 8):
        # a prompt over 4/8-bit codes: the held codes dequantized in C, then BLAS attention
        cache.append(k, v)
        held = _affine_values(cache)
        if held is not None:
            return attention(q, held[0], held[1], cache.mask_for(mask, q.shape[2]), scale=scale)
        keys, values = (cache.codecs[w].decode(cache.parts(w), cache.dtype) for w in ("k", "v"))
        return attention(q, keys, values, cache.mask_for(mask, q.shape[2]), scale=scale)
    qm = _as_mx(q)
    q2, keys, values, finish = cache.attention_inputs(qm, k, v)
    if q2 is qm:  # no rotation to undo (TurboQuant's finish rotates back in MLX)
        return attention(q, keys, values, cache.mask_for(mask, q2.shape[2]), scale=scale)
    out = finish(attention(q2, keys, values, cache.mask_for(mask, q2.shape[2]), scale=scale))
    return _host_out(out) if host else out


# ---- elementwise and shape ops: numpy on host arrays ---------------------------------

# MLX's CPU backend computes sigmoid/exp elementwise several times slower than numpy:
# mx.array activations (not host arrays) of this many elements on go through numpy too.
NUMPY_ACT_MIN_ELEMS = 1 << 15


def _numpy_act_ok(x, kind: str) -> bool:
    if _is_host(x):
        return True
    return _cpu.enabled() and kind in _h.SIGMOID_SCALE and x.dtype == mx.float32 and x.size >= NUMPY_ACT_MIN_ELEMS


def act(x, kind: str):
    if not _numpy_act_ok(x, kind):
        return _reference.act(x, kind)
    out = _h.act(_h.table(x), kind)
    return out if _is_host(x) else mx.array(out)


def glu(gate, up, kind: str):
    if _is_host(gate) or _is_host(up):
        return _h.glu(_h.table(gate), _h.table(up), kind)
    if not _numpy_act_ok(gate, kind) or up.shape != gate.shape or up.dtype != mx.float32:
        return _reference.glu(gate, up, kind)
    return mx.array(_h.glu(np.asarray(gate), np.asarray(up), kind))


def rms_norm(x, w: mx.array | None = None, eps: float = 1e-6):
    # no scale (w None: Gemma 4's value norm) on host rows too: the C kernel, which the
    # decode_layer fast path calls the same way
    return _h.rms_norm(x, w, eps) if _is_host(x) else _reference.rms_norm(x, w, eps)


_shared_attention_mlx = _on_mlx("shared_attention")


def shared_attention(q, cache, mask: mx.array | None = None, *, scale: float):
    """Attention over another layer's cache, as cached_attention attends over its own: decode
    and verify steps of host rows read the buffers in place (C kernels), a prompt's rows (at
    any count: kernels/step_rows.py) go through the BLAS attention over the held keys and
    values (4/8-bit codes dequantized in C); without the kernels, MLX's reference."""
    if not _cpu.enabled():
        return _shared_attention_mlx(q, cache, mask, scale=scale)
    if _is_host(q) and not _in_prompt() and _kv_quant.causal_step(mask, q.shape[2]):
        out = _host_shared_step(q, cache, mask, scale=scale)
        if out is not None:
            return out
    if getattr(cache, "layout", None) == "affine" and cache.codecs["k"].bits in (4, 8):
        held = _affine_values(cache)
        if held is not None:
            return attention(q, held[0], held[1], cache.mask_for(mask, q.shape[2]), scale=scale)
    qm = _as_mx(q)
    q2, keys, values, finish = cache.read_inputs(qm)
    if q2 is qm:  # no rotation to undo (TurboQuant's finish rotates back in MLX)
        return attention(q, keys, values, cache.mask_for(mask, q2.shape[2]), scale=scale)
    out = finish(attention(q2, keys, values, cache.mask_for(mask, q2.shape[2]), scale=scale))
    return _host_out(out) if _is_host(q) else out


def select_layer(x, index: int):
    return x[..., index, :]


def layer_norm(x, w: mx.array, b: mx.array | None, eps: float):
    return _h.layer_norm(x, w, b, eps) if _is_host(x) else _reference.layer_norm(x, w, b, eps)


def add(a, b):
    if _is_host(a) or _is_host(b):
        return _h.binary(np.add, a, b)
    return _reference.add(a, b)


def scale(x, value: float):
    if _is_host(x):
        return np.multiply(x, np.float32(value))
    return _reference.scale(x, value)


def softcap(x, cap: float):
    if _is_host(x):
        return np.tanh(x / np.float32(cap)) * np.float32(cap)
    return _reference.softcap(x, cap)


def sum_axis(x, axis: int):
    return np.sum(x, axis=axis, dtype=np.float32) if _is_host(x) else _reference.sum_axis(x, axis)


def pad_axis(x, axis: int, after: int, before: int = 0):
    if not _is_host(x):
        return _reference.pad_axis(x, axis, after, before)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return np.pad(x, widths)


def mul(a, b):
    if _is_host(a) or _is_host(b):
        return _h.binary(np.multiply, a, b)
    return _reference.mul(a, b)


def add_rms_norm(a, b, w: mx.array, eps: float):
    if _is_host(a) or _is_host(b):
        h = add(a, b)
        return h, _h.rms_norm(h, w, eps)
    return _reference.add_rms_norm(a, b, w, eps)


def rope(x, cos, sin):
    return _h.rope(x, cos, sin) if _is_host(x) else _reference.rope(x, _as_mx(cos), _as_mx(sin))


def reshape(x, shape: list):
    return _h.reshape(x, shape) if _is_host(x) else _reference.reshape(x, shape)


def transpose(x, axes: list[int]):
    return x.transpose(axes) if _is_host(x) else _reference.transpose(x, axes)


def split(x, sizes: list[int], axis: int):
    return _h.split(x, sizes, axis) if _is_host(x) else _reference.split(x, sizes, axis)


def slice_axis(x, axis: int, start: int, stop: int | None = None):
    return _h.slice_axis(x, axis, start, stop) if _is_host(x) else _reference.slice_axis(x, axis, start, stop)


def concat(*xs, axis: int, dim=None):
    if xs and all(_is_host(x) for x in xs):
        return np.concatenate(xs, axis=axis)
    return _reference.concat(*(_as_mx(x) for x in xs), axis=axis, dim=dim)


def cast(x, dtype: str):
    if _is_host(x):
        return x if dtype == "float32" else mx.array(x).astype(getattr(mx, dtype))
    return _reference.cast(x, dtype)


# ---- mixture of experts: the selected experts through the matmul kernels ----

def moe_experts(x, weights, experts, gate_up, down, *, kind: str):
    """``reference.moe_experts`` reading only the selected experts (``cpu/moe.py``): one C call
    for a step's few rows, else a loop over the experts; a host array."""
    if not _cpu.enabled():
        return _reference.moe_experts(_as_mx(x), _as_mx(weights), _as_mx(experts), gate_up, down, kind=kind)
    fused = _fused_experts(x, weights, experts, gate_up, down, kind)
    if fused is not None:
        return fused
    return _routed_experts(x, weights, experts, gate_up, down, glu=lambda g, u: glu(g, u, kind),
                           linear=linear, qlinear=qlinear)


qmoe_experts = moe_experts  # the weight's type picks the kernel


def moe_block(x, router, gate_up, down, shared_gate_up=None, shared_down=None, shared_gate=None, router_x=None,
              expert_scale=None, *, top_k: int, normalize: bool, kind: str):
    """``reference.moe_block``: one C call for a decode step's rows (``cpu/moe.py``
    ``fused_block``), else the separate ops of this library; a host array."""
    if _cpu.enabled():
        out = _fused_block(x, router, gate_up, down, shared_gate_up, shared_down, shared_gate, router_x, expert_scale,
                           top_k=top_k, normalize=normalize, kind=kind)
        if out is not None:
            return out
    return _moe_block_ops(sys.modules[__name__], x, router, gate_up, down, shared_gate_up, shared_down, shared_gate,
                          router_x, expert_scale, top_k=top_k, normalize=normalize, kind=kind)
