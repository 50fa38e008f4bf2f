"""One int8-x GEMV shape on the AMX tiles against the VNNI panel kernels, at several row counts.

    python benchmarks/amx_gemv.py [--n 8192] [--k 1536] [--bits 4,8] [--rows 2,4,8,16]
                                  [--reps 5] [--calls 50]

Random codes (every value), bfloat16 scales and biases in groups of 64, random x; per
row count the same call runs with ``vlmc_set_amx(2)`` (the tiles for every call of 2+
rows) and ``vlmc_set_amx(0)`` (the VNNI panels), alternating, one thread, timed in thread
CPU time (what a core spends, which other jobs on a shared machine move far less than wall
time). Reports ns per 16 weight rows x 64 codes (a block) and the ratio VNNI / AMX, medians
of ``--reps`` rounds, and checks both give the same bits. Needs a CPU with AMX and a
library built on it; elsewhere both settings are the VNNI kernels.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from vlmc.kernels import cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--rows", default="2,4,8,16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    lib = cpu.library()
    if lib is None:
        sys.exit("the CPU kernels are unavailable")
    mode0 = lib.vlmc_amx()
    print(f"AMX {'available' if lib.vlmc_set_amx(2) == 2 else 'unavailable (both are VNNI)'}; "
          f"N {args.n}, K {args.k}, groups of 64, bfloat16 scales, 1 thread, thread CPU time")
    rng = np.random.default_rng(0)
    N, K = args.n, args.k
    blocks = N * K / 1024
    try:
        for bits in (int(b) for b in args.bits.split(",")):
            w = rng.integers(0, 2**32, (N, K * bits // 32), dtype=np.uint64).astype(np.uint32)
            s, b = ((rng.standard_normal((N, K // 64)).astype(np.float32) * sc).view(np.uint32) >> 16
                    for sc in (0.02, 0.1))
            s, b = s.astype(np.uint16), b.astype(np.uint16)
            for M in (int(r) for r in args.rows.split(",")):
                x = rng.standard_normal((M, K)).astype(np.float32)
                ys = {m: np.empty((M, N), np.float32) for m in (2, 0)}
                times: dict = {2: [], 0: []}
                for rep in range(args.reps + 1):  # round 0 warms up
                    for mode in (2, 0):
                        lib.vlmc_set_amx(mode)
                        t = time.thread_time()
                        for _ in range(args.calls):
                            lib.vlmc_gemv_q(x.ctypes.data, M, K, w.ctypes.data, s.ctypes.data, b.ctypes.data, 1, N,
                                            bits, 64, None, ys[mode].ctypes.data, 1)
                        if rep:
                            times[mode].append((time.thread_time() - t) / args.calls / blocks * 1e9)
                same = np.array_equal(ys[2].view(np.uint32), ys[0].view(np.uint32))
                amx, vnni = statistics.median(times[2]), statistics.median(times[0])
                print(f"q{bits} rows {M:2d}: AMX {amx:6.1f} ns/block  VNNI {vnni:6.1f} ns/block  "
                      f"VNNI/AMX {vnni / amx:4.2f}  same bits: {same}", flush=True)
    finally:
        lib.vlmc_set_amx(mode0)


if __name__ == "__main__":
    main()
