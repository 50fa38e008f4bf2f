"""The host path's vision costs: buffer reuse on and off, and the attention kernels.

    python benchmarks/vision_host.py tower ARTIFACT [--tiles 17] [--size 512] [--rounds 2] [--compare pool]
    python benchmarks/vision_host.py attention [--shape 2,12,1024,1024,64] [--rounds 5]
    python benchmarks/vision_host.py tower-attention ARTIFACT [--tiles 1] [--size 896] [--rounds 2]
    python benchmarks/vision_host.py towers ARTIFACT [ARTIFACT ...] [--tiles 1] [--size 896] [--rounds 3]

``tower``: one ``vision_encode`` of TILES random tiles (a fixed-resolution tower's input,
e.g. SmolVLM's 512x512 tiles), in a fresh process per measurement, alternating
``VLMC_HOST_POOL_MB=0`` (every large op result a fresh allocation) with the default pool;
prints wall, user and system CPU seconds and minor page faults of the encode (after one
one-tile warm-up). ``--compare kernels`` alternates instead the attention kernels of
unmasked long blocks: the rows kernel (the lanes kernel declined) against the lanes kernel.
``attention``: ``cpu.attention`` on random q, k, v of shape (B, H, L, S, D), the lanes
kernel, the rows kernel and the BLAS path (the kernels declined), alternating in one
process; ms per (sequence, head), medians. ``tower-attention``: one process, one warm-up
encode, then per round the tower with each attention path in turn: the rows kernel in
float32, the lanes kernel in float32, and the artifact as compiled (a quantized tower's
attention allows bfloat16 products: the lanes kernel's vdpbf16ps path); wall and
process CPU seconds (user + system, both cores), medians. ``towers``: the same encode of
the same random pixels through several artifacts of one model (e.g. compiled by two
versions), all loaded in one process and taken in turn each round; wall and process CPU
seconds, medians, and each artifact's ratio to the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vlmc  # noqa: E402,F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before numpy loads)


def encode_once(artifact: str, tiles: int, size: int, config: str) -> dict:
    import mlx.core as mx
    if config == "rows kernel":
        from vlmc.kernels.cpu import attention as A
        A.LANES_MIN_KEYS = 1 << 62
    import inspect
    m = vlmc.load(artifact)
    pix = mx.random.normal((tiles, 3, size, size))
    # towers with learned positions (SigLIP) take pixels only; others also patch positions
    extra = (mx.arange((size // 16) ** 2, dtype=mx.int32),) \
        if len(inspect.signature(m.model.vision_encode).parameters) > 1 else ()
    mx.eval(m.model.vision_encode(pix[:1], *extra))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    mx.eval(m.model.vision_encode(pix, *extra))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - t0, "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt}


def tower(args) -> None:
    labels = ["pool off", "pool on"] if args.compare == "pool" else ["rows kernel", "lanes kernel"]
    rows: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in rows:
            env = dict(os.environ)
            if label == "pool off":
                env["VLMC_HOST_POOL_MB"] = "0"
            else:
                env.pop("VLMC_HOST_POOL_MB", None)
            out = subprocess.run([sys.executable, __file__, "_encode", args.artifact, str(args.tiles), str(args.size),
                                  label],
                                 env=env, capture_output=True, text=True, check=True)
            rows[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {label}: {rows[label][-1]}  load {os.getloadavg()[0]:.2f}", flush=True)
    for label, runs in rows.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(f"{label}: wall {med['wall_s']:.2f} s, user {med['user_s']:.2f} s, system {med['sys_s']:.2f} s, "
              f"minor faults {med['minflt']:.0f}")


def attention(args) -> None:
    import numpy as np
    from vlmc.kernels.cpu import attention as A
    B, H, L, S, D = (int(x) for x in args.shape.split(","))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, H, S, D), dtype=np.float32) for _ in range(2))
    fused, lanes_min = A._fused, A.LANES_MIN_KEYS
    times: dict[str, list[float]] = {"lanes kernel": [], "rows kernel": [], "BLAS": []}
    for _ in range(args.rounds):
        for label in times:
            A._fused = (lambda *a: False) if label == "BLAS" else fused
            A.LANES_MIN_KEYS = 1 << 62 if label == "rows kernel" else lanes_min
            t = time.perf_counter()
            A.attention(q, k, v, None, scale=D ** -0.5, host=True)
            times[label].append((time.perf_counter() - t) * 1e3 / (B * H))
    A._fused, A.LANES_MIN_KEYS = fused, lanes_min
    for label, ts in times.items():
        print(f"{label}: {statistics.median(ts):.2f} ms per (sequence, head)  (B, H, L, S, D) = {(B, H, L, S, D)}")


def tower_attention(args) -> None:
    import mlx.core as mx
    from vlmc.kernels import cpu_ops
    from vlmc.kernels.cpu import attention as A
    import inspect
    m = vlmc.load(args.artifact)
    pix = mx.random.normal((args.tiles, 3, args.size, args.size))
    extra = (mx.arange((args.size // 16) ** 2, dtype=mx.int32),) \
        if len(inspect.signature(m.model.vision_encode).parameters) > 1 else ()
    mx.eval(m.model.vision_encode(pix, *extra))
    real_attention, lanes_min = cpu_ops._blas_attention, A.LANES_MIN_KEYS
    configs = ["rows kernel, float32", "lanes kernel, float32", "as compiled"]
    rows: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            A.LANES_MIN_KEYS = 1 << 62 if c.startswith("rows") else lanes_min
            cpu_ops._blas_attention = real_attention if c == "as compiled" else \
                (lambda *a, bf16=False, **kw: real_attention(*a, **kw))
            t, u = time.perf_counter(), time.process_time()
            mx.eval(m.model.vision_encode(pix, *extra))
            rows[c].append((time.perf_counter() - t, time.process_time() - u))
            print(f"round {r + 1} {c}: wall {rows[c][-1][0]:.2f} s, CPU {rows[c][-1][1]:.2f} s  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    cpu_ops._blas_attention, A.LANES_MIN_KEYS = real_attention, lanes_min
    for c, runs in rows.items():
        print(f"{c}: wall {statistics.median(w for w, _ in runs):.2f} s, "
              f"CPU {statistics.median(u for _, u in runs):.2f} s (medians of {len(runs)})")


def towers(args) -> None:
    import mlx.core as mx
    import inspect
    models = [vlmc.load(a) for a in args.artifacts]
    pix = mx.random.normal((args.tiles, 3, args.size, args.size))
    extra = (mx.arange((args.size // 16) ** 2, dtype=mx.int32),) \
        if len(inspect.signature(models[0].model.vision_encode).parameters) > 1 else ()
    for m in models:  # warm-up: kernel plans, host buffers
        mx.eval(m.model.vision_encode(pix[:1], *extra))
    runs: list[list[tuple[float, float]]] = [[] for _ in models]
    for r in range(args.rounds):
        for i, m in enumerate(models):
            t, u = time.perf_counter(), time.process_time()
            mx.eval(m.model.vision_encode(pix, *extra))
            runs[i].append((time.perf_counter() - t, time.process_time() - u))
            print(f"round {r + 1} {args.artifacts[i]}: wall {runs[i][-1][0]:.2f} s, CPU {runs[i][-1][1]:.2f} s  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    base = None
    for a, rs in zip(args.artifacts, runs):
        wall, cpu = statistics.median(w for w, _ in rs), statistics.median(u for _, u in rs)
        base = base or (wall, cpu)
        print(f"{a}: wall {wall:.2f} s ({wall / base[0]:.2f}x), CPU {cpu:.2f} s ({cpu / base[1]:.2f}x) "
              f"(medians of {len(rs)})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_encode":
        print(json.dumps(encode_once(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tower")
    t.add_argument("artifact")
    t.add_argument("--tiles", type=int, default=17)
    t.add_argument("--size", type=int, default=512)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--compare", choices=["pool", "kernels"], default="pool")
    a = sub.add_parser("attention")
    a.add_argument("--shape", default="2,12,1024,1024,64")
    a.add_argument("--rounds", type=int, default=5)
    ta = sub.add_parser("tower-attention")
    ta.add_argument("artifact")
    ta.add_argument("--tiles", type=int, default=1)
    ta.add_argument("--size", type=int, default=896)
    ta.add_argument("--rounds", type=int, default=2)
    tw = sub.add_parser("towers")
    tw.add_argument("artifacts", nargs="+")
    tw.add_argument("--tiles", type=int, default=1)
    tw.add_argument("--size", type=int, default=896)
    tw.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    {"tower": tower, "attention": attention, "tower-attention": tower_attention, "towers": towers}[args.what](args)


if __name__ == "__main__":
    main()
