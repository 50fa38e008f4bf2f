"""What the thread pool's handoff costs a decode-sized kernel call, quiet and under load.

Times, per call, a q4 (group 64, bf16 scales) GEMV of one row at two sizes (2048 -> 1024:
a MoE layer's shared gate_up, ~1.2 MB; 2048 -> 8192, ~9.4 MB) and the fused routed
experts of one token (``vlmc_moe_experts``: 8 of 256 experts of Qwen3.5-35B-A3B's shapes,
~14 MB, random experts per call), on 2 threads and on 1, for this tree's kernels and, with
``--baseline-lib``, another build of them (e.g. the main branch's shared library: the
same calls through its pool), alternating the libraries call set by call set. ``--busy N``
runs N busy-looping processes alongside (what a loaded machine does to the pool: a worker
descheduled for a time slice). Medians over the rounds.

    python benchmarks/pool_handoff.py [--rounds 7] [--busy 0] [--baseline-lib PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from vlmc.kernels import cpu  # noqa: E402
from vlmc.kernels.cpu import moe as cm  # noqa: E402
from vlmc.kernels.cpu.bindings import SIGNATURES  # noqa: E402
from moe_experts import E, H, I, K, quantized  # noqa: E402


def gemv_case(N: int, seed: int):
    c, s, b = mx.quantize(mx.random.normal((N, H), key=mx.random.key(seed)) * 0.02, group_size=64, bits=4)
    w = (c, s.astype(mx.bfloat16), b.astype(mx.bfloat16))
    mx.eval(*w)
    plan = cpu.qplan(*w, 4, 64, "affine")
    wh, sh, bh, st = plan[8], plan[9], plan[10], plan[11]
    x = np.random.default_rng(seed).standard_normal((1, H)).astype(np.float32)
    y = np.empty((1, N), np.float32)

    def call(lib, nth):
        return lib.vlmc_gemv_q(x.ctypes.data, 1, H, wh.ptr, sh.ptr, bh.ptr, st, N, 4, 64, None, y.ctypes.data, nth)
    return call, (w, x, y)


def experts_case():
    gate_up, down = quantized((E, 2 * I, H), 1), quantized((E, H, I), 2)
    plan = cm._plan(gate_up, down, "silu")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, H)).astype(np.float32)
    wts = np.full((1, K), 1.0 / K, np.float32)
    out = np.empty((1, H), np.float32)

    def call(lib, nth):
        idx = rng.choice(E, K, replace=False).astype(np.int32).reshape(1, K)
        return lib.vlmc_moe_experts(ctypes.addressof(plan), x.ctypes.data, 1, K, idx.ctypes.data, wts.ctypes.data,
                                    out.ctypes.data, nth)
    return call, (gate_up, down, plan, x, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes run alongside")
    ap.add_argument("--baseline-lib", type=Path, help="another build of the kernels to compare with")
    a = ap.parse_args()
    libs = {"this tree": cpu._get_lib()}
    if a.baseline_lib:
        base = ctypes.CDLL(str(a.baseline_lib))
        for name in ("vlmc_gemv_q", "vlmc_moe_experts"):  # the two it calls (it may export fewer)
            getattr(base, name).restype, getattr(base, name).argtypes = SIGNATURES[name]
        libs["baseline"] = base
    cases = {"gemv q4 2048->1024": (gemv_case(1024, 11), 200), "gemv q4 2048->8192": (gemv_case(8192, 12), 50),
             "moe_experts 8 of 256": (experts_case(), 30)}
    for (call, _), _n in cases.values():  # warm: threads started, weights touched
        for lib in libs.values():
            for nth in (1, 2):
                for _ in range(3):
                    assert call(lib, nth) == 0
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    times: dict[tuple, list[float]] = {}
    try:
        time.sleep(0.5 if busy else 0)
        for _ in range(a.rounds):
            for case, ((call, _), n) in cases.items():
                for name, lib in libs.items():
                    for nth in (2, 1):
                        t = time.perf_counter()
                        for _ in range(n):
                            call(lib, nth)
                        times.setdefault((case, name, nth), []).append((time.perf_counter() - t) / n * 1e6)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"busy processes alongside: {a.busy}; {a.rounds} rounds; median us per call [min .. max]")
    for (case, name, nth), v in times.items():
        print(f"{case:22s} {name:10s} {nth} thread{'s' if nth > 1 else ' '} {statistics.median(v):9.1f}"
              f"   [{min(v):.1f} .. {max(v):.1f}]")


if __name__ == "__main__":
    main()
