"""Routed experts (mixture of experts): the MLX reference of routing and of the expert
matmuls, as transformers' Qwen3.5-MoE sparse block computes them.

Expert weights are stacked [experts, out, in], float or quantized (a ``QuantWeight`` whose
codes, scales and biases carry the leading experts axis: each expert's rows are quantized
on their own). ``gather_mm`` / ``gather_qmm`` pick each token's selected experts, so only
those experts' weights are read.
"""
from __future__ import annotations

import mlx.core as mx


def moe_route(logits: mx.array, *, top_k: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """Router logits [.., E] -> (weights [.., K] float32, experts [.., K] int32): softmax in
    float32, the K most probable experts (most probable first), renormalised to sum to 1
    when ``normalize``."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    experts = mx.argsort(-probs, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(probs, experts, axis=-1)
    if normalize:
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(mx.int32)


def expert_matmul(x: mx.array, w, experts: mx.array) -> mx.array:
    """x [T, K or 1, 1, in] times the transposed weight of expert ``experts`` [T, K] ->
    [T, K, 1, out]; ``w`` stacked [E, out, in], an mx.array or a QuantWeight."""
    if isinstance(w, mx.array):
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=experts)
    return mx.gather_qmm(x, w.weight, w.scales, w.biases, rhs_indices=experts, transpose=True,
                         group_size=w.group_size, bits=w.bits, mode=w.mode)


def experts_swiglu(x: mx.array, weights: mx.array, experts: mx.array, gate_up, down, act) -> mx.array:
    """x [.., H] through its selected experts: act(gate) * up (gate the first half of
    gate_up's rows), down, weighted by ``weights`` and summed over the K experts."""
    lead, h, k = x.shape[:-1], x.shape[-1], experts.shape[-1]
    idx = experts.reshape(-1, k)
    gu = expert_matmul(x.reshape(-1, 1, 1, h), gate_up, idx)           # [T, K, 1, 2I]
    half = gu.shape[-1] // 2
    y = expert_matmul(act(gu[..., :half]) * gu[..., half:], down, idx)[..., 0, :]   # [T, K, H]
    y = mx.sum(y * weights.reshape(-1, k, 1).astype(y.dtype), axis=1)
    return y.reshape(*lead, y.shape[-1])
