"""The GEMVs of one whole decode step at 1-16 x rows, against the weight-read floor.

    python benchmarks/batched_step.py ARTIFACT [--rows 1,2,4,8,16] [--reps 7]
                                      [--lib A.so --lib B.so] [--no-int8]

Every projection a decode step of ARTIFACT's text decoder runs (per layer qkv, o, gate_up,
down; then the LM head) is called through ``vlmc_gemv_q`` / ``vlmc_gemv_bf16`` /
``vlmc_gemv_f32`` with M rows of random x: the step's weight bytes are read once per
call, as in decode with M sequences (or M tokens of one sequence in verify). Beside it,
``vlmc_stream_read`` over a buffer of the same size: the time merely reading those bytes
takes (the floor). With several ``--lib`` (shared libraries built from different sources,
e.g. a copy of the cached build of another commit) every measurement alternates between
them in one process, so the machine's load moves all of them alike; the report gives
medians over ``--reps`` rounds and the ratio to the first library.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from vlmc.kernels import cpu  # noqa: E402
from vlmc.kernels.cpu.decode_layer import _proj  # noqa: E402
from vlmc.runtime.artifact import load_artifact  # noqa: E402

P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


def open_lib(path: str) -> ctypes.CDLL:
    """A kernel library of any ABI number, with the few functions used here declared."""
    lib = ctypes.CDLL(str(Path(path).resolve()))
    for name, res, args in (("vlmc_gemv_q", I, [P, I, I, P, P, P, I, I, I, I, P, P, I]),
                            ("vlmc_gemv_bf16", I, [P, I, I, P, I, P, P, I]),
                            ("vlmc_gemv_f32", I, [P, I, I, P, I, P, P, I]),
                            ("vlmc_stream_read", F, [P, L, I]), ("vlmc_set_int8_x", None, [I])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def step_projections(model) -> list:
    """The decoder's projections in a decode step's order, as decode_layer's _Proj structs."""
    projs = []
    for weights in model.text_layer_fast:
        _, qkv_w, qkv_b, o_w, o_b, _, gu_w, gu_b, d_w, d_b = weights
        projs += [_proj(qkv_w, qkv_b), _proj(o_w, o_b), _proj(gu_w, gu_b), _proj(d_w, d_b)]
    head = model.params.get("text.lm_head.weight", model.params.get("text.embed_tokens.weight"))
    projs.append(_proj(head, None))
    if any(p is None for p in projs):
        sys.exit("a projection is not one the GEMV kernels read")
    return projs


def proj_bytes(p) -> int:
    if p.kind == 2:
        return p.N * p.K * p.bits // 8 + 2 * p.N * (p.K // p.gs) * (2 if p.st == 1 else 4)
    return p.N * p.K * (4 if p.kind == 0 else 2)


def run_step(lib, projs, xs: dict, ys: dict, M: int, threads: int) -> None:
    for p in projs:
        x, y = xs[p.K], ys[p.N]
        if p.kind == 2:
            rc = lib.vlmc_gemv_q(x.ctypes.data, M, p.K, p.w, p.scales, p.biases, p.st, p.N, p.bits, p.gs, p.bias,
                                 y.ctypes.data, threads)
        else:
            fn = lib.vlmc_gemv_f32 if p.kind == 0 else lib.vlmc_gemv_bf16
            rc = fn(x.ctypes.data, M, p.K, p.w, p.N, p.bias, y.ctypes.data, threads)
        if rc:
            raise RuntimeError(f"gemv rejected its arguments ({rc})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lib", action="append", help="kernel libraries to compare (default: the current build)")
    ap.add_argument("--threads", type=int, default=cpu.n_threads)
    ap.add_argument("--no-int8", action="store_true", help="float32 x (vlmc_set_int8_x(0))")
    args = ap.parse_args()
    libs = [open_lib(p) for p in args.lib] if args.lib else [cpu.library()]
    names = args.lib or ["current"]
    for lib in libs:
        lib.vlmc_set_int8_x(0 if args.no_int8 else 1)
    model = load_artifact(args.artifact).model
    projs = step_projections(model)
    total = sum(proj_bytes(p) for p in projs)
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    mx.eval(*model.params.values())
    floor = np.ones(total // 4, np.float32)
    xs = {K: rng.standard_normal((max(rows), K)).astype(np.float32) for K in {p.K for p in projs}}
    ys = {N: np.empty((max(rows), N), np.float32) for N in {p.N for p in projs}}
    times: dict = {}
    for rep in range(args.reps + 1):  # round 0 warms up
        for M in rows:
            for li, lib in enumerate(libs):
                t = time.perf_counter()
                lib.vlmc_stream_read(floor.ctypes.data, floor.size, args.threads)
                t1 = time.perf_counter()
                run_step(lib, projs, xs, ys, M, args.threads)
                t2 = time.perf_counter()
                if rep:
                    times.setdefault(("floor", li), []).append(t1 - t)
                    times.setdefault((M, li), []).append(t2 - t1)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    floor_ms = statistics.median([med[("floor", li)] for li in range(len(libs))])
    print(f"step weights {total / 1e9:.3f} GB in {len(projs)} GEMVs, threads {args.threads}, "
          f"int8 x {'off' if args.no_int8 else 'on'}; read floor {floor_ms:.1f} ms "
          f"({total / floor_ms / 1e6:.1f} GB/s), medians of {args.reps}")
    head = "rows " + "".join(f"{Path(n).name:>26s}" for n in names)
    print(head)
    for M in rows:
        cells = []
        for li in range(len(libs)):
            ms = med[(M, li)]
            cell = f"{ms:7.1f} ms {ms / med[(1, li)] if (1, li) in med else 0:4.2f}x1 {ms / floor_ms:4.2f}xF"
            if li:
                cell += f" {ms / med[(M, 0)]:4.2f}"
            cells.append(f"{cell:>26s}")
        print(f"{M:4d} " + "".join(cells))


if __name__ == "__main__":
    main()
