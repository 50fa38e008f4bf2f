"""Where a batched decode step's time goes: B sequences stepped as the batching loop steps
them, each phase timed, beside the same step's GEMVs alone.

    python benchmarks/step_phases.py ART[,ART2 ...] [--batch 1,8] [--steps 12] [--rounds 3]
                                     [--cpu-time]

For each artifact and batch size B: B prompts of 32 random ids are prefilled together,
then ``--steps`` decode steps run through ``Sequences.decode`` and the ``Batcher``'s own
``_sample`` (greedy, EOS held back as ``min_tokens`` does), the first step not counted.
Each step's time is split by wrapping the entry points of the cpu op library that the
generated ``decode`` calls (``qembedding``, ``rope_freqs``, ``decode_layers``: the decoder
stack in one C call, ``rms_norm``, ``qlinear``: the LM head, ``result``: the logits into
MLX), the C call itself ("C call": the stack without its Python), the step's mask and the
sampling. "GEMVs" is the step's projections alone (``batched_step.py``'s ``run_step``:
every layer's and the head's, B rows, one ctypes call each) right after. Artifacts and
batch sizes alternate within each round; medians over the rounds. ``--cpu-time``: one
kernel thread (``VLMC_CPU_THREADS=1`` is set here) timed in thread CPU time, which a
loaded machine moves far less than wall time (sampling's MLX ops run on MLX's own thread
and are missed there). Last, the sampling alone: each B's greedy picks as ``_sample``
makes them against MLX's argmax per row (what each row's own sampler computes),
alternating, on one artifact's logits.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OPS = ("qembedding", "rope_freqs", "decode_layers", "rms_norm", "qlinear", "result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", help="one artifact, or several separated by commas (alternated)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true")
    args = ap.parse_args()
    if args.cpu_time:
        os.environ["VLMC_CPU_THREADS"] = "1"
    clock = time.thread_time if args.cpu_time else time.perf_counter

    import mlx.core as mx
    import numpy as np

    import batched_step
    import vlmc
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.kernels.cpu import decode_layer
    from vlmc.runtime import batcher, step
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.sampling import SamplingParams

    spent: dict[str, float] = collections.defaultdict(float)
    timing = [False]

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = clock()
            out = fn(*a, **k)
            if timing[0]:
                spent[label] += clock() - t
            return out
        setattr(owner, name, timed)

    for name in OPS:
        wrap(cpu_ops, name, name)
    lib = decode_layer._get_lib()
    wrap(lib, "vlmc_decode_layers", "C call")
    wrap(step.Sequences, "_mask", "mask")
    wrap(batcher.Batcher, "_sample", "sampling")

    paths = args.artifacts.split(",")
    models = [vlmc.load(p) for p in paths]
    sizes = [int(b) for b in args.batch.split(",")]
    rng = random.Random(0)
    steps: dict = collections.defaultdict(list)
    phases: dict = collections.defaultdict(list)
    for r in range(args.rounds):
        for mi, model in enumerate(models):
            projs, _ = batched_step.step_projections(model.model)
            xs = {K: np.random.default_rng(0).standard_normal((max(sizes), K)).astype(np.float32)
                  for K in {p.K for p in projs}}
            ys = {N: np.empty((max(sizes), N), np.float32) for N in {p.N for p in projs}}
            vocab = model.tokenizer.vocab_size
            loop = batcher.Batcher(model, max_batch=max(sizes))
            loop.shutdown()  # only its sampling is used, on this thread
            for B in sizes:
                ids = [[rng.randrange(vocab // 4, vocab * 3 // 4) for _ in range(32)] for _ in range(B)]
                seqs = step.Sequences.start(model.decoder, [model.prompt_inputs(Prompt(ids=i)) for i in ids])
                while not seqs.prefill_done:
                    logits = seqs.prefill(512)
                mx.eval(logits)
                rows = [batcher._Row(batcher.Job(Prompt(ids=i), lambda ev: None, SamplingParams(), max_tokens=10 ** 4,
                                                 min_tokens=10 ** 4), model, 10 ** 5) for i in ids]
                tokens, _ = loop._sample(rows, logits)
                spent.clear()
                times = []
                for s in range(args.steps + 1):
                    timing[0] = s > 0
                    t = clock()
                    logits = seqs.decode(mx.array(tokens, dtype=mx.int32))
                    tokens, _ = loop._sample(rows, logits)
                    if s:
                        times.append(clock() - t)
                timing[0] = False
                t = clock()
                for _ in range(3):
                    batched_step.run_step(lib, projs, xs, ys, B, cpu.n_threads)
                gemvs = (clock() - t) / 3
                steps[(mi, B)].append((statistics.median(times), gemvs))
                for k, v in spent.items():
                    phases[(mi, B, k)].append(v / args.steps)
                print(f"round {r + 1} {Path(paths[mi]).name} B={B:2d}: step {statistics.median(times) * 1e3:7.2f} ms, "
                      f"GEMVs alone {gemvs * 1e3:7.2f} ms  load {os.getloadavg()[0]:.2f}", flush=True)
    clock_note = " (thread CPU time, one thread)" if args.cpu_time else ""
    print(f"\nmedians of {args.rounds} round(s), ms per step{clock_note}")
    labels = ["C call", *OPS, "mask", "sampling"]
    print(f"{'artifact':>24s} {'B':>3s} {'step':>7s} {'GEMVs':>7s} {'tok/s':>7s} "
          + " ".join(f"{k[:13]:>13s}" for k in labels))
    for (mi, B), rows in sorted(steps.items()):
        st, g = (statistics.median(x[i] for x in rows) * 1e3 for i in (0, 1))
        cells = " ".join(f"{statistics.median(phases.get((mi, B, k), [0])) * 1e3:13.3f}" for k in labels)
        print(f"{Path(paths[mi]).name[-24:]:>24s} {B:3d} {st:7.2f} {g:7.2f} {B / st * 1e3:7.2f} {cells}")
    print("\ngreedy picks alone (wall ms, medians of 20): Batcher._sample | MLX argmax per row")
    for B in sizes:
        rows = [batcher._Row(batcher.Job(Prompt(ids=[1]), lambda ev: None, SamplingParams(), max_tokens=10 ** 4,
                                         min_tokens=10 ** 4), models[0], 10 ** 5) for _ in range(B)]
        logits = mx.array(np.random.default_rng(B).standard_normal((B, projs[-1].N)).astype(np.float32))  # N: vocab
        mx.eval(logits)

        def per_row(rows=rows, logits=logits) -> None:
            mx.eval(mx.concatenate([r.sampler(loop._masked(r, logits[i:i + 1])) for i, r in enumerate(rows)]))
        took: dict[str, list[float]] = {"host": [], "mlx": []}
        for _ in range(20):
            for name, fn in (("host", lambda rows=rows, logits=logits: loop._sample(rows, logits)), ("mlx", per_row)):
                t = time.perf_counter()
                fn()
                took[name].append(time.perf_counter() - t)
        print(f"B={B:2d}: {statistics.median(took['host']) * 1e3:7.3f} | {statistics.median(took['mlx']) * 1e3:7.3f}")


if __name__ == "__main__":
    main()
