"""One layer's decode attention alone on the cpu kernels, per KV layout and context length:
what `vlmc bench --context` spends per layer in attention, without the weights.

    python benchmarks/kv_attention_step.py [--contexts 4096,16384,32000] [--rounds 3]
        [--reps 5] [--layouts dense,q4,q8,tq3.5] [--heads 12 --kv-heads 2 --dim 128]

Qwen2-VL-2B shapes by default (12 query heads over 2 KV heads of 128), batch 1, one query
token, random keys and values stored by the runtime's own codecs (affine codes in groups of
64, TurboQuant 3-bit keys and 4-bit values; q4f / q8f: the float driver over the same
codes, VLMC_KV_FLOAT=1; tq3.5b: TurboQuant keys scored by the block driver,
VLMC_KV_TURBO_BLOCKS=1). Each round times every layout at every context
in turn (the machine's load moves them alike); prints per layout the fastest call of each
round (median over the rounds), its CPU time, and the cache bytes the call reads per second
(held tokens x stored bytes per token).
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

from vlmc.kernels.cpu import kv_decode  # noqa: E402
from vlmc.runtime.kv_cache import make_caches  # noqa: E402

SPECS = {"dense": "dense", "q4": {"layout": "quantized", "bits": 4, "group_size": 64},
         "q8": {"layout": "quantized", "bits": 8, "group_size": 64},
         "tq3.5": {"layout": "turboquant", "k_bits": 3, "v_bits": 4}}
SPECS |= {"q4f": SPECS["q4"], "q8f": SPECS["q8"]}  # the float driver (VLMC_KV_FLOAT=1) over the same codes
SPECS |= {"tq3.5b": SPECS["tq3.5"]}  # TurboQuant keys scored by the block driver (VLMC_KV_TURBO_BLOCKS=1)
ENV = {"q4f": "VLMC_KV_FLOAT", "q8f": "VLMC_KV_FLOAT", "tq3.5b": "VLMC_KV_TURBO_BLOCKS"}


def filled_cache(spec, n: int, kv_heads: int, dim: int, rng):
    cache = make_caches([{"index": 0, "kv": spec}], 1, kv_heads, dim)[0]
    for i in range(0, n, 4096):
        m = min(4096, n - i)
        k = mx.array(rng.standard_normal((1, kv_heads, m, dim)).astype(np.float32))
        v = mx.array(rng.standard_normal((1, kv_heads, m, dim)).astype(np.float32))
        cache.append(k, v)
        mx.eval(*(b for parts in cache.buffers.values() for b in parts.values()))
    return cache


def step_fn(cache, heads: int, dim: int, rng, env: str | None = None):
    """A call of the layout's decode kernel over the whole cache (host q, as decode_layer's path);
    ``env``: a variable set to 1 around the call (another driver over the same codes)."""
    call = _step_fn(cache, heads, dim, rng)
    if not env:
        return call

    def other():
        os.environ[env] = "1"
        try:
            return call()
        finally:
            del os.environ[env]
    return other


def _step_fn(cache, heads: int, dim: int, rng):
    q = rng.standard_normal((1, heads, dim)).astype(np.float32)
    starts, held, scale = np.zeros(1, np.int32), cache.held, dim ** -0.5
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    if cache.layout == "dense":
        return lambda: kv_decode.kv_dense_decode(q, kb["x"], vb["x"], starts, held, scale=scale)
    if cache.layout == "affine":
        c = cache.codecs["k"]
        return lambda: kv_decode.kv_affine_decode(q, kb["codes"], kb["scales"], kb["biases"], vb["codes"],
                                                  vb["scales"], vb["biases"], starts, held, scale=scale,
                                                  bits=c.bits, group_size=c.group_size)
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    norms = [a.astype(mx.float32) for a in (kb["norms"], vb["norms"])]
    return lambda: kv_decode.kv_turbo_decode(q, kb["codes"], norms[0], vb["codes"], norms[1], kc.codebook,
                                             vc.codebook, starts, held, scale=scale, k_bits=kc.bits,
                                             v_bits=vc.bits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,32000")
    ap.add_argument("--layouts", default="dense,q4,q8,tq3.5,q4f,q8f",
                    help="q4f, q8f: the float driver over 4/8-bit codes (VLMC_KV_FLOAT=1), the kernel before VNNI; "
                         "tq3.5b: TurboQuant keys scored by the block driver (VLMC_KV_TURBO_BLOCKS=1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    layouts = args.layouts.split(",")
    calls, nbytes = {}, {}
    for n in contexts:
        for name in layouts:
            cache = filled_cache(SPECS[name], n, args.kv_heads, args.dim, rng)
            calls[n, name] = step_fn(cache, args.heads, args.dim, rng, env=ENV.get(name))
            nbytes[n, name] = cache.held * cache.bytes_per_token()
            calls[n, name]()  # warm (library load, first-touch)
    times = {key: [] for key in calls}
    cpu = {key: [] for key in calls}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for key, fn in calls.items():
            t, c = [], []
            for _ in range(args.reps):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                t.append(time.perf_counter() - t0)
                c.append(time.process_time() - c0)
            times[key].append(min(t))
            cpu[key].append(min(c))
    load.append(os.getloadavg()[0])
    print(f"load {load[0]:.1f} -> {load[1]:.1f}; {args.heads} heads over {args.kv_heads} KV heads of {args.dim}, "
          f"batch 1; per round the fastest of {args.reps} calls, median of {args.rounds} rounds; cpu ms: the "
          f"process's CPU time per call (both threads), which other jobs on the machine disturb less")
    print(f"{'context':>8s} {'layout':>7s} {'ms':>8s} {'x dense':>8s} {'cpu ms':>8s} {'x dense':>8s} {'MB read':>8s} "
          f"{'GB/s':>6s}")
    for n in contexts:
        for name in layouts:
            ms = statistics.median(times[n, name]) * 1e3
            cms = statistics.median(cpu[n, name]) * 1e3
            dense = statistics.median(times[n, "dense"]) * 1e3 if "dense" in layouts else float("nan")
            cdense = statistics.median(cpu[n, "dense"]) * 1e3 if "dense" in layouts else float("nan")
            print(f"{n:8d} {name:>7s} {ms:8.3f} {dense / ms:8.2f} {cms:8.3f} {cdense / cms:8.2f} "
                  f"{nbytes[n, name] / 1e6:8.1f} {nbytes[n, name] / ms / 1e6:6.1f}")


if __name__ == "__main__":
    main()
