"""How much memory a decode run adds after its first token, step by step.

    python benchmarks/decode_memory.py ARTIFACT [--batch 1] [--prompt-tokens 64]
                                       [--steps 100] [--at 20,60,100]

Greedy decode of ``--batch`` prompts of ``--prompt-tokens`` ordinary token ids; at each
step in ``--at`` it prints MLX's active memory and how much it grew since the first
token (the caches' growth: KV rows per token, and for recurrent layers whatever states
the cache keeps to rewind), then the decode steps per second. Run it with another tree on
PYTHONPATH to compare (the numbers are MLX's own, not the process RSS).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402
from vlmc.runtime.sampling import Sampler, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--at", default="20,60,100")
    a = ap.parse_args()
    at = {int(s) for s in a.at.split(",")}
    vlm = vlmc.load(a.artifact)
    prompts = [Prompt(ids=list(range(100 + i, 100 + i + a.prompt_tokens))) for i in range(a.batch)]
    first, t0, steps = 0, 0.0, 0
    for _ in vlm.generate_steps(prompts, Sampler(SamplingParams(temperature=0.0)), a.steps):
        steps += 1
        if steps == 1:
            first, t0 = mx.get_active_memory(), time.perf_counter()
        if steps in at:
            now = mx.get_active_memory()
            print(f"batch {a.batch} step {steps}: active {now / 2**20:.0f} MiB "
                  f"(+{(now - first) / 2**20:.0f} since the first token), peak {mx.get_peak_memory() / 2**20:.0f}")
    print(f"{(steps - 1) / (time.perf_counter() - t0):.2f} decode steps/s")


if __name__ == "__main__":
    main()
