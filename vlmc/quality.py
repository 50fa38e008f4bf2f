"""Quality of an optimized artifact against a reference artifact (usually float32).

Teacher-forced: the reference's greedy continuation is fed to both models, so one early
disagreement cannot derail every later position. Per position: top-1 agreement and
KL(reference || candidate) of the next-token distributions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .runtime.engine import VLM, Prompt
from .runtime.sampling import Sampler, SamplingParams

FIXED_PROMPTS = [
    "Describe a sunny day at the beach in three sentences.",
    "List four colors and one object of each color.",
    "What is the capital of France, and why is it famous?",
    "Write a short poem about a cat who likes to sleep.",
]


class _Forced(Sampler):
    """Replays a fixed token sequence (one row) instead of sampling."""

    def __init__(self, tokens: list[int]):
        super().__init__(SamplingParams())
        self.tokens, self.i = tokens, 0

    def __call__(self, logits: mx.array, history=None) -> mx.array:
        tok = self.tokens[min(self.i, len(self.tokens) - 1)]
        self.i += 1
        return mx.array([tok], dtype=mx.int32)


def _trace(model: VLM, prompt: Prompt, sampler: Sampler, steps: int) -> tuple[list[int], list[np.ndarray]]:
    toks, logps = [], []
    for t, logits in model.generate_steps([prompt], sampler, steps):
        toks.append(int(t[0].item()))
        logps.append(np.array(logits[0] - mx.logsumexp(logits[0]), dtype=np.float64))
    return toks, logps


@dataclass
class QualityReport:
    positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "top1_agreement": self.top1_agreement, "mean_kl": self.mean_kl,
                "max_kl": self.max_kl}


def compare(reference: VLM, candidate: VLM, prompts: list[Prompt] | None = None, steps: int = 32) -> QualityReport:
    prompts = prompts or [reference.build_prompt(p) for p in FIXED_PROMPTS]
    agree, kls = 0, []
    for p in prompts:
        ref_tokens, ref_lp = _trace(reference, p, Sampler(SamplingParams()), steps)
        _, cand_lp = _trace(candidate, p, _Forced(ref_tokens), steps)
        for r, c in zip(ref_lp, cand_lp):
            agree += int(np.argmax(r) == np.argmax(c))
            kls.append(float(np.sum(np.exp(r) * (r - c))))
    return QualityReport(len(kls), agree / len(kls), float(np.mean(kls)), float(np.max(kls)))
