"""Teacher-forced top-1 agreement of weight formats with float32 on the test suite's tiny
random-weight checkpoints (Qwen2-VL, Qwen2.5-VL, LLaVA), over the fixed prompts of
``vlmc.quality``, with bfloat16 as the floor any format other than float32 starts from.

    python benchmarks/weight_quality_tiny.py [--steps 32]

Besides top-1 and mean KL, per config: the largest float32 margin (top-1 minus top-2
log-probability, nats) at which its top-1 differed, and per family how many positions
have a float32 margin under 0.1 and 0.2 nats. A random model's output head gives logits
close to Gaussian, whose top-two gap is small at a good share of positions; there any
perturbation, bfloat16 rounding included, can swap the two. A format that only flips such
near-ties computes what float32 computes; one that flips wide margins does not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

import vlmc  # noqa: E402
from fixtures.checkpoints import build_checkpoint  # noqa: E402
from vlmc.kernels import cpu  # noqa: E402
from vlmc.quality import FIXED_PROMPTS, _Forced, _trace  # noqa: E402
from vlmc.runtime.sampling import Sampler, SamplingParams  # noqa: E402

# name -> (compile options, int8 activations on the CPU)
CONFIGS = {
    "bfloat16": ({"dtype": "bfloat16"}, True),
    "q8": ({"quantize": "q8"}, True),
    "q8 f32 params": ({"quantize": "q8", "quant_params": "float32"}, True),
    "q8, float x": ({"quantize": "q8"}, False),
    "q8 g32": ({"quantize": "q8", "group_size": 32}, True),
    "q6": ({"quantize": "q6"}, True),
    "q4 (head q6)": ({"quantize": "q4"}, True),
    "q4 f32 params": ({"quantize": "q4", "quant_params": "float32"}, True),
}


def set_int8_activations(on: bool | None) -> None:
    """On, off, or None: back to what the environment said when this script started."""
    if on is None:
        os.environ.pop("VLMC_CPU_INT8_ACTIVATIONS", None)
        if INITIAL is not None:
            os.environ["VLMC_CPU_INT8_ACTIVATIONS"] = INITIAL
    else:
        os.environ["VLMC_CPU_INT8_ACTIVATIONS"] = "1" if on else "0"
    cpu.refresh()


INITIAL = os.environ.get("VLMC_CPU_INT8_ACTIVATIONS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced positions per prompt")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    print(f"{'family':12s} {'config':14s} {'top-1':>7s} {'mean KL':>9s} {'widest flipped margin':>22s}")
    for family in ("qwen2_vl", "qwen2_5_vl", "llava"):
        build_checkpoint(tmp / family, family)
        ref = vlmc.load(vlmc.compile(str(tmp / family), str(tmp / f"{family}-f32")))
        prompts = [ref.build_prompt(p) for p in FIXED_PROMPTS]
        set_int8_activations(True)
        traces = [_trace(ref, p, Sampler(SamplingParams()), args.steps) for p in prompts]
        margins = np.array([np.diff(np.sort(lp)[-2:])[0] for _, lps in traces for lp in lps])
        print(f"{family:12s} float32 margin < 0.1 nats at {int((margins < 0.1).sum())} of {margins.size} "
              f"positions, < 0.2 at {int((margins < 0.2).sum())}")
        for i, (name, (options, int8)) in enumerate(CONFIGS.items()):
            set_int8_activations(int8)
            cand = vlmc.load(vlmc.compile(str(tmp / family), str(tmp / f"{family}-{i}"), **options))
            agree, kls, flipped = 0, [], [0.0]
            for p, (toks, ref_lps) in zip(prompts, traces):
                _, cand_lps = _trace(cand, p, _Forced(toks), args.steps)
                for r, c in zip(ref_lps, cand_lps):
                    same = int(np.argmax(r) == np.argmax(c))
                    agree += same
                    kls.append(float(np.sum(np.exp(r) * (r - c))))
                    if not same:
                        flipped.append(float(np.diff(np.sort(r)[-2:])[0]))
            print(f"{family:12s} {name:14s} {agree / len(kls):7.1%} {np.mean(kls):9.5f} {max(flipped):17.3f} nats",
                  flush=True)
    set_int8_activations(None)


if __name__ == "__main__":
    main()
