"""One MoE layer's routed experts at decode, Qwen3.5-35B-A3B's shapes (hidden 2048, 256
experts of 512, 8 per token), q4 group 64 with bf16 scales and biases, random weights:

* the cpu target's fused call (``vlmc_moe_experts``: one C call, the selected experts' rows
  in tiles both threads take from one counter), for 1 and 4 sequences (4 rows with their
  own experts each, ~31 distinct);
* the per-expert loop it replaced (``kernels/cpu/moe.py`` ``routed_experts``: per expert a
  gate_up GEMV, the activation and a down GEMV, each a Python call), 1 and 4 sequences;
* MLX's ``gather_qmm`` (the reference op), 1 sequence;
* every expert (one compact-weight GEMV over all experts' gate+up, one over all their down
  projections): what a dense decoder of the same parameters reads per token.

Each path's kernel arguments are prepared before timing (as in a long run); each call draws
new random experts, so the selected experts' weights come from memory, not cache. Rounds
alternate the paths; medians printed, with the bytes each call reads and the read rate.

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
    rng = np.random.default_rng(1)
    xs = {b: rng.standard_normal((b, 1, H)).astype(np.float32) for b in (1, 4)}
    weights = {b: mx.full((b, 1, K), 1.0 / K) for b in (1, 4)}
    drawn: dict[int, np.ndarray] = {}

    def draw(b: int) -> mx.array:
        drawn[b] = np.stack([rng.choice(E, K, replace=False) for _ in range(b)]).reshape(b, 1, K).astype(np.int32)
        return mx.array(drawn[b])

    def loop(b: int):
        return lambda: np.asarray(cm.routed_experts(xs[b], weights[b], draw(b), gate_up, down,
                                                    glu=lambda g, u: cpu_ops.glu(g, u, "silu"),
                                                    linear=cpu_ops.linear, qlinear=cpu_ops.qlinear))

    def fused(b: int):
        return lambda: np.asarray(cm.fused_experts(xs[b], weights[b], draw(b), gate_up, down, "silu"))

    def gathered():
        return np.asarray(reference.qmoe_experts(mx.array(xs[1]), weights[1], draw(1), gate_up, down, kind="silu"))

    def every():
        h = np.asarray(_cpu.qlinear(xs[1].reshape(1, H), every_gu, host=True)).reshape(E, 2, I)
        return np.asarray(_cpu.qlinear(np.ascontiguousarray((h[:, 0] * h[:, 1]).reshape(1, E * I)), every_down,
                                       host=True))

    for e0 in range(0, E, K):  # every expert's kernel arguments (the loop's views), once
        cm.routed_experts(xs[1], weights[1], mx.arange(e0, e0 + K, dtype=mx.int32).reshape(1, 1, K), gate_up, down,
                          glu=lambda g, u: cpu_ops.glu(g, u, "silu"), linear=cpu_ops.linear, qlinear=cpu_ops.qlinear)
    per_expert = 3 * I * H * (BITS + 2 * 16 / GROUP) / 8
    # name: (call, calls per round, rows)
    fns = {"fused C call, 1 sequence": (fused(1), 20, 1), "per-expert loop, 1 sequence": (loop(1), 10, 1),
           "fused C call, 4 sequences": (fused(4), 10, 4), "per-expert loop, 4 sequences": (loop(4), 5, 4),
           "MLX gather_qmm, 1 sequence": (gathered, 2, 1), "every expert (dense equivalent)": (every, 3, 0)}
    for f, _, _ in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    experts_read: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (f, n, b) in fns.items():
            t = time.perf_counter()
            for _ in range(n):
                f()
                experts_read[k].append(len(np.unique(drawn[b])) if b else E)
            times[k].append((time.perf_counter() - t) / n * 1e3)
    print(f"bytes per layer and token: routed {K * per_expert / 1e6:.2f} MB, every expert (dense equivalent) "
          f"{E * per_expert / 1e6:.1f} MB ({E / K:.0f}x)")
    print(f"{'path':34s} {'MB read':>8s} {'median ms':>10s} {'GB/s':>6s}   rounds (ms)")
    for k, v in times.items():
        mb = statistics.mean(experts_read[k]) * per_expert / 1e6
        ms = statistics.median(v)
        print(f"{k:34s} {mb:8.1f} {ms:10.2f} {mb / ms:6.2f}   {[round(t, 1) for t in v]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
