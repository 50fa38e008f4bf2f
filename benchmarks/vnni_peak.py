"""The int8 dot-product rate one core sustains: the ceiling of the GEMVs' and the GEMM's dots.

    python benchmarks/vnni_peak.py [--seconds 1.5]

Compiles a small C program (``cc -O3 -march=native``; AVX-512 VNNI needed) and runs it on
one core. It times ``vpdpbusd`` on 512-bit registers (64 int8 multiply-adds each):

- ``registers, C chains``: C independent accumulators, all operands in registers: the
  instruction's throughput once C covers its latency;
- ``panel loop, {1to16} operand``: the shape of the 4-bit panel GEMV's inner loop
  (``gemv.c`` qp4_dots at 8 x rows: 8 transposed code registers split into nibbles, each
  met by 4 bytes of every x row) with the x bytes as the instruction's broadcast memory
  operand, as the kernel has them;
- ``panel loop, vpbroadcastd``: the same with a separate broadcast into a register.

Prints G instructions and G multiply-adds per second. A decode step's dots need
(multiply-adds per token x rows) / 64 instructions: the time they take at this rate is
the floor of a batched step's GEMVs once memory stops being the bound.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
typedef int32_t __attribute__((may_alias, aligned(1))) i32a;
static int8_t X[8 * 1536] __attribute__((aligned(64)));
static double secs;

#define REG(C)                                                                              \
static void reg_##C(void) {                                                                 \
    __m512i a[C], w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);                         \
    for (int i = 0; i < C; i++) a[i] = _mm512_set1_epi32(i);                                \
    long n = 0; double t0 = now();                                                          \
    while (now() - t0 < secs) {                                                             \
        for (int r = 0; r < 4096; r++) {                                                    \
            _Pragma("GCC unroll 16") for (int i = 0; i < C; i++) a[i] = _mm512_dpbusd_epi32(a[i], w, x); \
            __asm__ volatile("" : "+v"(w), "+v"(x));                                        \
        }                                                                                   \
        n += 4096L * C;                                                                     \
    }                                                                                       \
    double dt = now() - t0; __m512i s = a[0];                                               \
    for (int i = 1; i < C; i++) s = _mm512_add_epi32(s, a[i]);                              \
    printf("registers, %2d chains        %6.3f G/s  %6.1f G MAC/s  (%d)\n", C, n / dt / 1e9, 64 * n / dt / 1e9, \
           _mm512_reduce_add_epi32(s) & 1);                                                 \
}
REG(2) REG(4) REG(8) REG(12)

static inline __attribute__((always_inline)) __m512i dp_mem(__m512i acc, __m512i q, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*(const i32a *)p));
    return acc;
}
static inline __attribute__((always_inline)) __m512i dp_reg(__m512i acc, __m512i q, const int8_t *p) {
    __m512i b;
    __asm__("vpbroadcastd %1, %0" : "=v"(b) : "m"(*(const i32a *)p));
    return _mm512_dpbusd_epi32(acc, q, b);
}
#define PANEL(NAME, DP, LABEL)                                                              \
static void NAME(void) {                                                                    \
    const int K = 1536; const __m512i m4 = _mm512_set1_epi8(0x0F);                          \
    __m512i V[8], a[8];                                                                     \
    for (int e = 0; e < 8; e++) V[e] = _mm512_set1_epi32(0x01020304 * (e + 1));             \
    for (int t = 0; t < 8; t++) a[t] = _mm512_setzero_si512();                              \
    long n = 0; double t0 = now();                                                          \
    while (now() - t0 < secs) {                                                             \
        for (int b = 0; b < K / 64; b++) {                                                  \
            const int8_t *x = X + 64 * b;                                                   \
            _Pragma("GCC unroll 8") for (int e = 0; e < 8; e++) {                           \
                const __m512i lo = _mm512_and_si512(V[e], m4), hi = _mm512_and_si512(_mm512_srli_epi16(V[e], 4), m4); \
                _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++) {                       \
                    a[t] = DP(a[t], lo, x + (size_t)t * K + 8 * e);                         \
                    a[t] = DP(a[t], hi, x + (size_t)t * K + 8 * e + 4);                     \
                }                                                                           \
            }                                                                               \
            __asm__ volatile("" : "+v"(V[0]), "+v"(V[1]), "+v"(V[2]), "+v"(V[3]), "+v"(V[4]), "+v"(V[5]), \
                             "+v"(V[6]), "+v"(V[7]));                                        \
        }                                                                                   \
        n += 128L * (K / 64);                                                               \
    }                                                                                       \
    double dt = now() - t0; __m512i s = a[0];                                               \
    for (int i = 1; i < 8; i++) s = _mm512_add_epi32(s, a[i]);                              \
    printf("%-28s %6.3f G/s  %6.1f G MAC/s  (%d)\n", LABEL, n / dt / 1e9, 64 * n / dt / 1e9, \
           _mm512_reduce_add_epi32(s) & 1);                                                 \
}
PANEL(panel_mem, dp_mem, "panel loop, {1to16} operand")
PANEL(panel_reg, dp_reg, "panel loop, vpbroadcastd")

int main(int argc, char **argv) {
    secs = argc > 1 ? atof(argv[1]) : 1.5;
    for (int i = 0; i < (int)sizeof X; i++) X[i] = (int8_t)(i * 7);
    reg_2(); reg_4(); reg_8(); reg_12(); panel_mem(); panel_reg();
    return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    args = p.parse_args()
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("no C compiler found (cc, gcc or clang)")
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "vnni.c", Path(d) / "vnni"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O3", "-march=native", str(src), "-o", str(exe)], check=True)
        subprocess.run(["taskset", "-c", "0", str(exe), str(args.seconds)] if shutil.which("taskset")
                       else [str(exe), str(args.seconds)], check=True)


if __name__ == "__main__":
    main()
