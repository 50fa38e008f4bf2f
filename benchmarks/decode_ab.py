"""Decode tok/s of several artifacts in one process, alternated round by round.

    python benchmarks/decode_ab.py ART_A ART_B [--prompt-tokens 32] [--decode-tokens 16] [--rounds 3]
    python benchmarks/decode_ab.py ART --moe-block-off   # one artifact, its moe_block ops on / off

Every artifact is loaded once (with the code on PYTHONPATH) and warmed up; then each round
generates ``--decode-tokens`` greedy tokens after the same ``--prompt-tokens`` synthetic
ids with each artifact in turn (``vlmc.bench.time_generation``: EOS never stops it), so
the artifacts meet the same moment of a noisy host. Prints each round's decode tok/s and
the medians; the ratio of each artifact to the first. ``--moe-block-off`` also times each
artifact with the one-call MoE block declined (its ``moe_block`` ops then run as the separate
ops they stand for), in the same rounds: the block's effect on the same weights in one process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402
from vlmc.bench import synthetic_ids, time_generation  # noqa: E402
from vlmc.kernels import cpu_ops  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402

FUSED_BLOCK = cpu_ops._fused_block


def _block_off(*args, **kw):
    return None  # cpu_ops.moe_block then runs the separate ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--moe-block-off", action="store_true", help="also time each artifact with its one-call MoE "
                    "block declined")
    a = ap.parse_args()
    vlms = [api.load(p) for p in a.artifacts]
    prompt = Prompt(ids=synthetic_ids(vlms[0].tokenizer, a.prompt_tokens))
    runs = [(p, v, FUSED_BLOCK) for p, v in zip(a.artifacts, vlms)]
    if a.moe_block_off:
        runs = [r for p, v, f in runs for r in ((p, v, f), (f"{p} (moe_block off)", v, _block_off))]
    for _, v, fused in runs:
        cpu_ops._fused_block = fused
        time_generation(v, prompt, 3)
    rates: dict[str, list[float]] = {p: [] for p, _, _ in runs}
    for _ in range(a.rounds):
        for p, v, fused in runs:
            cpu_ops._fused_block = fused
            t = time_generation(v, prompt, a.decode_tokens + 1)
            rates[p].append(t.decode_tokens / t.decode_s)
    cpu_ops._fused_block = FUSED_BLOCK
    first = statistics.median(rates[runs[0][0]])
    for p in rates:
        med = statistics.median(rates[p])
        print(f"{p}: decode tok/s {', '.join(f'{r:.2f}' for r in rates[p])}; median {med:.2f} "
              f"({med / first:.2f}x the first)")


if __name__ == "__main__":
    main()
