"""One MoE layer's routed experts for one decode token, Qwen3.5-35B-A3B's shapes (hidden
2048, 256 experts of 512, 8 per token), q4 group 64 with bf16 scales and biases, random
weights: the cpu target's per-expert loop (``kernels/cpu/moe.py``), MLX's ``gather_qmm``
(the reference op), and reading every expert (one compact-weight GEMV over all experts'
gate+up, one over all their down projections: the dense-equivalent read). Each expert's
kernel arguments are prepared before timing (as in a long run); each round draws new
random experts. Rounds alternate the three; medians printed.

    python benchmarks/moe_experts.py [rounds]
"""
from __future__ import annotations

import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from vlmc.kernels import cpu as _cpu
from vlmc.kernels import cpu_ops, reference
from vlmc.kernels.cpu import moe as cm
from vlmc.kernels.quant import QuantWeight

H, E, I, K = 2048, 256, 512, 8
BITS, GROUP = 4, 64


def quantized(shape: tuple[int, int, int], seed: int) -> QuantWeight:
    parts = []
    for e0 in range(0, shape[0], 32):  # in slices: bounded float32 temporaries
        w = mx.random.normal((32,) + shape[1:], key=mx.random.key(seed + e0)) * 0.02
        c, s, b = mx.quantize(w.reshape(-1, shape[-1]), group_size=GROUP, bits=BITS)
        mx.eval(c, s, b)
        parts.append((c, s.astype(mx.bfloat16), b.astype(mx.bfloat16)))

    def cat(i: int) -> mx.array:
        return mx.concatenate([p[i] for p in parts]).reshape(shape[0], shape[1], -1)
    q = QuantWeight(cat(0), cat(1), cat(2), BITS, GROUP, "affine")
    mx.eval(q.weight, q.scales, q.biases)
    return q


def main(rounds: int) -> None:
    gate_up, down = quantized((E, 2 * I, H), 1), quantized((E, H, I), 2)
    every_gu = QuantWeight(*(a.reshape(E * 2 * I, -1) for a in (gate_up.weight, gate_up.scales, gate_up.biases)),
                           BITS, GROUP, "affine")
    every_down = QuantWeight(*(a.transpose(1, 0, 2).reshape(H, -1) for a in (down.weight, down.scales, down.biases)),
                             BITS, GROUP, "affine")
    mx.eval(every_down.weight, every_down.scales, every_down.biases)
    x = np.random.default_rng(0).standard_normal((1, 1, H)).astype(np.float32)
    rng = np.random.default_rng(1)
    weights = mx.full((1, 1, K), 1.0 / K)

    def draw() -> mx.array:
        return mx.array(rng.choice(E, K, replace=False).reshape(1, 1, K).astype(np.int32))

    def routed():
        return np.asarray(cm.routed_experts(x, weights, draw(), gate_up, down, glu=lambda g, u: cpu_ops.glu(g, u, "silu"),
                                            linear=cpu_ops.linear, qlinear=cpu_ops.qlinear))

    def fused():
        return np.asarray(cm.fused_experts(x, weights, draw(), gate_up, down, "silu"))

    def gathered():
        return np.asarray(reference.qmoe_experts(mx.array(x), weights, draw(), gate_up, down, kind="silu"))

    def every():
        h = np.asarray(_cpu.qlinear(x.reshape(1, H), every_gu, host=True)).reshape(E, 2, I)
        return np.asarray(_cpu.qlinear(np.ascontiguousarray((h[:, 0] * h[:, 1]).reshape(1, E * I)), every_down,
                                       host=True))

    for e0 in range(0, E, K):  # every expert's kernel arguments, once
        cpu_ops.qmoe_experts(x, weights, mx.arange(e0, e0 + K, dtype=mx.int32).reshape(1, 1, K), gate_up, down,
                             kind="silu")
    fns = {"routed: fused C call": (fused, 10), "routed: cpu per-expert loop": (routed, 10), "routed: MLX gather_qmm": (gathered, 3),
           "every expert: cpu GEMV": (every, 3)}
    for f, _ in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (f, n) in fns.items():
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t) / n * 1e3)
    per_expert = 3 * I * H * (BITS + 2 * 16 / GROUP) / 8
    print(f"bytes per layer and token: routed {K * per_expert / 1e6:.2f} MB, every expert {E * per_expert / 1e6:.1f} MB")
    for k, v in times.items():
        print(f"{k:30s} median {statistics.median(v):8.2f} ms   rounds {[round(t, 1) for t in v]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
