"""Reference MLX implementation of every IR op (same names as ``vlmc.ir.ops``).

Generated ``model.py`` files call these; custom kernels (Metal/CUDA) are checked against
them. They are written for clarity and float32 parity with transformers.
"""
from __future__ import annotations

import math
import sys

import mlx.core as mx

from . import linear_attention as _la
from .linear_attention import delta_gates, l2_norm, rms_norm_gated  # noqa: F401  (ops of that name)
from . import moe as _moe
from .moe import moe_route  # noqa: F401  (the op of that name)


def linear(x: mx.array, w: mx.array, b: mx.array | None = None) -> mx.array:
    y = x @ w.T
    return y + b if b is not None else y


def embedding(ids: mx.array, table: mx.array) -> mx.array:
    return table[ids]


def rms_norm(x: mx.array, w: mx.array | None = None, eps: float = 1e-6) -> mx.array:
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
    if kind == "sigmoid":
        return mx.sigmoid(x)
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


def yarn_inv_freq(theta: float, dim: int, factor: float, beta_fast: float, beta_slow: float,
                  original_max: int, truncate: bool = True) -> mx.array:
    """YaRN's inverse frequencies, in transformers' float32 arithmetic: each frequency a blend
    of the plain one (fast rotations, kept) and the one divided by ``factor`` (slow ones,
    interpolated), ramped linearly between the dims where ``beta_fast`` and ``beta_slow``
    rotations fit in ``original_max`` positions."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = mx.array(theta, dtype=mx.float32) ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_freqs(positions: mx.array, kind: str, dim: int, theta: float,
               sections: list[int] | None = None, factor: float = 1.0, beta_fast: float = 32.0,
               beta_slow: float = 1.0, original_max: int = 0, truncate: bool = True,
               attention_factor: float = 1.0, rotated: int | None = None) -> tuple[mx.array, mx.array]:
    pos = positions.astype(mx.float32)
    if kind in ("default", "yarn"):
        if kind == "yarn":
            inv = yarn_inv_freq(theta, dim, factor, beta_fast, beta_slow, original_max, truncate)
        else:
            inv = _inv_freq(theta, dim) if factor == 1.0 else _inv_freq(theta, dim) / factor  # linear scaling
            if rotated is not None:  # proportional rope: the later frequencies are 0 (no rotation)
                inv = mx.where(mx.arange(dim // 2) < rotated, inv, 0.0)
        freqs = pos[..., None] * inv                               # [B, L, D/2]
        freqs = freqs[:, None]                                     # [B, 1, L, D/2]
        if kind == "yarn":
            emb = mx.concatenate([freqs, freqs], axis=-1)
            return mx.cos(emb) * attention_factor, mx.sin(emb) * attention_factor
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
    elif kind == "axial2d_alternating":
        inv = _inv_freq(theta, dim)                                # [D/2] over the whole head dim
        fh = pos[:, 0:1] * inv[0::2]                               # [N, D/4]: h at the even frequencies
        fw = pos[:, 1:2] * inv[1::2]                               # [N, D/4]: w at the odd ones
        freqs = mx.concatenate([fh, fw], axis=-1)[:, None]         # [N, 1, D/2]
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
              scale: float, dot: str = "float32") -> mx.array:
    """``dot="bfloat16"`` allows products of bfloat16-rounded operands (a quantized vision
    tower's attention, see the quantize pass); computing them more precisely, as here, is
    within that allowance."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def decode_layer(x, cos, sin, mask, cache, norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, d_w, d_b, *optional,
                 **attrs):
    """A decoder layer's optional one-call decode step (the ``decode_layer`` lowering, cpu
    target); the generated layer runs its own ops when this returns None, as here."""
    return None


def decode_layers(x, cos, sin, mask, caches, *args, **attrs):
    """The same for a whole stack of such layers (args: [the per-layer inputs,] each layer's
    weights in decode_layer's order); the generated loop over the layers runs when this
    returns None."""
    return None


def deltanet_layer(x, mask, cache, *weights, **attrs):
    """A Gated DeltaNet layer's optional one-call decode step (the ``deltanet_layer``
    lowering, cpu target); the generated layer runs its own ops when this returns None."""
    return None


def deltanet_layers(x, mask, caches, layers, **attrs):
    """The same for consecutive such layers; the generated loop runs when this returns None."""
    return None


def cached_attention(q: mx.array, k: mx.array, v: mx.array, cache, mask: mx.array | None = None,
                     *, scale: float, softcap: float | None = None) -> mx.array:
    q, keys, values, finish = cache.attention_inputs(q, k, v)  # every held token, from the cache's layout
    mask = cache.mask_for(mask, q.shape[2])
    if softcap is not None:
        return finish(softcapped_attention(q, keys, values, mask, scale=scale, softcap=softcap))
    return finish(mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask))


def shared_attention(q: mx.array, cache, mask: mx.array | None = None, *, scale: float) -> mx.array:
    """Attention over every token another layer's cache holds, writing nothing."""
    q, keys, values, finish = cache.read_inputs(q)
    return finish(mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale,
                                                       mask=cache.mask_for(mask, q.shape[2])))


def ordered_logits(h: mx.array, centroids: mx.array, ordering: mx.array, head: mx.array, *, top_k: int) -> mx.array:
    lead, dim = h.shape[:-1], h.shape[-1]
    c, v = centroids.shape[0], head.shape[0]
    x = h.reshape(-1, dim)
    top = mx.argpartition(-(x @ centroids.T.astype(x.dtype)), kth=top_k - 1, axis=-1)[:, :top_k]   # [N, K]
    tokens = ordering.astype(mx.int32).reshape(c, v // c)[top].reshape(x.shape[0], -1)            # [N, K V/C]
    picked = (head[tokens].astype(x.dtype) @ x[:, :, None])[..., 0]                               # [N, K V/C]
    out = mx.full((x.shape[0], v), picked.min() - 1.0, dtype=x.dtype)
    return mx.put_along_axis(out, tokens, picked, axis=-1).reshape(*lead, v)


def remap_ids(ids: mx.array, tokens: list[int], to: int) -> mx.array:
    hit = mx.zeros(ids.shape, dtype=mx.bool_)
    for t in tokens:
        hit = mx.logical_or(hit, ids == t)
    return mx.where(hit, mx.array(to, dtype=ids.dtype), ids)


def select_layer(x: mx.array, index: int) -> mx.array:
    return x[..., index, :]


def clip(x: mx.array, lo: mx.array | None = None, hi: mx.array | None = None) -> mx.array:
    return mx.clip(x, lo, hi)


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


def merge_features(embeds: mx.array, ids: mx.array, features: mx.array, token_id: int | tuple[int, ...]) -> mx.array:
    """Feature rows in order at the placeholder positions (any of ``token_id`` when several:
    images and videos share one run of features, in prompt order)."""
    if isinstance(token_id, (tuple, list)):
        is_image = ids == token_id[0]
        for t in token_id[1:]:
            is_image = mx.logical_or(is_image, ids == t)
    else:
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


# ---- linear attention (Gated DeltaNet): the layer's cache is a recurrent state ---------

def zero_padded(x: mx.array, mask: mx.array | None = None) -> mx.array:
    """x [B, L, E] with the rows of left-padding columns zeroed: a column is padding when the
    step mask hides it from itself (its diagonal entry). A recurrent layer would otherwise
    fold whatever the padding rows hold into its state."""
    if mask is None:
        return x
    n = x.shape[1]
    diag = mx.diagonal(mask[:, 0, :, mask.shape[-1] - n:], axis1=1, axis2=2)     # [B or 1, L]
    return x * diag[..., None].astype(x.dtype)


def causal_conv1d(x: mx.array, w: mx.array, cache, *, activation: str | None = None) -> mx.array:
    """Depthwise causal conv over time, x [B, L, C], w [C, K], continuing from the K-1 inputs
    before this step that ``cache`` keeps (zeros for a fresh one), which it then advances."""
    width = w.shape[1] - 1
    prev = cache.conv_window(x.shape[0], width, x.shape[2], x.dtype)
    window = mx.concatenate([prev, x], axis=1)
    cache.conv_step(prev, x, window[:, window.shape[1] - width:])
    out = _la.conv1d_apply(window, w.astype(x.dtype), x.shape[1])
    return out if activation is None else act(out, activation)


def gated_delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, cache, *,
                     scale: float, chunk: int = 64) -> mx.array:
    """Gated delta rule over the step's tokens from the state ``cache`` holds, which it then
    advances: q, k [B, L, Hk, Dk] (L2-normed), v [B, L, Hv, Dv], g, beta [B, L, Hv] ->
    [B, L, Hv, Dv]. One token runs the recurrence; several run it in chunks."""
    groups = v.shape[2] // k.shape[2]
    qh = _la._heads(q, groups) * scale
    kh = _la._heads(k, groups)
    vh = v.astype(mx.float32).transpose(0, 2, 1, 3)
    gh, bh = g.astype(mx.float32).transpose(0, 2, 1), beta.astype(mx.float32).transpose(0, 2, 1)
    before = cache.recurrent_state(v.shape[0], v.shape[2], k.shape[3], v.shape[3])
    if q.shape[1] == 1:
        out, state = _la.delta_rule_steps(qh, kh, vh, gh, bh, before)
    else:
        out, state = _la.delta_rule_chunked(qh, kh, vh, gh, bh, before, chunk)
    cache.delta_step(before, kh, vh, gh, bh, state)
    return out.transpose(0, 2, 1, 3).astype(v.dtype)


def select_caches(caches: list, layers: list[int]) -> list:
    """The caches of these decoder layers, in this order (a block's layers in a hybrid stack)."""
    return [caches[i] for i in layers]


# ---- mixture of experts: stacked expert weights, only the selected experts read ---------

def moe_experts(x: mx.array, weights: mx.array, experts: mx.array, gate_up, down, *, kind: str) -> mx.array:
    """Each token through its K selected experts' gated MLP, weighted by ``weights`` and
    summed (``kernels/moe.py``); gate_up [E, 2I, H], down [E, H, I]."""
    return _moe.experts_swiglu(x, weights, experts, gate_up, down, lambda v: act(v, kind))


def qmoe_experts(x: mx.array, weights: mx.array, experts: mx.array, gate_up, down, *, kind: str) -> mx.array:
    """moe_experts with quantized (QuantWeight) expert weights, read through ``gather_qmm``."""
    return moe_experts(x, weights, experts, gate_up, down, kind=kind)


def moe_block(x: mx.array, router, gate_up, down, shared_gate_up=None, shared_down=None, shared_gate=None,
              router_x=None, expert_scale=None, *, top_k: int, normalize: bool, kind: str) -> mx.array:
    """A whole MoE block: router (on ``router_x`` where given, else on x), ``moe_route``, the
    weights times ``expert_scale`` of their experts where given, the routed experts, and the
    shared expert (gate and up rows stacked in ``shared_gate_up``) times
    sigmoid(``shared_gate`` x), if any; the separate ops it stands for, in their order
    (``kernels/moe.py``)."""
    return _moe.block_ops(sys.modules[__name__], x, router, gate_up, down, shared_gate_up, shared_down, shared_gate,
                          router_x, expert_scale, top_k=top_k, normalize=normalize, kind=kind)
