"""Does a sequence get the same logits in a batch as alone? Bit for bit, step by step.

    python benchmarks/batch_invariance.py ARTIFACT [--batch 8] [--min-len 15] [--max-len 40]
                                          [--steps 5] [--seed 1]

BATCH prompts of random ordinary ids (lengths drawn from [min-len, max-len)) are prefilled
together (left-padded, as the batching loop does) and decoded greedily for ``steps``
steps; then each prompt alone. For every row and step the script prints "=" where the
batched row's logits equal the lone run's bit for bit, else the largest absolute
difference. Greedy decoding with continuous batching gives the replies of serial runs
only where every row is batch-invariant; on random-weight checkpoints, whose
distributions are nearly flat, a last-bit difference soon becomes another token.
Not a timing: any load is fine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def run(model, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    """The logits [rows, vocab] after the prefill and after each greedy decode step."""
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.step import Sequences

    seqs = Sequences.start(model.decoder, [model.prompt_inputs(Prompt(ids=p)) for p in prompts])
    logits = seqs.prefill()
    out = [np.array(logits)]
    for _ in range(steps):
        logits = seqs.decode(mx.argmax(logits, -1).astype(mx.int32))
        out.append(np.array(logits))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-len", type=int, default=15)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.batch < 2 or not 1 <= args.min_len < args.max_len:
        p.error("--batch must be >= 2 and 1 <= --min-len < --max-len")

    import vlmc
    model = vlmc.load(args.artifact)
    vocab = model.tokenizer.vocab_size
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len, args.batch)
    prompts = [[int(t) for t in rng.integers(vocab // 4, vocab * 3 // 4, int(n))] for n in lengths]
    together = run(model, prompts, args.steps)
    same = 0
    for i, prompt in enumerate(prompts):
        alone = run(model, [prompt], args.steps)
        marks = ["=" if np.array_equal(a[0], t[i]) else f"{np.abs(a[0] - t[i]).max():.1e}"
                 for a, t in zip(alone, together)]
        same += all(m == "=" for m in marks)
        print(f"row {i}: {len(prompt):3d} ids  prefill, steps: {' '.join(marks)}", flush=True)
    print(f"{same} of {len(prompts)} rows bit-identical to their lone runs")


if __name__ == "__main__":
    main()
