"""Where a prefill, decode steps and a vision tower spend their time on the cpu target, per op kind.

    python benchmarks/op_profile.py ARTIFACT [--prompt-tokens 128] [--decode-tokens 0] [--image-size 448] [--runs 2]

Every function of ``vlmc.kernels.cpu_ops`` (what the generated code calls, one op at a
time) is wrapped with a wall-clock timer; matmuls are keyed by their shape (M x K -> N),
so each GEMM shape shows its G multiply-adds per second. Then one prompt of
``--prompt-tokens`` text tokens and one ``--image-size`` image request (its vision tower
timed on its own) run ``--runs`` times after a warm-up; per phase the report lists each
op's total milliseconds per run (the last run) and "between ops": the phase's wall time
less its ops' (Python, MLX glue, the generated code's loop). ``--decode-tokens N`` adds
the N greedy decode steps after the prompt (totals over the N steps, from the first
token's yield to the last's). Host arrays make the ops
synchronous, so an op's time is its own (an op handed a lazy MLX array pays for it); an op
that calls others (a fast path running some of the layer's ops) counts only its own time.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from vlmc import api  # noqa: E402
from vlmc.bench import _greedy, synthetic_ids, synthetic_image, time_generation  # noqa: E402
from vlmc.kernels import cpu_ops  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402

_acc: dict = defaultdict(float)
_calls: dict = defaultdict(int)


def _key(name: str, args: tuple) -> tuple:
    if name in ("qlinear", "linear") and args:
        x, w = args[0], args[1]
        K = x.shape[-1]
        M = 1
        for d in x.shape[:-1]:
            M *= int(d)
        N = int(w.shape[0])  # packed codes [N, K bits / 32], or a QuantWeight [N, K]
        return (name, M, K, N)
    return (name,)


_children: list[float] = []  # per open timed call: the time of the timed calls inside it


def _wrap(name: str, fn):
    """fn timed by its own time: a fast path's ops (e.g. the projections of
    ``deltanet_layers``' prompt path) count under their own keys, not under the caller's."""
    def timed(*args, **kwargs):
        _children.append(0.0)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total = time.perf_counter() - t
            inner = _children.pop()
            _acc[_key(name, args)] += total - inner
            _calls[_key(name, args)] += 1
            if _children:
                _children[-1] += total
    return timed


def install() -> None:
    for name in dir(cpu_ops):
        fn = getattr(cpu_ops, name)
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == cpu_ops.__name__:
            setattr(cpu_ops, name, _wrap(name, fn))


def report(title: str, wall: float) -> None:
    ops = sum(_acc.values())
    print(f"\n{title}: {wall * 1e3:.0f} ms wall, ops {ops * 1e3:.0f} ms, between ops {(wall - ops) * 1e3:.0f} ms")
    for k, t in sorted(_acc.items(), key=lambda kv: -kv[1]):
        share = 100 * t / wall
        if k[0] in ("qlinear", "linear"):
            _, M, K, N = k
            g = M * K * N * _calls[k] / t / 1e9
            print(f"  {t * 1e3:8.1f} ms {share:5.1f}%  {k[0]} {M}x{K}->{N} x{_calls[k]}  {g:6.1f} G MAC/s")
        else:
            print(f"  {t * 1e3:8.1f} ms {share:5.1f}%  {k[0]} x{_calls[k]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="Also profile this many decode steps after the prompt (greedy, EOS ignored).")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    vlm = api.load(args.artifact)
    install()
    ids = synthetic_ids(vlm.tokenizer, args.prompt_tokens)
    prompt = Prompt(ids=ids)
    time_generation(vlm, Prompt(ids=ids[:16]), 1)  # warm-up
    for run in range(args.runs):
        _acc.clear()
        _calls.clear()
        t = time.perf_counter()
        time_generation(vlm, prompt, 1)
        wall = time.perf_counter() - t
        if run == args.runs - 1:
            report(f"prefill {args.prompt_tokens} tokens (+1 token)", wall)
    if args.decode_tokens:
        for run in range(args.runs):
            steps = vlm.generate_steps([prompt], _greedy(), args.decode_tokens + 1)
            next(steps)  # the prompt's token: the decode steps start here
            _acc.clear()
            _calls.clear()
            t = time.perf_counter()
            n = sum(1 for _ in steps)
            wall = time.perf_counter() - t
            if run == args.runs - 1:
                report(f"{n} decode steps", wall)
    if args.image_size:
        seen = []
        original = vlm.encode_images
        vlm.encode_images = lambda processed: seen.append(processed) or original(processed)
        time_generation(vlm, vlm.build_prompt("Describe this image.", images=[synthetic_image(args.image_size)]), 1)
        del vlm.encode_images
        processed = seen[0]
        for run in range(args.runs):
            _acc.clear()
            _calls.clear()
            t = time.perf_counter()
            mx.eval(vlm.encode_images(processed))
            wall = time.perf_counter() - t
            if run == args.runs - 1:
                report(f"vision tower, one {args.image_size}x{args.image_size} image", wall)


if __name__ == "__main__":
    main()
