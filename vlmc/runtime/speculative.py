"""Speculative decoding: a drafter proposes tokens, the target checks them all in one step.

A step feeds the target the tokens it has not seen yet plus up to k drafted ones
(``Sequences.verify``: one pass over the weights for all of them) and gets the logits after
each. Going left to right, each drafted token is accepted by the rule that keeps the
output exact:

- greedy: accepted while it is the target's argmax; the first mismatch is replaced by the
  argmax, and if all were accepted the target's next token comes free;
- sampling: accepted with probability min(1, p(x) / q(x)) (p: the target's distribution
  after the same penalties, temperature and top-p/k/min-p as without speculation; q: the
  drafter's, one-hot for a deterministic drafter); on rejection the token is drawn from
  the residual max(0, p - q), renormalised. The output then has the target's distribution.

The caches keep the accepted tokens and forget the rest (``Sequences.trim``).

Drafters share one interface (``Drafter``): ``PromptLookup`` matches the context's last
n-gram earlier in the prompt and the reply and proposes what followed; ``DraftModel`` runs a
smaller artifact with a compatible tokenizer on the text; ``SharedKVDrafter`` runs a
drafter artifact that has no cache of its own and reads the target's (a multi-token
prediction assistant that shares the target's KV; ``shared_kv.py``): ``start`` hands every
drafter the target's ``Sequences``, whose caches and last hidden states (``hidden_at``) such a
drafter reads. The batching loop asks a drafter that reads its batch (``reads_batch``) for
every row's draft at once, after each step (``propose_rows``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError


# ---------------------------------------------------------------------------- acceptance

def probabilities(processed: mx.array) -> np.ndarray:
    """A row of processed logits (penalties, temperature, top-p/k/min-p applied; -inf where
    masked) -> float64 probabilities."""
    x = np.asarray(processed.astype(mx.float32), dtype=np.float64)
    x = x - np.max(x)
    p = np.exp(x)
    return p / p.sum()


def decide(processed: mx.array, candidate: int | None, q: np.ndarray | None, *, greedy: bool,
           rng: np.random.Generator) -> tuple[int, bool]:
    """(the token at this position, whether it is ``candidate``), by the rule that keeps
    the target's output (module docstring). ``q``: the drafter's distribution, None for a
    deterministic drafter (one-hot at the candidate)."""
    if greedy:
        token = int(mx.argmax(processed).item())
        return token, candidate is not None and token == candidate
    p = probabilities(processed)
    if candidate is None:
        return int(rng.choice(p.size, p=p)), False
    q_x = 1.0 if q is None else float(q[candidate])
    if q_x > 0 and rng.random() < min(1.0, p[candidate] / q_x):
        return candidate, True
    residual = p.copy()
    if q is None:
        residual[candidate] = 0.0
    else:
        residual = np.maximum(residual - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q: every token would have been accepted; draw from p itself
        return int(rng.choice(p.size, p=p)), False
    return int(rng.choice(p.size, p=residual / total)), False


class StepCost:
    """What a step costs as a function of the tokens it feeds (all rows together), learned
    from the steps the loop times: a moving average per token count, and the prior
    ``1 + extra_cost * (n - 1)`` decode steps for counts not seen yet."""

    def __init__(self, extra_cost: float = 0.15):
        self.extra_cost = extra_cost
        self.seconds: dict[int, float] = {}

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def ratio(self, tokens: int, base: int) -> float:
        """The cost of a step feeding ``tokens`` relative to one feeding ``base``."""
        if tokens in self.seconds and base in self.seconds and self.seconds[base] > 0:
            return self.seconds[tokens] / self.seconds[base]
        return (1 + self.extra_cost * (tokens - 1)) / (1 + self.extra_cost * (base - 1))


class DraftLength:
    """Adaptive draft length: the k in [0, k_max] that maximises expected tokens per unit
    of step cost, from the running acceptance rate r (expected tokens of a k-token draft:
    (1 - r^(k+1)) / (1 - r)) and the cost of a step feeding k more tokens relative to a
    decode step (``next(cost)``; by default ``1 + extra_cost * k``). k = 0 is a plain decode
    step: speculation turns itself off where it does not pay, and probes again every
    ``probe`` steps."""

    def __init__(self, k_max: int, *, extra_cost: float = 0.15, adaptive: bool = True, probe: int = 16):
        if k_max < 1:
            raise InputError(f"the number of draft tokens must be >= 1, got {k_max}")
        self.k_max, self.extra_cost, self.adaptive, self.probe = k_max, extra_cost, adaptive, probe
        self.rate = 0.7         # prior: the acceptance that made speculation worth switching on
        self.proposed = 0
        self.accepted = 0
        self._idle = 0

    def next(self, cost=None) -> int:
        """The draft length for the next step; ``cost(k)``: a step with k drafted tokens
        relative to a plain one."""
        if not self.adaptive:
            return self.k_max
        cost = cost or (lambda k: 1 + self.extra_cost * k)
        best, best_gain = 0, 1.0
        r = min(self.rate, 0.999)
        for k in range(1, self.k_max + 1):
            gain = (1 - r ** (k + 1)) / (1 - r) / cost(k)
            if gain > best_gain:
                best, best_gain = k, gain
        if best == 0:
            self._idle += 1
            if self._idle >= self.probe:  # look again: the text may have become predictable
                self._idle = 0
                return 1
        return best

    def update(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        self.rate = 0.8 * self.rate + 0.2 * (accepted / proposed)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


# ---------------------------------------------------------------------------- drafters

@dataclass
class Draft:
    tokens: list[int]
    q: list[np.ndarray] | None = None   # the drafter's distribution per token (None: deterministic)


class Drafter:
    """Proposes up to k tokens to follow a sequence's context.

    ``start(prompt_ids, prompt, target)`` makes the per-sequence state (``target``: the
    target's ``step.Sequences`` of this one sequence, prefilled: its caches and its last
    step's hidden states, for drafters that read them); ``propose(state, context, k,
    sampler, rng)`` drafts (``context``: every token so far, prompt included, the last one not
    yet in the target's caches; ``sampler``: the request's, whose settings a sampling drafter
    applies to its own logits); ``accepted(state, context)`` tells the drafter which context
    the target kept (it rewinds what it must)."""

    name = "drafter"
    batch_refusal: str | None = None   # why the batching loop cannot draft with it (None: it can)
    reads_batch = False                # the batching loop drafts with ``propose_rows`` (see there)

    def start(self, prompt_ids: Sequence[int], prompt: Any = None, target: Any = None) -> Any:
        return None

    def propose(self, state: Any, context: Sequence[int], k: int, sampler: Any = None,
                rng: np.random.Generator | None = None) -> Draft:
        raise NotImplementedError

    def accepted(self, state: Any, context: Sequence[int]) -> None:
        pass

    def propose_rows(self, seqs: Any, tokens: Sequence[int], ends: Sequence[int], ks: Sequence[int]) -> list[list[int]]:
        """For a drafter that reads the target's batch (``reads_batch``): every row's draft at
        once, the batching loop's ``Sequences`` just after a step (``seqs.hidden`` holds that
        step's hidden states): ``tokens[b]`` is row b's last token (not in the caches), its
        context fills the cache columns before ``ends[b]`` (columns after it are the step's
        rejected ones, trimmed later), ``ks[b]`` the tokens wanted (0: none). One draft per
        row, at most ``ks[b]`` tokens."""
        raise NotImplementedError


class PromptLookup(Drafter):
    """Proposes the tokens that followed the most recent earlier occurrence of the
    context's last n-gram (n from ``ngram`` down to ``min_ngram``), in the prompt and the
    reply so far. No model: it pays where the reply repeats its input (quoting, editing,
    extraction)."""

    name = "prompt-lookup"

    def __init__(self, ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= ngram:
            raise InputError(f"prompt lookup n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{ngram}")
        self.ngram, self.min_ngram = ngram, min_ngram

    @dataclass
    class _Index:
        seen: int = 0                                   # context tokens indexed
        last: dict = field(default_factory=dict)        # n-gram -> end position of its latest occurrence
        prev: dict = field(default_factory=dict)        # ... and of the one before it

    def start(self, prompt_ids: Sequence[int], prompt: Any = None, target: Any = None) -> Any:
        return PromptLookup._Index()

    def _index(self, state: "_Index", context: Sequence[int]) -> None:
        for end in range(max(state.seen, 1), len(context) + 1):
            for n in range(self.min_ngram, self.ngram + 1):
                if end - n < 0:
                    break
                key = tuple(context[end - n:end])
                if key in state.last:
                    state.prev[key] = state.last[key]
                state.last[key] = end
        state.seen = len(context)

    def propose(self, state: "_Index", context: Sequence[int], k: int, sampler: Any = None,
                rng: np.random.Generator | None = None) -> Draft:
        if k <= 0 or not context:
            return Draft([])
        self._index(state, context)
        end = len(context)
        for n in range(min(self.ngram, end - 1), self.min_ngram - 1, -1):
            key = tuple(context[end - n:end])
            hit = state.last.get(key)
            if hit == end:  # the tail itself: the occurrence before it
                hit = state.prev.get(key)
            if hit is not None and hit < end:
                return Draft(list(context[hit:hit + k]))
        return Draft([])


class DraftModel(Drafter):
    """A smaller vlmc model that drafts greedily (or by sampling with the request's
    settings) on the text: image placeholders are left out of its context, so any model
    whose tokenizer maps the shared token ids to the same strings can draft for any target.
    Its caches follow the accepted context (rewound with ``trim``)."""

    name = "draft-model"

    def __init__(self, draft: Any, target: Any):
        check_tokenizers(draft, target)
        self.vlm = draft
        self.skip = {t for m in (target, draft) for t in m.placeholder_ids}

    @dataclass
    class _State:
        seqs: Any = None
        fed: list = field(default_factory=list)          # the text tokens in the draft's caches

    def start(self, prompt_ids: Sequence[int], prompt: Any = None, target: Any = None) -> Any:
        return DraftModel._State()

    def _text(self, context: Sequence[int]) -> list[int]:
        return [t for t in context if t not in self.skip]

    def _sync(self, state: "_State", text: list[int]) -> mx.array | None:
        """Bring the draft's caches to ``text``: rewind to the common prefix, feed the rest;
        the logits after the last token fed (None when nothing had to be fed)."""
        from .step import PromptInputs, Sequences
        self._rewind(state, text)
        todo = text[len(state.fed):]
        if not todo:
            return None
        vlm = self.vlm
        if state.seqs is None:
            ids = mx.array([todo], dtype=mx.int32)
            pos, delta = vlm.inputs.positions(todo, None)
            state.seqs = Sequences.start(vlm.decoder, [PromptInputs(vlm.model.embed(ids=ids), pos, delta)])
            logits = state.seqs.prefill()
        elif len(todo) == 1:
            logits = state.seqs.decode(mx.array(todo, dtype=mx.int32))
        else:
            logits = state.seqs.verify(mx.array([todo], dtype=mx.int32))[:, -1]
        state.fed = list(text)
        return logits

    def propose(self, state: "_State", context: Sequence[int], k: int, sampler: Any = None,
                rng: np.random.Generator | None = None) -> Draft:
        text = self._text(context)
        if k <= 0 or not text:
            return Draft([])
        room = self.vlm.max_context - len(text) - 1
        k = min(k, room)
        if k <= 0:
            return Draft([])
        logits = self._sync(state, text)
        if logits is None:  # the context is all fed: its last logits are gone; refeed one token
            state.seqs.trim(1)
            state.fed = state.fed[:-1]
            logits = self._sync(state, text)
        tokens, qs = [], []
        greedy = sampler is None or sampler.params.greedy
        history = [list(text)]
        for i in range(k):
            row = logits[0:1]
            if greedy:
                t = int(mx.argmax(row[0]).item())
                q = None
            else:
                processed = sampler.process(row, history if sampler.params.repetition_penalty != 1.0 else None)[0]
                q = probabilities(processed)
                t = int((rng or np.random.default_rng()).choice(q.size, p=q))
            tokens.append(t)
            qs.append(q)
            history[0].append(t)
            if i + 1 < k:
                logits = state.seqs.decode(mx.array([t], dtype=mx.int32))
                state.fed.append(t)
        return Draft(tokens, None if greedy else qs)

    def accepted(self, state: "_State", context: Sequence[int]) -> None:
        """Forget drafted tokens the target did not keep (the next propose feeds the rest)."""
        self._rewind(state, self._text(context))

    @staticmethod
    def _rewind(state: "_State", text: list[int]) -> None:
        """Trim the draft's caches back to the longest prefix they share with ``text``."""
        common = 0
        for a, b in zip(state.fed, text):
            if a != b:
                break
            common += 1
        if state.seqs is not None and common < len(state.fed):
            state.seqs.trim(len(state.fed) - common)
            state.fed = state.fed[:common]


def check_tokenizers(draft: Any, target: Any) -> None:
    """A draft model must name every token id it can propose as the target does (the ids
    both vocabularies have), and must not be the target's own size or larger in a way that
    proposes ids the target lacks. One clear error otherwise, before any work."""
    dv, tv = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    d_by_id = {i: s for s, i in dv.items()}
    t_by_id = {i: s for s, i in tv.items()}
    target_size = int(target.meta["text"]["vocab_size"])
    draft_size = int(draft.meta["text"]["vocab_size"])
    if draft_size > target_size and any(i >= target_size for i in d_by_id):
        raise InputError(f"the draft model's vocabulary ({draft_size} ids) has ids the target's ({target_size}) "
                         f"lacks; a draft model needs the target's tokenizer")
    shared = set(d_by_id) & set(t_by_id)
    differ = sorted(i for i in shared if d_by_id[i] != t_by_id[i])
    if not shared or differ or len(shared) < 0.99 * min(len(d_by_id), len(t_by_id)):
        example = f" (id {differ[0]}: {d_by_id[differ[0]]!r} vs {t_by_id[differ[0]]!r})" if differ else ""
        raise InputError(f"the draft model's tokenizer does not match the target's{example}; a draft model "
                         f"needs the same vocabulary")


def make_drafter(target: Any, *, draft: Any = None, prompt_lookup: bool = False, ngram: int = 3) -> Drafter | None:
    """The drafter a request or the command line asks for: a draft model (a loaded vlmc
    model), or prompt lookup (the default when speculation is on without a draft model)."""
    if draft is not None and prompt_lookup:
        raise InputError("give either a draft model or prompt lookup, not both")
    if draft is not None:
        if isinstance(draft, Drafter):
            return draft
        kind = (draft.meta.get("drafter") or {}).get("kind")
        if kind == "shared_kv":
            return SharedKVDrafter(draft, target)
        if kind == "eagle3":
            from .eagle3 import Eagle3Drafter
            return Eagle3Drafter(draft, target)
        return DraftModel(draft, target)
    if prompt_lookup:
        return PromptLookup(ngram=ngram)
    return None


@dataclass
class Speculation:
    """How generation speculates: the drafter, the largest draft, and whether its length
    adapts to the acceptance rate."""

    drafter: Drafter
    num_draft_tokens: int = 4
    adaptive: bool = True
    extra_cost: float = 0.15

    def __post_init__(self) -> None:
        if not isinstance(self.num_draft_tokens, int) or not 1 <= self.num_draft_tokens <= 15:
            raise InputError(f"the number of draft tokens must be 1-15, got {self.num_draft_tokens!r}")
        if not math.isfinite(self.extra_cost) or self.extra_cost < 0:
            raise InputError("extra_cost must be a finite number >= 0")

    def length(self) -> DraftLength:
        return DraftLength(self.num_draft_tokens, extra_cost=self.extra_cost, adaptive=self.adaptive)

    def cost(self) -> StepCost:
        return StepCost(self.extra_cost)


from .shared_kv import SharedKVDrafter  # noqa: E402,F401 - importable from here, as the other drafters
