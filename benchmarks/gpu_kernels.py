"""Time vlmc's GPU kernels (vlmc.kernels.gpu) against the MLX ops they replace.

    python benchmarks/gpu_kernels.py [--json FILE]

Needs MLX with its CUDA or Metal backend. For each kernel and shape: the median time of
the fused kernel and of the reference composition, in microseconds, the speedup, and the
kernel's effective bandwidth (bytes it must move / time). Every result is also checked
against the reference before it is timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmc.kernels import gpu, reference  # noqa: E402


def timed(fn, *args, iters: int = 200) -> float:
    """Median microseconds of fn(*args) over batches of evaluated calls."""
    for _ in range(5):
        mx.eval(fn(*args))
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(iters // 7 + 1)]
        mx.eval(outs)
        samples.append((time.perf_counter() - t0) / len(outs) * 1e6)
    return sorted(samples)[len(samples) // 2]


def bench_add_rms_norm(rows: int, n: int, dtype) -> dict:
    a, b = (mx.random.normal((rows, n)).astype(dtype) for _ in range(2))
    w = mx.ones((n,), dtype)
    h, y = gpu.add_rms_norm(a, b, w, 1e-6)
    rh, ry = reference.add_rms_norm(a, b, w, 1e-6)
    err = float(mx.abs(y.astype(mx.float32) - ry.astype(mx.float32)).max())
    assert mx.array_equal(h, rh), "h differs from the reference"
    fused = timed(gpu.add_rms_norm, a, b, w, 1e-6)
    ref = timed(reference.add_rms_norm, a, b, w, 1e-6)
    moved = (4 * rows * n + n) * a.itemsize  # read a, b, w; write h, y
    return {"kernel": "add_rms_norm", "shape": [rows, n], "dtype": str(dtype).split(".")[-1],
            "max_abs_err_vs_reference": err, "fused_us": round(fused, 2), "reference_us": round(ref, 2),
            "speedup": round(ref / fused, 2), "fused_GBps": round(moved / fused / 1e3, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    be = gpu.backend()
    if be is None:
        sys.exit("error: no MLX GPU backend (CUDA or Metal) on this machine")
    results = []
    for rows, n in ((1, 1536), (16, 1536), (512, 1536), (2048, 1536), (1, 3584), (2048, 3584), (8192, 8192)):
        for dtype in (mx.bfloat16, mx.float32):
            r = bench_add_rms_norm(rows, n, dtype)
            results.append(r)
            print(f"{r['kernel']:13s} {str(r['shape']):14s} {r['dtype']:9s} fused {r['fused_us']:9.2f} us  "
                  f"MLX add+rms_norm {r['reference_us']:9.2f} us  x{r['speedup']:.2f}  "
                  f"{r['fused_GBps']:7.1f} GB/s  err {r['max_abs_err_vs_reference']:.2e}", flush=True)
    if args.json:
        info = {"backend": be, "mlx": mx.__version__, "device": str(mx.default_device()),
                "platform": platform.platform()}
        try:
            info["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
        except Exception:  # older MLX
            pass
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
