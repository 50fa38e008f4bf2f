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

from vlmc.kernels import gpu, kv_quant, reference  # noqa: E402
from vlmc.runtime.kv_cache import make_caches  # noqa: E402


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


def bench_kv_decode(spec: dict, context: int, heads: int = 12, kv_heads: int = 2, dim: int = 128) -> dict:
    """One decode step's attention over a coded cache of ``context`` tokens (Qwen2-VL-2B's
    head layout): the kernel reading codes in place vs its reference (decode, then SDPA)."""
    cache = make_caches([{"index": 0, "kv": spec}], 1, kv_heads, dim, mx.bfloat16)[0]
    for lo in range(0, context, 4096):
        n = min(4096, context - lo)
        cache.append(mx.random.normal((1, kv_heads, n, dim)), mx.random.normal((1, kv_heads, n, dim)))
    q = mx.random.normal((1, heads, dim))
    kb, vb, starts = cache.buffers["k"], cache.buffers["v"], mx.zeros((1,), mx.int32)
    if spec["layout"] == "quantized":
        args = (q, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"], starts, cache.held)
        kw = dict(scale=dim ** -0.5, bits=spec["bits"], group_size=spec["group_size"])
        kernel, ref = gpu.kv_affine_decode, kv_quant.kv_affine_decode
    else:
        kc, vc = cache.codecs["k"], cache.codecs["v"]
        args = (q @ kc.rotation, kb["codes"], kb["norms"], vb["codes"], vb["norms"], kc.codebook, vc.codebook,
                starts, cache.held)
        kw = dict(scale=dim ** -0.5, k_bits=kc.bits, v_bits=vc.bits)
        kernel, ref = gpu.kv_turbo_decode, kv_quant.kv_turbo_decode
    out, expect = kernel(*args, **kw), ref(*args, **kw)
    err = float(mx.abs(out - expect).max() / mx.abs(expect).max())
    t_kernel = timed(lambda: kernel(*args, **kw), iters=50)
    t_ref = timed(lambda: ref(*args, **kw), iters=50)
    stored = sum(a[:, :, :cache.held].nbytes for parts in cache.buffers.values() for a in parts.values())
    return {"kernel": "kv_affine_decode" if spec["layout"] == "quantized" else "kv_turbo_decode", "spec": spec,
            "context": context, "rel_err_vs_reference": err, "kernel_us": round(t_kernel, 1),
            "reference_us": round(t_ref, 1), "speedup": round(t_ref / t_kernel, 2),
            "kv_bytes": stored, "kernel_GBps": round(stored / t_kernel / 1e3, 1)}


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
    for spec in ({"layout": "quantized", "bits": 4, "group_size": 64}, {"layout": "quantized", "bits": 8, "group_size": 64},
                 {"layout": "turboquant", "k_bits": 3, "v_bits": 4}):
        for context in (4096, 32768):
            r = bench_kv_decode(spec, context)
            results.append(r)
            print(f"{r['kernel']:17s} {str(list(spec.values())[1:]):12s} ctx {context:6d} kernel {r['kernel_us']:9.1f} us  "
                  f"reference {r['reference_us']:9.1f} us  x{r['speedup']:.2f}  {r['kernel_GBps']:7.1f} GB/s  "
                  f"err {r['rel_err_vs_reference']:.2e}", flush=True)
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
