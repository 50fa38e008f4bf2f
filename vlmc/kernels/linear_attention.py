"""MLX references of the linear-attention ops (Gated DeltaNet, as Qwen3.5 uses it).

A Gated DeltaNet layer keeps, per sequence and value head, a [Dk, Dv] matrix S. Each token
decays it by exp(g), then writes the correction of what S already predicts for the token's
key (the delta rule, at rate beta), and the query reads it:

    S <- exp(g) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T q

``delta_rule_steps`` runs that token by token (decode, and rewinding a cache exactly);
``delta_rule_chunked`` computes the same in chunks of C tokens, where the C sequential
writes of a chunk become one unit-lower-triangular inverse and a few matmuls (the ops'
prefill; the cpu target's prompt path runs the recurrence token by token in C instead,
``kernels/cpu/deltanet_prompt.c``).
``causal_conv1d`` is the short depthwise convolution before it, over the previous
kernel-1 inputs that a cache keeps.
"""
from __future__ import annotations

import mlx.core as mx


def l2_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in float32."""
    xf = x.astype(mx.float32)
    return (xf * mx.rsqrt((xf * xf).sum(axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rms_norm_gated(x: mx.array, z: mx.array, w: mx.array, eps: float) -> mx.array:
    """RMSNorm of x (weight w, no offset), then times silu(z): the norm comes before the gate."""
    xf = x.astype(mx.float32)
    n = (xf * mx.rsqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)).astype(x.dtype)
    zf = z.astype(mx.float32)
    return ((w * n).astype(mx.float32) * (zf * mx.sigmoid(zf))).astype(x.dtype)


def delta_gates(a: mx.array, b: mx.array, a_log: mx.array, dt_bias: mx.array) -> tuple[mx.array, mx.array]:
    """(g, beta): the log decay -exp(A_log) * softplus(a + dt_bias) and the write rate sigmoid(b),
    per token and value head, in float32."""
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    softplus = mx.where(x > 20.0, x, mx.logaddexp(x, mx.zeros_like(x)))  # torch's threshold
    g = -mx.exp(a_log.astype(mx.float32)) * softplus
    return g, mx.sigmoid(b.astype(mx.float32))


def conv1d_apply(window: mx.array, w: mx.array, length: int) -> mx.array:
    """Depthwise causal convolution: window [B, K-1+L, C] (previous inputs, then L new ones),
    w [C, K] -> [B, L, C] (out[t] = sum_j w[:, j] * window[t + j])."""
    k = w.shape[1]
    out = window[:, 0:length] * w[:, 0]
    for j in range(1, k):
        out = out + window[:, j:j + length] * w[:, j]
    return out


def _heads(x: mx.array, groups: int) -> mx.array:
    """[B, L, Hk, D] -> [B, Hk * groups, L, D] float32: each key head serves ``groups``
    consecutive value heads."""
    x = x.astype(mx.float32).transpose(0, 2, 1, 3)
    if groups > 1:
        b, h, n, d = x.shape
        x = mx.broadcast_to(x[:, :, None], (b, h, groups, n, d)).reshape(b, h * groups, n, d)
    return x


def delta_rule_steps(q: mx.array | None, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                     state: mx.array) -> tuple[mx.array | None, mx.array]:
    """The recurrence token by token, heads-first float32 inputs: q, k [B, H, L, Dk] (q scaled,
    or None: only the state is wanted), v [B, H, L, Dv], g, beta [B, H, L], state
    [B, H, Dk, Dv] -> (outputs [B, H, L, Dv] or None, the state after the last token)."""
    outs = []
    for t in range(k.shape[2]):
        state = state * mx.exp(g[:, :, t])[..., None, None]
        kt = k[:, :, t]
        predicted = (state * kt[..., None]).sum(axis=-2)                   # S^T k  [B, H, Dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t][..., None]
        state = state + kt[..., None] * delta[..., None, :]
        if q is not None:
            outs.append((state * q[:, :, t][..., None]).sum(axis=-2))
    return (mx.stack(outs, axis=2) if q is not None else None), state


def delta_rule_chunked(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                       state: mx.array, chunk: int = 64) -> tuple[mx.array, mx.array]:
    """``delta_rule_steps`` in chunks of ``chunk`` tokens (same inputs and outputs).

    Within a chunk with cumulative log decay c (c_t = g_1 + ... + g_t), the tokens' writes
    solve u = T (beta v - beta exp(c) k S0) with T = (I + A)^-1, A[i, j] = beta_i k_i.k_j
    exp(c_i - c_j) for j < i; outputs are exp(c) q S0 plus the causal, decayed q.k scores
    times u; the chunk's final state is exp(c_C) S0 + sum_j exp(c_C - c_j) k_j u_j^T."""
    b, h, n, dk = k.shape
    pad = (-n) % chunk
    if pad:  # zero keys, rates and decays past the end change neither outputs nor state
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (g, beta))
    m = (n + pad) // chunk
    q, k, v = (x.reshape(b, h, m, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(b, h, m, chunk) for x in (g, beta))
    c = mx.cumsum(g, axis=-1)
    lower = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    strict = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), -1)
    gap = c[..., :, None] - c[..., None, :]                                 # c_i - c_j
    decay = mx.where(lower, mx.exp(mx.where(lower, gap, 0.0)), 0.0)
    kb = k * beta[..., None]
    a = mx.where(strict, (kb @ k.swapaxes(-1, -2)) * decay, 0.0)
    t = mx.linalg.tri_inv(a + mx.eye(chunk), upper=False, stream=mx.cpu)
    u0 = t @ (v * beta[..., None])                                          # writes from S0 = 0
    w = t @ (kb * mx.exp(c)[..., None])                                     # what S0 takes off them
    scores = (q @ k.swapaxes(-1, -2)) * decay
    q_in = q * mx.exp(c)[..., None]
    k_out = k * mx.exp(c[..., -1:] - c)[..., None]
    last = mx.exp(c[..., -1])[..., None, None]
    outs = []
    for i in range(m):
        u = u0[:, :, i] - w[:, :, i] @ state
        outs.append(q_in[:, :, i] @ state + scores[:, :, i] @ u)
        state = state * last[:, :, i] + k_out[:, :, i].swapaxes(-1, -2) @ u
    out = mx.concatenate(outs, axis=2)[:, :, :n]
    return out, state
