"""Reference MLX implementation of every IR op (same names as ``vlmc.ir.ops``).

Generated ``model.py`` files call these; custom kernels (Metal/CUDA) are checked against
them. They are written for clarity and float32 parity with transformers.
"""
from __future__ import annotations

import math

import mlx.core as mx


def linear(x: mx.array, w: mx.array, b: mx.array | None = None) -> mx.array:
    y = x @ w.T
    return y + b if b is not None else y


def embedding(ids: mx.array, table: mx.array) -> mx.array:
    return table[ids]


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, w, eps)


def layer_norm(x: mx.array, w: mx.array, b: mx.array | None, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, w, b, eps)


def add(a: mx.array, b: mx.array) -> mx.array:
    return a + b


def add_rms_norm(a: mx.array, b: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """The residual add and the next norm (``fuse`` pass ``add_norm``): (a + b, rms_norm(a + b))."""
    h = a + b
    return h, mx.fast.rms_norm(h, w, eps)


def mul(a: mx.array, b: mx.array) -> mx.array:
    return a * b


def scale(x: mx.array, value: float) -> mx.array:
    return x * mx.array(value, dtype=x.dtype)


def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def avg_pool_tokens(x: mx.array, grid: int, kernel: int) -> mx.array:
    n, _, e = x.shape
    side = grid // kernel
    windows = x.reshape(n, side, kernel, side, kernel, e)
    return windows.mean(axis=(2, 4)).reshape(n, side * side, e)


def sum_axis(x: mx.array, axis: int) -> mx.array:
    return mx.sum(x, axis=axis)


def pad_axis(x: mx.array, axis: int, after: int, before: int = 0) -> mx.array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return mx.pad(x, widths)


def act(x: mx.array, kind: str) -> mx.array:
    if kind == "silu":
        return x * mx.sigmoid(x)
    if kind == "gelu":
        return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if kind == "quick_gelu":
        return x * mx.sigmoid(1.702 * x)
    if kind == "relu":
        return mx.maximum(x, 0)
    raise ValueError(f"unknown activation {kind!r}")


def glu(gate: mx.array, up: mx.array, kind: str) -> mx.array:
    return act(gate, kind) * up


def reshape(x: mx.array, shape: list) -> mx.array:
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def transpose(x: mx.array, axes: list[int]) -> mx.array:
    return x.transpose(axes)


def split(x: mx.array, sizes: list[int], axis: int) -> list[mx.array]:
    bounds, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        bounds.append(acc)
    return mx.split(x, bounds, axis=axis)


def concat(*xs: mx.array, axis: int, dim=None) -> mx.array:
    return mx.concatenate(xs, axis=axis)


def take(x: mx.array, idx: mx.array, axis: int) -> mx.array:
    return mx.take(x, idx, axis=axis)


def slice_axis(x: mx.array, axis: int, start: int, stop: int | None = None) -> mx.array:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def broadcast_to(x: mx.array, shape: list) -> mx.array:
    return mx.broadcast_to(x, shape)


def cast(x: mx.array, dtype: str) -> mx.array:
    return x.astype(getattr(mx, dtype))


def _inv_freq(theta: float, dim: int) -> mx.array:
    # Same float32 arithmetic as transformers: base ** (arange(0, dim, 2) / dim).
    exponents = mx.arange(0, dim, 2, dtype=mx.float32) / dim
    return 1.0 / (mx.array(theta, dtype=mx.float32) ** exponents)


def rope_freqs(positions: mx.array, kind: str, dim: int, theta: float,
               sections: list[int] | None = None, factor: float = 1.0) -> tuple[mx.array, mx.array]:
    pos = positions.astype(mx.float32)
    if kind == "default":
        inv = _inv_freq(theta, dim) if factor == 1.0 else _inv_freq(theta, dim) / factor  # linear scaling
        freqs = pos[..., None] * inv                               # [B, L, D/2]
        freqs = freqs[:, None]                                     # [B, 1, L, D/2]
    elif kind == "mrope":
        f = pos[..., None] * _inv_freq(theta, dim)                 # [3, B, L, D/2]
        parts, start = [], 0
        for i, sec in enumerate(sections):
            parts.append(f[i % 3, ..., start:start + sec])
            start += sec
        freqs = mx.concatenate(parts, axis=-1)[:, None]            # [B, 1, L, D/2]
    elif kind == "mrope_interleaved":
        f = pos[..., None] * _inv_freq(theta, dim)                 # [3, B, L, D/2]
        stream = mx.array(interleaved_streams(sections, dim // 2))
        freqs = mx.where(stream == 1, f[1], mx.where(stream == 2, f[2], f[0]))[:, None]
    elif kind == "axial2d":
        f = pos[..., None] * _inv_freq(theta, dim // 2)            # [N, 2, D/4]
        freqs = mx.concatenate([f[:, 0], f[:, 1]], axis=-1)[:, None]  # [N, 1, D/2]
    else:
        raise ValueError(f"unknown rope kind {kind!r}")
    emb = mx.concatenate([freqs, freqs], axis=-1)
    return mx.cos(emb), mx.sin(emb)


def interleaved_streams(sections: list[int], half: int) -> list[int]:
    """The position stream (0 t, 1 h, 2 w) of each of ``half`` rotary frequencies under
    interleaved M-RoPE, as transformers' Qwen3-VL recomposes them: h at 1, 4, 7, ... below
    3 * sections[1], w at 2, 5, 8, ... below 3 * sections[2], t elsewhere."""
    out = [0] * half
    for stream in (1, 2):
        for j in range(stream, min(3 * sections[stream], half), 3):
            out[j] = stream
    return out


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(mx.float32) * cos + rotated.astype(mx.float32) * sin
    return out.astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, *,
              scale: float) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def decode_layer(x, cos, sin, mask, cache, norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, d_w, d_b, **attrs):
    """A decoder layer's optional one-call decode step (the ``decode_layer`` lowering, cpu
    target); the generated layer runs its own ops when this returns None, as here."""
    return None


def decode_layers(x, cos, sin, mask, caches, layers, **attrs):
    """The same for a whole stack of such layers (layers[i]: layer i's weights in
    decode_layer's order); the generated loop over the layers runs when this returns None."""
    return None


def cached_attention(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None = None,
                     *, scale: float, softcap: float | None = None) -> mx.array:
    q, keys, values, finish = cache.attention_inputs(q, k, v)  # every held token, from the cache's layout
    mask = cache.mask_for(mask, q.shape[2])
    if softcap is not None:
        return finish(softcapped_attention(q, keys, values, mask, scale=scale, softcap=softcap))
    return finish(mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask))


def softcapped_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, *, scale: float,
                         softcap: float) -> mx.array:
    """Attention whose scaled scores are soft-capped before the mask (transformers' eager
    Gemma 2 attention; SDPA has no such step): q [B, H, L, D], k/v [B, Hkv, S, D]."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, n, d)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale
    scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:  # [B or 1, 1 or H, L, S] -> the grouped heads' [B, Hkv, H/Hkv, L, S]
        m = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv, h // kv, *mask.shape[2:])
        # a finite floor, as transformers' additive mask: a row with no key (left padding)
        # gets finite weights, not NaN that would reach the later rows through its values
        floor = mx.array(mx.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = mx.where(m, scores, floor) if m.dtype == mx.bool_ else scores + m
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    return (weights @ v[:, :, None]).reshape(b, h, n, v.shape[-1])


def prepend(x: mx.array, row: mx.array) -> mx.array:
    first = mx.broadcast_to(row.astype(x.dtype), (x.shape[0], 1, x.shape[2]))
    return mx.concatenate([first, x], axis=1)


def patchify(x: mx.array, patch: int) -> mx.array:
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // patch) * (w // patch), c * patch * patch)


def merge_features(embeds: mx.array, ids: mx.array, features: mx.array, token_id: int) -> mx.array:
    is_image = ids == token_id
    order = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
    gathered = features[order].reshape(embeds.shape).astype(embeds.dtype)
    return mx.where(is_image[..., None], gathered, embeds)


def qlinear(x: mx.array, w, b: mx.array | None = None) -> mx.array:
    """x @ dequant(w).T (+ b) for a QuantWeight ``w``."""
    y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, group_size=w.group_size,
                            bits=w.bits, mode=w.mode)
    return y + b if b is not None else y


def quantize_activations(x: mx.array, w) -> mx.array:
    """``x`` rounded to ``w``'s block format along its last axis, back in x's dtype: mxfp8 =
    e4m3 values with a power-of-two scale per 32, nvfp4 = e2m1 values with an e4m3 scale per
    16 (no per-tensor scale: groups whose largest value is above 6 x 448 saturate). The
    scales and the division run in float32 (MLX's bf16 path would round x / scale to bf16
    before rounding it to e2m1); the rounded values are exact in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    codes, scales = mx.quantize(flat, group_size=w.group_size, bits=w.bits, mode=w.mode)[:2]
    rounded = mx.dequantize(codes, scales, group_size=w.group_size, bits=w.bits, mode=w.mode, dtype=x.dtype)
    return rounded.reshape(x.shape)


def qqlinear(x: mx.array, w, b: mx.array | None = None) -> mx.array:
    """qlinear with x quantized to w's block format (mxfp8 / nvfp4) first: the product of two
    block-quantized operands that MLX's ``qqmm`` computes, here emulated (the rounded values
    are exact in x's dtype)."""
    return qlinear(quantize_activations(x, w), w, b)


def qembedding(ids: mx.array, table) -> mx.array:
    """Rows of a quantized table, dequantized."""
    flat = ids.reshape(-1)
    rows = mx.dequantize(table.weight[flat], table.scales[flat],
                         None if table.biases is None else table.biases[flat],
                         group_size=table.group_size, bits=table.bits, mode=table.mode)
    return rows.reshape(*ids.shape, rows.shape[-1])


def result(x: mx.array) -> mx.array:
    """An entry point's output. The identity here; op libraries whose ops pass other
    array types between them (the cpu target's host arrays) return an mx.array."""
    return x
