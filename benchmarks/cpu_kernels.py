"""GEMV throughput of the vlmc CPU kernels vs MLX's CPU ops and numpy.

    python benchmarks/cpu_kernels.py [--rows 1,4,8] [--threads N] [--quick] [--full]

First the machine's read bandwidth (a streaming read in C with 1 and N threads, numpy
sum and copy). Then, per weight shape and storage format, ms per call of
``vlmc.kernels.cpu.linear/qlinear`` (the Python API, overhead included) and the GB/s of
weight bytes it reads (codes + scales + biases; quantized weights use group size 64 and
bf16 scales, as a q4/q8 compile of a bf16 checkpoint does). Decode reads every weight
from DRAM once per token, so each measurement cycles through enough copies of the
weight to exceed the last-level cache. Side by side: the same product through MLX's CPU
ops (``x @ w.T``, ``mx.quantized_matmul``) and numpy float32 (OpenBLAS sgemv).

Shapes are Qwen2-VL-2B's MLP (8960x1536 up/gate, 1536x8960 down: N out x K in) and its
lm_head (151936x1536). MLX's quantized matmul on the lm_head takes seconds per call; it
runs only with --full. Times are medians (and best) of --reps calls.
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

from vlmc.kernels import cpu  # noqa: E402

CYCLE_BYTES = 160 << 20  # weights cycled through per measurement: 5x a 32 MiB L3


def timeit(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    for i in range(warmup):
        fn(i)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def bandwidth(lib, threads: int) -> None:
    n = (1 << 30) // 4
    buf = np.ones(n, np.float32)
    print(f"machine: {os.cpu_count()} CPUs; kernels: simd={lib.vlmc_simd()}, threads={threads}")
    for nth in sorted({1, threads}):
        med, best = timeit(lambda i: lib.vlmc_stream_read(buf.ctypes.data, n, nth), 7)
        print(f"  read bandwidth, C streaming sum, {nth} thread(s): {buf.nbytes / med / 1e9:5.1f} GB/s "
              f"(best {buf.nbytes / best / 1e9:.1f})")
    med, best = timeit(lambda i: buf.sum(), 5)
    print(f"  numpy sum, 1 thread:                        {buf.nbytes / med / 1e9:5.1f} GB/s")
    dst = np.empty_like(buf)
    med, best = timeit(lambda i: np.copyto(dst, buf), 5)
    print(f"  numpy copy (read + write bytes):            {2 * buf.nbytes / med / 1e9:5.1f} GB/s")


def weight_formats(N: int, K: int, formats: list[str]) -> dict:
    w = mx.random.normal((N, K), scale=0.02)
    out = {}
    for fmt in formats:
        if fmt == "f32":
            out[fmt] = (w,)
        elif fmt == "bf16":
            out[fmt] = (w.astype(mx.bfloat16),)
        else:
            out[fmt] = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=int(fmt[1:]))
        mx.eval(*out[fmt])
    return out


def nbytes(parts) -> int:
    return sum(a.nbytes for a in parts)


def clone(a: mx.array) -> mx.array:
    c = mx.array(np.array(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)))
    c = c.view(a.dtype)
    mx.eval(c)
    return c


def ours(fmt: str, parts, x):
    if len(parts) == 1:
        return cpu.linear(x, parts[0])
    wq, s, b = parts
    return cpu.qlinear(x, wq, s, b, bits=int(fmt[1:]), group_size=64)


def mlx_op(fmt: str, parts, x):
    if len(parts) == 1:
        return x @ parts[0].T
    wq, s, b = parts
    return mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=int(fmt[1:]))


def report(label: str, size: int, med: float, best: float) -> None:
    print(f"    {label:34s} {med * 1e3:9.3f} ms  {size / med / 1e9:6.1f} GB/s   (best {best * 1e3:.3f} ms, "
          f"{size / best / 1e9:.1f} GB/s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8", help="activation rows (decode batch) to time")
    ap.add_argument("--formats", default="f32,bf16,q8,q4")
    ap.add_argument("--threads", type=int, default=cpu.n_threads)
    ap.add_argument("--quick", action="store_true", help="skip the lm_head shape")
    ap.add_argument("--full", action="store_true", help="also time MLX's quantized matmul on lm_head")
    ap.add_argument("--skip-mlx", action="store_true", help="skip MLX's (slow) ops")
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    lib = cpu._get_lib()
    if lib is None:
        sys.exit("CPU kernels unavailable (no C compiler, or VLMC_CPU_KERNELS=0)")
    cpu.n_threads = args.threads
    bandwidth(lib, args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    shapes = [(8960, 1536), (1536, 8960)] + ([] if args.quick else [(151936, 1536)])
    for N, K in shapes:
        print(f"\nW [{N} x {K}]")
        for fmt, parts in weight_formats(N, K, formats).items():
            size = nbytes(parts)
            big = size > (256 << 20)
            copies = [parts] + [tuple(clone(a) for a in parts)
                                for _ in range(max(0, min(15, CYCLE_BYTES // size)))]
            reps = max(5, args.reps // (4 if big else 1))
            print(f"  {fmt}: {size / 1e6:.1f} MB")
            for M in rows:
                x = mx.random.normal((M, K))
                mx.eval(x)
                for nth in sorted({args.threads, 1}, reverse=True):
                    if nth != args.threads and M != 1:
                        continue
                    cpu.n_threads = nth
                    med, best = timeit(lambda i: ours(fmt, copies[i % len(copies)], x), reps)
                    report(f"vlmc M={M} threads={nth}", size, med, best)
                cpu.n_threads = args.threads
            x = mx.random.normal((1, K))
            mx.eval(x)
            if fmt == "f32":
                xn, wns = np.asarray(x), [np.asarray(c[0]) for c in copies]
                med, best = timeit(lambda i: xn @ wns[i % len(wns)].T, reps)
                report("numpy f32 (OpenBLAS) M=1", size, med, best)
            if args.skip_mlx or (big and fmt[0] == "q" and not args.full):
                continue
            med, best = timeit(lambda i: mx.eval(mlx_op(fmt, parts, x)), 1 if fmt[0] == "q" or big else 3)
            report(f"mlx {'quantized_matmul' if fmt[0] == 'q' else 'matmul'} M=1", size, med, best)
            del copies


if __name__ == "__main__":
    main()
