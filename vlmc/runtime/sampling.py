"""Token sampling on MLX: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

The logits pipeline follows transformers' `generate` so that the same parameters mean the same
thing here: the repetition penalty (a logits *processor*, applied even when greedy), then the
warpers in transformers' order — temperature, top-k, top-p, min-p — then a draw from the
resulting distribution. Each warper keeps at least one token. A seed makes a run reproducible:
the sampler owns an `mx.random.key` derived from it and splits it once per step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from vlmc.errors import InputError

_NEG_INF = float("-inf")

# Temperatures below this sample greedily: dividing float32 logits by a temperature near 0
# overflows to inf/nan (below ~1e-37 every logit does) and the draw becomes noise, and
# anything this small is an argmax in all but name (vLLM uses the same cut).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. `temperature == 0` means greedy (argmax), and so
    does any temperature below `GREEDY_BELOW` (it is stored as 0).

    `top_k == 0`, `top_p == 1`, `min_p == 0` and `repetition_penalty == 1` disable those steps.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        temperature = number("temperature")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        top_p = number("top_p")
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        min_p = number("min_p")
        if not 0.0 <= min_p <= 1.0:
            raise InputError(f"min_p must be in [0, 1], got {min_p}")
        penalty = number("repetition_penalty")
        if penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 disables it), got {penalty}")
        top_k = self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        seed = self.seed
        seed_ok = seed is None or (
            not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and 0 <= seed < 2**64
        )
        if not seed_ok:
            raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        # Normalize types so downstream code can rely on them (frozen: use object.__setattr__).
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "min_p", min_p)
        object.__setattr__(self, "repetition_penalty", penalty)
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "seed", None if seed is None else int(seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        """The settings that change the distribution, e.g. "greedy, repetition_penalty 1.05"."""
        parts = ["greedy" if self.greedy else f"temperature {self.temperature:g}"]
        if not self.greedy:
            parts += [f"{k} {v:g}" for k, v, off in (("top_p", self.top_p, 1.0), ("top_k", self.top_k, 0),
                                                     ("min_p", self.min_p, 0.0)) if v != off]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty {self.repetition_penalty:g}")
        return ", ".join(parts)


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GENERATION_CONFIG_MODES = ("auto", "vlmc")


def checkpoint_defaults(generation_config: dict) -> dict:
    """The sampling defaults a checkpoint's generation_config.json sets, as transformers'
    ``generate`` reads them: its sampling fields, and ``do_sample: false`` meaning greedy
    (the repetition penalty still applies then)."""
    out = {k: generation_config[k] for k in SAMPLING_FIELDS if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def resolve_sampling(given: dict, checkpoint: dict, *, base: dict | None = None,
                     mode: str = "auto") -> SamplingParams:
    """SamplingParams for a request: the fields it sets (``given``, None = unset), else the
    checkpoint's defaults (``checkpoint_defaults``; not with ``mode="vlmc"``), else ``base``
    (the caller's own defaults, e.g. an OpenAI server's temperature 1), else greedy."""
    if mode not in GENERATION_CONFIG_MODES:
        raise InputError(f"generation_config must be one of {', '.join(GENERATION_CONFIG_MODES)}, got {mode!r}")
    fields = dict(base or {})
    if mode == "auto":
        fields.update(checkpoint)
    fields.update({k: v for k, v in given.items() if v is not None})
    return SamplingParams(**fields)


# --------------------------------------------------------------------------------- logits steps


def log_softmax(logits: mx.array, axis: int = -1) -> mx.array:
    """Log-probabilities, computed stably (for logprobs reporting)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=axis, keepdims=True)


def seen_token_mask(history: Sequence[Sequence[int]], batch: int, vocab: int) -> mx.array:
    """(B, V) bool mask of the tokens each row has seen (prompt + generated)."""
    if len(history) != batch:
        raise ValueError(f"history has {len(history)} rows but logits have {batch}")
    mask = np.zeros((batch, vocab), dtype=np.bool_)
    for row, ids in enumerate(history):
        if len(ids):
            idx = np.asarray(ids, dtype=np.int64)
            idx = idx[(idx >= 0) & (idx < vocab)]
            mask[row, idx] = True
    return mx.array(mask)


def apply_repetition_penalty(logits: mx.array, history: Sequence[Sequence[int]], penalty: float) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits are divided by the
    penalty when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    mask = seen_token_mask(history, logits.shape[0], logits.shape[-1])
    penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(mask, penalized, logits)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep logits >= the k-th largest (ties at the threshold survive, as in transformers)."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < kth, _NEG_INF, logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability is <= 1 - top_p.

    Like transformers, it sorts ascending and never drops the most likely token.
    """
    if top_p >= 1.0:
        return logits
    order = mx.argsort(logits, axis=-1)  # ascending
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    cumulative = mx.cumsum(mx.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    vocab = logits.shape[-1]
    keep_last = mx.arange(vocab) == vocab - 1
    remove_sorted = mx.logical_and(remove_sorted, mx.logical_not(keep_last))
    # Scatter the sorted decisions back to vocabulary order.
    inverse = mx.argsort(order, axis=-1)
    remove = mx.take_along_axis(remove_sorted, inverse, axis=-1)
    return mx.where(remove, _NEG_INF, logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    threshold = min_p * mx.max(probs, axis=-1, keepdims=True)
    remove = probs < threshold
    # Keep at least the argmax.
    top = mx.argmax(logits, axis=-1, keepdims=True)
    is_top = mx.arange(logits.shape[-1])[None, :] == top
    remove = mx.logical_and(remove, mx.logical_not(is_top))
    return mx.where(remove, _NEG_INF, logits)


# --------------------------------------------------------------------------------- the sampler


class Sampler:
    """Turns a batch of logits into next tokens under one `SamplingParams`.

    `history[b]` lists the tokens row b has seen (prompt + generated); it is only read when a
    repetition penalty is set. With a seed, the sequence of draws is reproducible across runs.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        seed = self.params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return sub

    def process(self, logits: mx.array, history: Sequence[Sequence[int]] | None = None) -> mx.array:
        """The logits after the penalty and warpers (-inf where filtered); float32, (B, V)."""
        p = self.params
        if logits.ndim == 1:
            logits = logits[None, :]
        if logits.ndim != 2:
            raise ValueError(f"logits must be (batch, vocab), got shape {logits.shape}")
        logits = logits.astype(mx.float32)
        if p.repetition_penalty != 1.0 and history is not None:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            return logits
        if p.temperature != 1.0:
            logits = logits / p.temperature
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        logits = apply_min_p(logits, p.min_p)
        return logits

    def __call__(self, logits: mx.array, history: Sequence[Sequence[int]] | None = None) -> mx.array:
        """(B, V) logits -> (B,) int32 token ids."""
        processed = self.process(logits, history)
        if self.params.greedy:
            return mx.argmax(processed, axis=-1).astype(mx.int32)
        return mx.random.categorical(processed, axis=-1, key=self.next_key()).astype(mx.int32)
