"""One layer's attention of a whole prompt over a KV cache of each layout, on the cpu target's
op (``cpu_ops.cached_attention`` in prompt rows): the C path (codes written in C, rows on the
decode kernels) against the path before it (``--before``: MLX codes, 4/8-bit codes dequantized
into the BLAS attention, TurboQuant decoded and rotated through MLX), alternating.

    python benchmarks/kv_prompt_attention.py [--tokens 4096] [--chunk 0] [--rounds 3]
        [--layouts dense,q8,q4,tq3.5] [--heads 12 --kv-heads 2 --dim 128]

Qwen2-VL-2B shapes by default (a 28-layer decoder spends 28 such calls per prompt), batch 1,
random queries, keys and values; ``--chunk N`` prefills in chunks of N tokens (the server's
budgeted prefill). Prints per layout and path the median over the rounds of one prompt's
attention (ms), its CPU time, and x dense.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from vlmc.kernels import cpu_ops  # noqa: E402
from vlmc.kernels.step_rows import prompt_rows  # noqa: E402
from vlmc.runtime.kv_cache import attention_mask, make_caches  # noqa: E402

SPECS = {"dense": "dense", "q4": {"layout": "quantized", "bits": 4, "group_size": 64},
         "q8": {"layout": "quantized", "bits": 8, "group_size": 64},
         "tq3.5": {"layout": "turboquant", "k_bits": 3, "v_bits": 4}}


def prompt(spec, q, k, v, chunk: int, before: bool) -> None:
    """The prompt's attention in one layer, whole or in chunks, into a fresh cache."""
    real = cpu_ops._host_coded_prompt
    if before:
        cpu_ops._host_coded_prompt = lambda *a, **kw: None
    try:
        cache = make_caches([{"index": 0, "kv": spec}], 1, k.shape[1], k.shape[-1])[0]
        n = q.shape[2]
        step = chunk or n
        with prompt_rows():
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                mask = attention_mask(mx.array([0], dtype=mx.int32), lo, hi - lo, True)
                out = cpu_ops.cached_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], cache, mask,
                                               scale=q.shape[-1] ** -0.5)
                np.asarray(out)
    finally:
        cpu_ops._host_coded_prompt = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default="dense,q8,q4,tq3.5")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, args.heads, args.tokens, args.dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, args.kv_heads, args.tokens, args.dim)).astype(np.float32) for _ in range(2))
    runs = [(name, before) for name in args.layouts.split(",") for before in ((False,) if name == "dense" else (False, True))]
    for name, before in runs:  # warm: kernels, compiled encodes
        prompt(SPECS[name], q[:, :, :64], k[:, :, :64], v[:, :, :64], 0, before)
    wall = {r: [] for r in runs}
    cpu = {r: [] for r in runs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, before in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            prompt(SPECS[name], q, k, v, args.chunk, before)
            wall[name, before].append(time.perf_counter() - t0)
            cpu[name, before].append(time.process_time() - c0)
    load.append(os.getloadavg()[0])
    print(f"load {load[0]:.1f} -> {load[1]:.1f}; {args.tokens}-token prompt"
          f"{f' in chunks of {args.chunk}' if args.chunk else ''}, {args.heads} heads over {args.kv_heads} KV heads "
          f"of {args.dim}; median of {args.rounds} rounds")
    print(f"{'layout':>7s} {'path':>7s} {'ms':>9s} {'x dense':>8s} {'cpu ms':>9s} {'x dense':>8s}")
    med = {r: statistics.median(wall[r]) * 1e3 for r in runs}
    cmed = {r: statistics.median(cpu[r]) * 1e3 for r in runs}
    dense = ("dense", False)
    for r in runs:
        print(f"{r[0]:>7s} {'before' if r[1] else 'C':>7s} {med[r]:9.1f} {med.get(dense, float('nan')) / med[r]:8.2f} "
              f"{cmed[r]:9.1f} {cmed.get(dense, float('nan')) / cmed[r]:8.2f}")


if __name__ == "__main__":
    main()
