"""Whole-model decode at a long context for each KV layout, without prefilling the context.

    python benchmarks/kv_context_decode.py ART [--context 32000] [--steps 8] [--rounds 3]
        [--layouts dense,8,4,tq3.5] [--check-prefill 4096]

A decode step's cost at context C is its weights' read plus every attention layer reading C
cached keys and values in the layout's form; what those keys and values hold does not change
the work. So instead of a C-token prefill (minutes at 32k on two cores, and the prefill is not
what is measured), each layer's cache gets C - 1 columns of random keys and values through
the cache's own ``append`` (coded by the layout's codec, as a prefill's would be), the
sequence skips those columns as a prefix-cache hit would, the last prompt token is prefilled,
and ``--steps`` greedy decode steps are timed (the first after the prefill not counted).
Each layout of each round runs in a process of its own (in one process, a dense 32k cache
allocated after the other layouts' caches had been freed decoded at half its speed), layouts
alternating within each round; medians over rounds, with each round's tok/s and each
layout's ratio to dense in the same round.

``--check-prefill N``: first, for the dense layout at N tokens, the same decode after a real
N-token prefill against the synthetic fill, alternating (3 pairs): the two should agree
within the machine's noise, which is what licenses the shortcut.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from vlmc.bench import synthetic_ids  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402
from vlmc.runtime.step import Sequences  # noqa: E402

LAYOUTS = {"dense": {}, "8": {"kv_bits": 8}, "4": {"kv_bits": 4},
           "tq3.5": {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}}
FILL_CHUNK = 1024


def filled(m, context: int, *, synthetic: bool) -> tuple[Sequences, mx.array]:
    """One sequence whose caches hold ``context`` columns, and its next token."""
    ids = synthetic_ids(m.tokenizer, context, seed=7)
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(Prompt(ids=ids))])
    if synthetic:
        if not all(hasattr(c, "kv_heads") for c in seqs.caches):
            raise SystemExit("kv_context_decode.py fills KV caches; this model has recurrent-state layers "
                             "(linear attention), whose state a random fill would not stand for")
        key = mx.random.key(0)
        for c in seqs.caches:
            heads, dim = c.kv_heads, c.head_dim
            for lo in range(0, context - 1, FILL_CHUNK):
                n = min(FILL_CHUNK, context - 1 - lo)
                key, a, b = mx.random.split(key, 3)
                c.append(mx.random.normal((1, heads, n, dim), key=a), mx.random.normal((1, heads, n, dim), key=b))
                mx.eval(*c.parts("k").values(), *c.parts("v").values())
        seqs.skip(context - 1)
    while not seqs.prefill_done:
        logits = seqs.prefill(512)
    tok = mx.argmax(logits, axis=-1).astype(mx.int32)
    mx.eval(tok)
    return seqs, tok


def decode_rate(seqs: Sequences, tok: mx.array, steps: int) -> float:
    tok = mx.argmax(seqs.decode(tok), axis=-1).astype(mx.int32)   # first step: not counted
    mx.eval(tok)
    t = time.perf_counter()
    for _ in range(steps):
        tok = mx.argmax(seqs.decode(tok), axis=-1).astype(mx.int32)
        mx.eval(tok)
    return steps / (time.perf_counter() - t)


def one(artifact: str, layout: str, context: int, steps: int) -> float:
    seqs, tok = filled(vlmc.load(artifact, **LAYOUTS[layout]), context, synthetic=True)
    return decode_rate(seqs, tok, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default="dense,8,4,tq3.5")
    ap.add_argument("--check-prefill", type=int, default=0, metavar="N")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one layout's measurement, in its own process
    args = ap.parse_args()
    if args.worker:
        print(json.dumps({"tok_s": one(args.artifact, args.worker, args.context, args.steps)}))
        return
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    print(f"load {os.getloadavg()[0]:.2f}; context {args.context}, {args.steps} timed steps", flush=True)

    if args.check_prefill:
        m = vlmc.load(args.artifact)
        real, synth = [], []
        for _ in range(3):
            real.append(decode_rate(*filled(m, args.check_prefill, synthetic=False), args.steps))
            synth.append(decode_rate(*filled(m, args.check_prefill, synthetic=True), args.steps))
            print(f"check at {args.check_prefill}: after a prefill {real[-1]:.2f} tok/s, synthetic fill "
                  f"{synth[-1]:.2f} tok/s", flush=True)
        print(f"check medians: prefill {statistics.median(real):.2f}, synthetic {statistics.median(synth):.2f} "
              f"tok/s", flush=True)
        del m

    def measure(layout: str) -> float:
        cmd = [sys.executable, __file__, args.artifact, "--worker", layout, "--context", str(args.context),
               "--steps", str(args.steps)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"the {layout} measurement failed:\n{run.stderr.strip()[-2000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])["tok_s"]

    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            rates[n].append(measure(n))
        line = ", ".join(f"{n} {rates[n][-1]:.2f}" for n in names)
        ratios = ", ".join(f"{n} {rates[n][-1] / rates['dense'][-1]:.2f}x" for n in names
                           if n != "dense" and "dense" in rates)
        print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): {line} tok/s; vs dense {ratios}", flush=True)
    print("\nmedians (tok/s, x dense):")
    base = statistics.median(rates["dense"]) if "dense" in rates else None
    for n in names:
        med = statistics.median(rates[n])
        per = [rates[n][i] / rates["dense"][i] for i in range(args.rounds)] if base else []
        extra = f"  {med / base:.2f}x (rounds {', '.join(f'{x:.2f}' for x in per)})" if base else ""
        print(f"  {n:>6}: {med:7.2f}{extra}")


if __name__ == "__main__":
    main()
