"""Throughput of the int8 GEMM (``vlmc_gemm_q_i8``: prefill and vision matmuls) at
Qwen2-VL-2B shapes, in G multiply-adds per second against the machine's int8 peak.

    python benchmarks/gemm_i8.py [--lib A.so --lib B.so] [--shapes text,vision] [--reps 7]
                                 [--threads N] [--peak 450]

Each shape is (M rows of x, K in, N out), 4-bit codes with group size 64 and float32
scales and biases, as a q4 compile of a float32 checkpoint stores them: the text
decoder's projections at a 128-token prefill (qkv, o, gate_up, down) and the vision
tower's at one 448x448 image (1024 patches: qkv, proj, fc1, fc2). With several ``--lib``
(libraries built from different sources, e.g. the cached build of another tree) every
call alternates between them in one process, so the machine's load moves all alike; the
report gives medians over ``--reps`` rounds and the ratio of each library's time to the
first's. ``--peak``: the machine's int8 multiply-adds per second in G (two Zen 4 cores
issue one 64-MAC vpdpbusd per cycle each: ~450 G at 3.6 GHz).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from vlmc.kernels import cpu  # noqa: E402

P, I = ctypes.c_void_p, ctypes.c_int

# name: (M, K, N)
SHAPES = {
    "text": [("qkv", 128, 1536, 2048), ("o", 128, 1536, 1536), ("gate_up", 128, 1536, 17920),
             ("down", 128, 8960, 1536)],
    "vision": [("v.qkv", 1024, 1280, 3840), ("v.proj", 1024, 1280, 1280), ("v.fc1", 1024, 1280, 5120),
               ("v.fc2", 1024, 5120, 1280)],
}


def open_lib(path: str) -> ctypes.CDLL:
    """A kernel library of any ABI number, with the function used here declared."""
    lib = ctypes.CDLL(str(Path(path).resolve()))
    lib.vlmc_gemm_q_i8.restype = I
    lib.vlmc_gemm_q_i8.argtypes = [P, I, I, P, P, P, I, I, I, I, P, P, I]
    return lib


class Weight:
    """Random 4-bit affine codes [N, K] with float32 scales and biases per 64 values."""

    def __init__(self, rng, N: int, K: int, bits: int = 4, gs: int = 64):
        self.N, self.K, self.bits, self.gs = N, K, bits, gs
        self.w = rng.integers(0, 2**32, size=(N, K * bits // 32), dtype=np.uint32)
        self.s = (rng.random((N, K // gs), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        self.b = (rng.standard_normal((N, K // gs)).astype(np.float32) * 0.05)
        self.bias = rng.standard_normal(N).astype(np.float32) * 0.1


def call(lib, wt: Weight, x: np.ndarray, y: np.ndarray, threads: int) -> None:
    M = x.shape[0]
    rc = lib.vlmc_gemm_q_i8(x.ctypes.data, M, wt.K, wt.w.ctypes.data, wt.s.ctypes.data, wt.b.ctypes.data, 0,
                            wt.N, wt.bits, wt.gs, wt.bias.ctypes.data, y.ctypes.data, threads)
    if rc:
        raise RuntimeError(f"vlmc_gemm_q_i8 returned {rc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", action="append", help="kernel libraries to compare (default: the current build)")
    ap.add_argument("--shapes", default="text,vision")
    ap.add_argument("--rows", type=int, default=0, help="override every shape's M")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=cpu.n_threads)
    ap.add_argument("--peak", type=float, default=450.0, help="int8 peak, G multiply-adds per second")
    args = ap.parse_args()
    libs = [open_lib(p) for p in args.lib] if args.lib else [cpu.library()]
    names = [Path(p).name for p in args.lib] if args.lib else ["current"]
    rng = np.random.default_rng(0)
    shapes = [s for group in args.shapes.split(",") for s in SHAPES[group]]
    if args.rows:
        shapes = [(n, args.rows, K, N) for n, _, K, N in shapes]
    weights = {(K, N): Weight(rng, N, K) for _, _, K, N in shapes}
    xs = {(M, K): rng.standard_normal((M, K)).astype(np.float32) for _, M, K, _ in shapes}
    ys = {li: {(M, N): np.empty((M, N), np.float32) for _, M, _, N in shapes} for li in range(len(libs))}
    for _, M, K, N in shapes:  # every library computes the same values (up to summation order)
        outs = []
        for li, lib in enumerate(libs):
            call(lib, weights[(K, N)], xs[(M, K)], ys[li][(M, N)], args.threads)
            outs.append(ys[li][(M, N)].copy())
        for o in outs[1:]:
            err = float(np.abs(o - outs[0]).max() / (np.abs(outs[0]).max() + 1e-30))
            if err > 1e-4:
                sys.exit(f"libraries disagree at M={M} K={K} N={N}: max relative difference {err:.2e}")
    times: dict = {}
    cpu_times: dict = {}  # CPU seconds of all threads: the work per core, less the host's load
    for rep in range(args.reps + 1):  # round 0 warms up
        for name, M, K, N in shapes:
            for li, lib in enumerate(libs):
                t, c = time.perf_counter(), time.process_time()
                call(lib, weights[(K, N)], xs[(M, K)], ys[li][(M, N)], args.threads)
                if rep:
                    times.setdefault((name, li), []).append(time.perf_counter() - t)
                    cpu_times.setdefault((name, li), []).append(time.process_time() - c)
    print(f"int8 GEMM, 4-bit codes (group 64), threads {args.threads}, medians of {args.reps}; wall ms, "
          f"G MAC/s and % of a {args.peak:.0f} G peak; G MAC per CPU second (per core: half the peak)")
    print(f"{'shape':>8s} {'M':>5s} {'K':>5s} {'N':>6s} " + "".join(f"{n[:30]:>42s}" for n in names))
    total = [0.0] * len(libs)
    for name, M, K, N in shapes:
        cells = []
        for li in range(len(libs)):
            t = statistics.median(times[(name, li)])
            total[li] += t
            g = M * K * N / t / 1e9
            gc = M * K * N / statistics.median(cpu_times[(name, li)]) / 1e9
            cell = f"{t * 1e3:7.2f} ms {g:6.1f} G {100 * g / args.peak:3.0f}% {gc:5.1f} Gc"
            if li:
                cell += f" {t / statistics.median(times[(name, 0)]):5.2f}x"
            cells.append(f"{cell:>42s}")
        print(f"{name:>8s} {M:5d} {K:5d} {N:6d} " + "".join(cells))
    print(f"{'sum':>27s} " + "".join(f"{t * 1e3:>26.1f} ms{(f' {t / total[0]:5.2f}x' if li else ''):>6s}"
                                     for li, t in enumerate(total)))


if __name__ == "__main__":
    main()
