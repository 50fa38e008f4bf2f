"""Each affine code width on the CPU kernels: read in place vs its load-time copy, and the
int8 GEMM vs dequantize + OpenBLAS.

    python benchmarks/code_widths.py [--bits 2,3,5,6] [--gemv-rows 1,4] [--reps 5] [--skip-gemm]

GEMV (decode): ms per call of ``vlmc.kernels.cpu.qlinear`` for weights of each width as
stored (2/3/5/6-bit codes widened in registers where the CPU has AVX512-VBMI and x is
rounded to int8) and as the 4- or 8-bit copy the loader can make of them
(``vlmc.kernels.cpu.widen``, exact). Like ``cpu_kernels.py`` each measurement cycles
through enough copies of the weight to exceed the last-level cache, as decode reads every
weight from DRAM once per token. ``runtime.artifact.cpu_widening`` keeps a width in place
only where this measured faster (``cpu.load_width``).

GEMM (prefill, the vision tower): ms per call with more rows than a GEMV takes, through
vlmc's int8 GEMM and through dequantize + OpenBLAS (``INT8_GEMM_MIN_MACS`` raised out of
reach), and the relative L2 difference of the two (x rounded to int8 per 64 values).

Residual (8-bit codes): the GEMV and the GEMM with x's rounding residual (their default
for 8-bit codes: a second vpdpbusd per 64 codes) against one int8 rounding, with each
one's relative L2 difference from float x.

The two variants of every comparison alternate in one process, so a change in the
machine's speed hits both alike. Shapes are Qwen2-VL-2B's (N out x K in).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from vlmc.backends.quantize import quantize_array  # noqa: E402
from vlmc.kernels import cpu, quant  # noqa: E402

CYCLE_BYTES = 160 << 20  # weights cycled through per GEMV measurement: 5x a 32 MiB L3
GEMV_SHAPES = [("gate_up", 17920, 1536), ("down", 1536, 8960), ("qkv", 2048, 1536), ("lm_head", 151936, 1536)]
GEMM_SHAPES = [("gate_up", 128, 17920, 1536), ("down", 512, 1536, 8960), ("qkv", 512, 2048, 1536),
               ("vision fc1", 1024, 5120, 1280), ("vision qkv", 1024, 3840, 1280)]


def weight(N: int, K: int, bits: int) -> quant.QuantWeight:
    w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
    q = quantize_array(w, bits=bits, group_size=64, mode="affine")
    mx.eval(q.weight, q.scales, q.biases)
    return q


def nbytes(q: quant.QuantWeight) -> int:
    return q.weight.nbytes + q.scales.nbytes + q.biases.nbytes


def alternate(a, b, reps: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def gemv(bits: int, rows: list[int], reps: int) -> None:
    wider = quant.WIDER[bits]
    for name, N, K in GEMV_SHAPES:
        q = weight(N, K, bits)
        copies = max(1, CYCLE_BYTES // nbytes(cpu.widen(q, wider)))
        stored = [q] + [weight(N, K, bits) for _ in range(copies - 1)]
        widened = [cpu.widen(s, wider) for s in stored]
        mx.eval(*[w.weight for w in widened])
        for M in rows:
            x = mx.random.normal((M, K))
            mx.eval(x)
            if not np.array_equal(np.asarray(cpu.qlinear(x, stored[0], host=True)),
                                  np.asarray(cpu.qlinear(x, widened[0], host=True))):
                note = "  (results differ in float summation order)"
            else:
                note = "  (same result, bit for bit)"

            def run(ws):
                return lambda: [cpu.qlinear(x, w, host=True) for w in ws]
            a, b = alternate(run(stored), run(widened), reps)
            a, b = a / copies, b / copies
            print(f"  {bits}-bit {name:8s} {N:6d}x{K:<5d} M={M:2d}: as stored {a:7.3f} ms "
                  f"({nbytes(stored[0]) / a / 1e6:5.1f} GB/s)  {wider}-bit copy {b:7.3f} ms "
                  f"({nbytes(widened[0]) / b / 1e6:5.1f} GB/s)  ratio {a / b:.2f}{note}", flush=True)


def gemm(bits: int, reps: int) -> None:
    default = cpu.INT8_GEMM_MIN_MACS
    for name, M, N, K in GEMM_SHAPES:
        q = weight(N, K, bits)
        x = mx.random.normal((M, K))
        mx.eval(x)

        def run(threshold):
            def f():
                cpu.INT8_GEMM_MIN_MACS = threshold
                try:
                    return np.asarray(cpu.qlinear(x, q, host=True))
                finally:
                    cpu.INT8_GEMM_MIN_MACS = default
            return f
        i8, fl = run(default), run(1 << 62)
        err = float(np.linalg.norm(i8() - fl()) / np.linalg.norm(fl()))
        a, b = alternate(i8, fl, reps)
        flop = 2 * M * N * K / 1e9
        print(f"  {bits}-bit {name:10s} M={M:4d} N={N:5d} K={K:4d}: int8 GEMM {a:6.1f} ms ({flop / a * 1e3:4.0f} "
              f"GFLOP/s)  dequantize + OpenBLAS {b:6.1f} ms ({flop / b * 1e3:4.0f})  {b / a:.2f}x  "
              f"rel L2 {err:.4f}", flush=True)


def residual(reps: int) -> None:
    lib = cpu._get_lib()
    default = cpu.INT8_GEMM_MIN_MACS
    cases = [("GEMV", name, 1, N, K) for name, N, K in GEMV_SHAPES[:3]] + \
            [("GEMV", "lm_head", 4, 151936, 1536)] + [("GEMM", name, M, N, K) for name, M, N, K in GEMM_SHAPES[:3]]
    for kind, name, M, N, K in cases:
        q = weight(N, K, 8)
        ws = [q] if kind == "GEMM" else [q] + [weight(N, K, 8) for _ in range(max(1, CYCLE_BYTES // nbytes(q)) - 1)]
        x = mx.random.normal((M, K))
        mx.eval(x)

        def run(on):
            def f():
                lib.vlmc_set_x8_residual(on)
                try:
                    return [np.asarray(cpu.qlinear(x, w, host=True)) for w in ws][0]
                finally:
                    lib.vlmc_set_x8_residual(1)
            return f
        cpu.INT8_GEMM_MIN_MACS = 1 << 62
        exact = np.asarray(cpu.qlinear(x, q, host=True))  # float x (GEMM: dequantize + OpenBLAS; GEMV: see below)
        cpu.INT8_GEMM_MIN_MACS = default
        if kind == "GEMV":
            exact = np.asarray(mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=64,
                                                   bits=8))
        errs = [float(np.linalg.norm(run(on)() - exact) / np.linalg.norm(exact)) for on in (1, 0)]
        a, b = alternate(run(1), run(0), reps)
        print(f"  {kind} {name:8s} M={M:4d} N={N:6d} K={K:4d}: with residual {a / len(ws):7.3f} ms (rel L2 "
              f"{errs[0]:.1e})  one rounding {b / len(ws):7.3f} ms (rel L2 {errs[1]:.1e})  ratio {a / b:.2f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="2,3,5,6", help="code widths (GEMV: 2, 3, 5, 6; GEMM: 2-8)")
    ap.add_argument("--gemm-bits", default="4,5,6,8")
    ap.add_argument("--gemv-rows", default="1,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-residual", action="store_true")
    ap.add_argument("--skip-gemv", action="store_true")
    args = ap.parse_args()
    if not cpu.available():
        sys.exit("the vlmc CPU kernels are not available (no C compiler, or VLMC_CPU_KERNELS=0)")
    lib = cpu._get_lib()
    print(f"int8 x: {cpu.int8_activations()}; codes widened in registers (AVX512-VBMI): "
          f"{bool(lib.vlmc_packed_direct())}; threads: {cpu.n_threads}")
    if not args.skip_gemv:
        print("GEMV, weights as stored vs their load-time copy:")
        for bits in (int(b) for b in args.bits.split(",")):
            gemv(bits, [int(m) for m in args.gemv_rows.split(",")], args.reps)
    if not args.skip_gemm:
        print("GEMM, int8 GEMM vs dequantize + OpenBLAS:")
        for bits in (int(b) for b in args.gemm_bits.split(",")):
            gemm(bits, args.reps)
    if not args.skip_residual and cpu.int8_activations():
        print("8-bit codes, x's rounding residual vs one rounding:")
        residual(args.reps)


if __name__ == "__main__":
    main()
