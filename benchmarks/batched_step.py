"""The GEMVs of one whole decode step at 1-16 x rows, against the weight-read floor.

    python benchmarks/batched_step.py ARTIFACT [--rows 1,2,4,8,16] [--reps 7]
                                      [--lib A.so --lib B.so] [--no-int8] [--by-proj]
                                      [--cpu-time] [--amx-ab]

Every projection a decode step of ARTIFACT's text decoder runs (per layer qkv, o, gate_up,
down; then the LM head) is called through ``vlmc_gemv_q`` / ``vlmc_gemv_bf16`` /
``vlmc_gemv_f32`` with M rows of random x: the step's weight bytes are read once per
call, as in decode with M sequences (or M tokens of one sequence in verify). Beside it,
``vlmc_stream_read`` over a buffer of the same size: the time merely reading those bytes
takes (the floor). With several ``--lib`` (shared libraries built from different sources,
e.g. a copy of the cached build of another commit) every measurement alternates between
them in one process, so the machine's load moves all of them alike; the report gives
medians over ``--reps`` rounds and the ratio to the first library. ``--by-proj`` adds the
step's time split by projection (qkv, o, gate_up, down summed over the layers, and the LM
head), each against its share of the read floor (its bytes at the floor's rate).
``--cpu-time`` runs everything on one thread and times it in thread CPU time: what the
kernels cost a core, which other jobs on a loaded machine move far less than wall time.
``--amx-ab`` measures each library twice, with its AMX kernels on for every call of 2+
rows and off (``vlmc_set_amx``; on a machine without AMX both are the VNNI kernels),
alternating like the libraries.
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
                            ("vlmc_stream_read", F, [P, L, I]), ("vlmc_set_int8_x", None, [I]),
                            ("vlmc_set_amx", I, [I])):
        fn = getattr(lib, name, None)
        if fn is None and name == "vlmc_set_amx":  # a library from before the AMX kernels
            continue
        fn.restype, fn.argtypes = res, args
    return lib


def set_amx(lib, on: bool | None) -> None:
    """AMX kernels on for every call of 2+ rows (mode 2) or off, where the library has the
    switch (None: leave as is)."""
    if on is not None and hasattr(lib, "vlmc_set_amx"):
        lib.vlmc_set_amx(2 if on else 0)


PROJ_NAMES = ("qkv", "o", "gate_up", "down")


def step_projections(model) -> tuple[list, list]:
    """The decoder's projections in a decode step's order, as decode_layer's _Proj structs,
    and each one's name (PROJ_NAMES, or "head")."""
    projs, names = [], []
    for weights in model.text_layer_fast:
        _, qkv_w, qkv_b, o_w, o_b, _, gu_w, gu_b, d_w, d_b = weights
        projs += [_proj(qkv_w, qkv_b), _proj(o_w, o_b), _proj(gu_w, gu_b), _proj(d_w, d_b)]
        names += PROJ_NAMES
    head = model.params.get("text.lm_head.weight", model.params.get("text.embed_tokens.weight"))
    projs.append(_proj(head, None))
    names.append("head")
    if any(p is None for p in projs):
        sys.exit("a projection is not one the GEMV kernels read")
    return projs, names


def proj_bytes(p) -> int:
    if p.kind == 2:
        return p.N * p.K * p.bits // 8 + 2 * p.N * (p.K // p.gs) * (2 if p.st == 1 else 4)
    return p.N * p.K * (4 if p.kind == 0 else 2)


def run_step(lib, projs, xs: dict, ys: dict, M: int, threads: int, names=None, split=None,
             clock=time.perf_counter) -> None:
    """One step's GEMVs; with ``split`` (a dict) each call's seconds are added under its name."""
    for i, p in enumerate(projs):
        x, y = xs[p.K], ys[p.N]
        t = clock() if split is not None else 0.0
        if p.kind == 2:
            rc = lib.vlmc_gemv_q(x.ctypes.data, M, p.K, p.w, p.scales, p.biases, p.st, p.N, p.bits, p.gs, p.bias,
                                 y.ctypes.data, threads)
        else:
            fn = lib.vlmc_gemv_f32 if p.kind == 0 else lib.vlmc_gemv_bf16
            rc = fn(x.ctypes.data, M, p.K, p.w, p.N, p.bias, y.ctypes.data, threads)
        if rc:
            raise RuntimeError(f"gemv rejected its arguments ({rc})")
        if split is not None:
            split[names[i]] = split.get(names[i], 0.0) + clock() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lib", action="append", help="kernel libraries to compare (default: the current build)")
    ap.add_argument("--threads", type=int, default=cpu.n_threads)
    ap.add_argument("--no-int8", action="store_true", help="float32 x (vlmc_set_int8_x(0))")
    ap.add_argument("--by-proj", action="store_true", help="also the step's time split by projection")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed in thread CPU time")
    ap.add_argument("--amx-ab", action="store_true", help="each library with its AMX kernels on and off")
    args = ap.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        args.threads = 1
    libs = [open_lib(p) for p in args.lib] if args.lib else [cpu.library()]
    names = args.lib or ["current"]
    amx: list = [None] * len(libs)
    if args.amx_ab:  # each library as two: AMX on, then off
        libs = [lib for lib in libs for _ in (0, 1)]
        names = [f"{Path(n).name} amx {'on' if on else 'off'}" for n in names for on in (1, 0)]
        amx = [True, False] * (len(libs) // 2)
    for lib in libs:
        lib.vlmc_set_int8_x(0 if args.no_int8 else 1)
    amx_in_use = []  # the mode each one runs (0 off, 1 the default's rows, 2 from 2 rows)
    for li, lib in enumerate(libs):
        set_amx(lib, amx[li])
        amx_in_use.append(int(lib.vlmc_amx()) if hasattr(lib, "vlmc_amx") else 0)
    model = load_artifact(args.artifact).model
    projs, pnames = step_projections(model)
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
                set_amx(lib, amx[li])
                t = clock()
                lib.vlmc_stream_read(floor.ctypes.data, floor.size, args.threads)
                t1 = clock()
                split = {} if args.by_proj else None
                run_step(lib, projs, xs, ys, M, args.threads, pnames, split, clock)
                t2 = clock()
                if rep:
                    times.setdefault(("floor", li), []).append(t1 - t)
                    times.setdefault((M, li), []).append(t2 - t1)
                    for name, sec in (split or {}).items():
                        times.setdefault((M, li, name), []).append(sec)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    floor_ms = statistics.median([med[("floor", li)] for li in range(len(libs))])
    print(f"step weights {total / 1e9:.3f} GB in {len(projs)} GEMVs, threads {args.threads}"
          f"{' (thread CPU time)' if args.cpu_time else ''}, "
          f"int8 x {'off' if args.no_int8 else 'on'}, AMX mode {'/'.join(map(str, amx_in_use))}"
          f"; read floor {floor_ms:.1f} ms "
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
    if args.by_proj:
        print_split(med, projs, pnames, rows, names, total, floor_ms)


def print_split(med: dict, projs: list, pnames: list, rows: list, libs: list, total: int, floor_ms: float) -> None:
    """Per projection kind: ms per step (medians), x its floor share, and the library's
    ratio to the first."""
    kinds = [n for n in (*PROJ_NAMES, "head") if n in pnames]
    share = {n: sum(proj_bytes(p) for p, m in zip(projs, pnames) if m == n) / total for n in kinds}
    print("by projection: ms per step, x its share of the read floor" + (", ratio to the first library"
                                                                        if len(libs) > 1 else ""))
    print("rows lib " + "".join(f"{n:>22s}" for n in kinds))
    for M in rows:
        for li in range(len(libs)):
            cells = []
            for n in kinds:
                ms = med[(M, li, n)]
                cell = f"{ms:6.2f} {ms / (floor_ms * share[n]):4.2f}xF"
                if li:
                    cell += f" {ms / med[(M, 0, n)]:4.2f}"
                cells.append(f"{cell:>22s}")
            print(f"{M:4d} {li:3d} " + "".join(cells))


if __name__ == "__main__":
    main()
