"""Aggregate decode throughput of the continuous-batching loop at several batch sizes.

    python benchmarks/batched_decode.py ARTIFACT [--batch 1,8,16] [--prompt-tokens 32]
                                        [--decode-tokens 48] [--rounds 2]

B requests of ``prompt-tokens`` random ordinary ids are submitted at once to the loop that
``batch_generate`` and ``vlmc serve`` run (``compare.py``'s batched run: each request
exactly ``decode-tokens`` + 1 greedy tokens, EOS masked). "decode tok/s" counts the tokens
emitted after the last request's first token over the time they took: B sequences decoding
together. Batch sizes alternate within each round (1, 8, 16, then 1, 8, 16 again ...), so
a busy host moves them alike; the report gives each run and the median ratio to one
sequence.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import compare  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--batch", default="1,8,16")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    if not sizes or min(sizes) < 1:
        p.error("--batch takes positive integers")

    import vlmc
    model = vlmc.load(args.artifact)
    vocab = model.tokenizer.vocab_size
    lo, hi = vocab // 4, vocab * 3 // 4  # ordinary ids, away from the special tokens at either end
    rng = random.Random(args.seed)
    seen: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(args.rounds):
        for b in sizes:
            ids = [[rng.randrange(lo, hi) for _ in range(args.prompt_tokens)] for _ in range(b)]
            out = compare._vlmc_batch(model, {"batch_ids": ids, "decode_tokens": args.decode_tokens, "runs": 1})
            seen[b].append(out["batch_decode_tps"])
            print(f"round {r + 1}  batch {b:3d}  decode {out['batch_decode_tps']:8.2f} tok/s  "
                  f"(prefill {out['batch_prefill_tps']:7.1f} tok/s)  load {os.getloadavg()[0]:.2f}", flush=True)
    base = statistics.median(seen[sizes[0]])
    print(f"\n{args.artifact}: {args.prompt_tokens}-token prompts, {args.decode_tokens} decode tokens, medians of "
          f"{args.rounds} round(s)")
    for b in sizes:
        med = statistics.median(seen[b])
        print(f"batch {b:3d}: {med:8.2f} tok/s  {med / base:5.2f}x batch {sizes[0]}")


if __name__ == "__main__":
    main()
