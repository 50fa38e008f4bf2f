"""What checking n draft tokens costs: a compiled artifact's ``verify`` entry point at n
tokens per sequence against one ``decode`` step, after a prefill.

    python benchmarks/verify_step.py ARTIFACT [--tokens 1,2,3,4,5,6,7,8] [--batch 1]
                                     [--reps 7] [--prompt-words 40]

Each measurement runs the step and then ``trim``s its tokens again, so every step sees the
same cache length; the steps alternate (decode, then verify at each n, round after round)
so that the machine's load moves them alike. Prints the median ms per step, the ratio to
the decode step, and whether the one-call path (decode_layers) took each n. To compare
two source trees, run this script from each (PYTHONPATH) in alternation.
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

import vlmc  # noqa: E402
from vlmc.kernels import cpu_ops  # noqa: E402
from vlmc.runtime.step import Sequences  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--tokens", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-words", type=int, default=40)
    args = ap.parse_args()
    m = vlmc.load(args.artifact)
    words = " ".join(["the quick brown fox jumps over a lazy dog"] * (args.prompt_words // 9 + 1)).split()
    prompts = [m.build_prompt(" ".join(words[:args.prompt_words - 3 * b])) for b in range(args.batch)]
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p) for p in prompts])
    mx.eval(seqs.prefill())
    tokens = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    draft = mx.array(rng.integers(100, 1000, (args.batch, max(tokens))), mx.int32)
    took: dict[int, bool] = {}
    real = cpu_ops._decode_layers

    def watched(x, *a, **k):
        out = real(x, *a, **k)
        took[x.shape[1]] = out is not None
        return out
    cpu_ops._decode_layers = watched
    times: dict[str, list[float]] = {}
    for rep in range(args.reps + 1):  # round 0 warms up
        t = time.perf_counter()
        mx.eval(seqs.decode(draft[:, 0]))
        dt = time.perf_counter() - t
        seqs.trim(1)
        if rep:
            times.setdefault("decode", []).append(dt)
        for n in tokens:
            t = time.perf_counter()
            mx.eval(seqs.verify(draft[:, :n]))
            dt = time.perf_counter() - t
            seqs.trim(n)
            if rep:
                times.setdefault(n, []).append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{Path(args.artifact).name}: batch {args.batch}, {seqs.offset} columns held, medians of {args.reps}")
    print(f"  decode step       {med['decode']:8.1f} ms  1.00x")
    for n in tokens:
        print(f"  verify n={n:<2d}       {med[n]:8.1f} ms  {med[n] / med['decode']:4.2f}x  "
              f"({med[n] / n:6.1f} ms/token; one-call path: {'yes' if took.get(n) else 'no'})")


if __name__ == "__main__":
    main()
