"""One MoE block at decode, q4 group 64 with bf16 scales and biases for the experts, the
router (and the shared gate) float32 (the quantize pass keeps routers float), random
weights. Qwen3.5-35B-A3B's (hidden 2048, 256 experts of 512, 8 per token, a shared expert
of 512 with its sigmoid gate), or with ``--gemma4`` gemma-4-26B-A4B's routed experts
(hidden 2816, 128 experts of 704, 8 per token, gelu_tanh, the router on its own input,
per-expert scales, no shared expert):

* ``moe_block`` on the cpu target: one C call (``vlmc_moe_block_ex``: router GEMV, softmax,
  top-k, renormalisation [, per-expert scales], the routed [and the shared] experts' tiles
  shared by the threads);
* the separate ops it replaces (``kernels/moe.py`` ``block_ops`` over ``cpu_ops``: the
  router GEMV, MLX's ``moe_route``, the fused routed experts, and for Qwen the shared
  expert's gate_up, split, glu, down, its gate GEMV, sigmoid, mul and add: 11 op calls;
  for Gemma 4 the take and mul of the per-expert scales: 5 op calls).

Each call takes a new random hidden state, so the chosen experts change and come from
memory. Rounds alternate the two; medians, ms per call, 1 and 4 rows.

    python benchmarks/moe_block.py [rounds] [--gemma4]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from vlmc.kernels import cpu_ops  # noqa: E402
from vlmc.kernels.moe import block_ops  # noqa: E402
from vlmc.kernels.quant import QuantWeight  # noqa: E402
from moe_experts import BITS, E, GROUP, H, I, K, quantized  # noqa: E402

S = 512  # the shared expert's width


def dense_q(shape: tuple[int, int], seed: int) -> QuantWeight:
    c, s, b = mx.quantize(mx.random.normal(shape, key=mx.random.key(seed)) * 0.02, group_size=GROUP, bits=BITS)
    q = QuantWeight(c, s.astype(mx.bfloat16), b.astype(mx.bfloat16), BITS, GROUP, "affine")
    mx.eval(q.weight, q.scales, q.biases)
    return q


def main(rounds: int, gemma4: bool = False) -> None:
    if gemma4:  # gemma-4-26B-A4B: hidden 2816, 128 experts of 704, 8 per token
        h, e, i, k = 2816, 128, 704, 8
        gate_up, down = quantized((e, 2 * i, h), 1), quantized((e, h, i), 2)
        router = mx.random.normal((e, h), key=mx.random.key(3)) * 0.05
        scales = 0.5 + mx.random.uniform(shape=(e,), key=mx.random.key(4))
        mx.eval(router, scales)
        w = (router, gate_up, down, None, None, None)
        kw = dict(top_k=k, normalize=True, kind="gelu_tanh")
    else:
        h, k, scales = H, K, None
        gate_up, down = quantized((E, 2 * I, H), 1), quantized((E, H, I), 2)
        router = mx.random.normal((E, H), key=mx.random.key(3)) * 0.05
        sgate = mx.random.normal((1, H), key=mx.random.key(4)) * 0.05
        sgu, sdn = dense_q((2 * S, H), 5), dense_q((H, S), 6)
        mx.eval(router, sgate)
        w = (router, gate_up, down, sgu, sdn, sgate)
        kw = dict(top_k=K, normalize=True, kind="silu")
    rng = np.random.default_rng(1)

    def args(b: int) -> tuple:
        """A new hidden state of b rows (and for Gemma 4 a router input and the scales)."""
        x = rng.standard_normal((b, 1, h)).astype(np.float32)
        return (x, *w, rng.standard_normal((b, 1, h)).astype(np.float32), scales) if gemma4 else (x, *w)

    def fused(b: int):
        return lambda: cpu_ops.moe_block(*args(b), **kw)

    def ops(b: int):
        return lambda: np.asarray(block_ops(cpu_ops, *args(b), **kw))

    a_ = args(4)
    a, o = cpu_ops.moe_block(*a_, **kw), np.asarray(block_ops(cpu_ops, *a_, **kw))
    print(f"fused vs ops on 4 rows: max |diff| {np.abs(a - o).max():.2e} (max |out| {np.abs(o).max():.2e})")
    fns = {"moe_block (one C call), 1 row": (fused(1), 20), "separate ops, 1 row": (ops(1), 20),
           "moe_block (one C call), 4 rows": (fused(4), 10), "separate ops, 4 rows": (ops(4), 10)}
    for f, _ in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (f, n) in fns.items():
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t) / n * 1e3)
    print(f"{'path':32s} {'median ms':>10s}   rounds (ms)")
    for k, v in times.items():
        print(f"{k:32s} {statistics.median(v):10.2f}   {[round(t, 2) for t in v]}")


if __name__ == "__main__":
    rest = [a for a in sys.argv[1:] if a != "--gemma4"]
    main(int(rest[0]) if rest else 5, "--gemma4" in sys.argv[1:])
