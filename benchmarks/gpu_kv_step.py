"""Where a decode step's time goes with a coded KV cache on the GPU (28 layers of
Qwen2-VL-2B's KV shape, caches filled to a context): appending the new token's codes,
the attention kernel over the codes, and both as ``gpu.cached_attention`` runs them.

    python benchmarks/gpu_kv_step.py [--context 16384] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmc.kernels import gpu  # noqa: E402
from vlmc.runtime.kv_cache import make_caches  # noqa: E402

LAYERS, H, HKV, D = 28, 12, 2, 128


def per_step(fn, steps: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out = {"context": a.context, "backend": gpu.backend()}
    for name, spec in (("affine4", {"layout": "quantized", "bits": 4, "group_size": 64}),
                       ("turbo3.5", {"layout": "turboquant", "k_bits": 3, "v_bits": 4}), ("dense", "dense")):
        caches = make_caches([{"index": i, "kv": spec} for i in range(LAYERS)], 1, HKV, D, mx.bfloat16)
        for c in caches:
            for lo in range(0, a.context, 4096):
                n = min(4096, a.context - lo)
                c.append(mx.random.normal((1, HKV, n, D)), mx.random.normal((1, HKV, n, D)))
            mx.eval([x for parts in c.buffers.values() for x in parts.values()])
        q = mx.random.normal((1, H, 1, D)).astype(mx.bfloat16)
        k = mx.random.normal((1, HKV, 1, D)).astype(mx.bfloat16)

        def append_only():
            for c in caches:
                c.append(k, k)
                c.trim(1)
            mx.eval([x for c in caches for parts in c.buffers.values() for x in parts.values()])

        def attend():
            outs = []
            for c in caches:
                outs.append(gpu.cached_attention(q, k, k, c, None, scale=D ** -0.5))
                c.trim(1)
            mx.eval(outs)

        def attend_eval_each():
            for c in caches:
                mx.eval(gpu.cached_attention(q, k, k, c, None, scale=D ** -0.5))
                c.trim(1)

        def append_eval_each():
            for c in caches:
                c.append(k, k)
                mx.eval([x for parts in c.buffers.values() for x in parts.values()])
                c.trim(1)

        def kernel_eval_each():  # the attention alone, over the cache as it is
            for c in caches:
                if c.layout == "dense":
                    mx.eval(mx.fast.scaled_dot_product_attention(q, *c.update(k[:, :, :0], k[:, :, :0]), scale=0.1))
                    continue
                kb, vb = c.buffers["k"], c.buffers["v"]
                starts = mx.zeros((1,), mx.int32)
                if c.layout == "affine":
                    mx.eval(gpu.kv_affine_decode(q[:, :, 0], kb["codes"], kb["scales"], kb["biases"], vb["codes"],
                                                 vb["scales"], vb["biases"], starts, c.held, scale=0.1,
                                                 bits=c.codecs["k"].bits, group_size=c.codecs["k"].group_size))
                else:
                    mx.eval(gpu.kv_turbo_decode(q[:, :, 0].astype(mx.float32), kb["codes"], kb["norms"], vb["codes"],
                                                vb["norms"], c.codecs["k"].codebook, c.codecs["v"].codebook, starts,
                                                c.held, scale=0.1, k_bits=c.codecs["k"].bits,
                                                v_bits=c.codecs["v"].bits))

        r = {"append_ms": per_step(append_only), "cached_attention_ms": per_step(attend),
             "cached_attention_eval_per_layer_ms": per_step(attend_eval_each),
             "append_eval_per_layer_ms": per_step(append_eval_each),
             "kernel_eval_per_layer_ms": per_step(kernel_eval_each)}
        out[name] = {k2: round(v, 3) for k2, v in r.items()}
        print(name, out[name], flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
