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


def block_ops(ops, x, router, gate_up, down, shared_gate_up=None, shared_down=None, shared_gate=None,
              router_x=None, expert_scale=None, *, top_k: int, normalize: bool, kind: str):
    """A whole MoE block (``moe_block``) as the separate ops of op library ``ops`` compute it,
    in the order the models emit them: router (on ``router_x`` where given, else on x),
    ``moe_route``, the weights times ``expert_scale`` of their experts where given (Gemma 4's
    per-expert scale), the routed experts, and, with ``shared_gate_up`` (the shared expert's
    gate and up rows stacked, gate first), the shared expert times sigmoid(``shared_gate``
    x), added last (``models/common/moe.py``)."""
    from .quant import QuantWeight

    def proj(v, w):
        return ops.qlinear(v, w) if isinstance(w, QuantWeight) else ops.linear(v, w)

    weights, experts = ops.moe_route(proj(x if router_x is None else router_x, router), top_k=top_k,
                                     normalize=normalize)
    if expert_scale is not None:
        weights = ops.mul(weights, ops.take(expert_scale, experts, axis=0))
    quantized = isinstance(gate_up, QuantWeight) or isinstance(down, QuantWeight)
    y = (ops.qmoe_experts if quantized else ops.moe_experts)(x, weights, experts, gate_up, down, kind=kind)
    if shared_gate_up is None:
        return y
    half = (shared_gate_up.weight if isinstance(shared_gate_up, QuantWeight) else shared_gate_up).shape[0] // 2
    g, u = ops.split(proj(x, shared_gate_up), sizes=[half, half], axis=-1)
    s = proj(ops.glu(g, u, kind=kind), shared_down)
    return ops.add(y, ops.mul(s, ops.act(proj(x, shared_gate), kind="sigmoid")))
