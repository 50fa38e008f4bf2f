"""EAGLE-3 drafting: a one-layer drafter that reads hidden states the target computes at a
few of its layers (an artifact whose ``meta["drafter"]["kind"]`` is "eagle3").

The drafter keeps its own KV cache, one entry per context position p: the row for
(the embedding of token p + 1, ``fuse`` of the target's captured states at p). Feeding the
rows up to the last position the target has run gives the first draft; every further
draft feeds the drafter's own output state with the embedding of the token it just
drafted, one position on. Those speculative rows are trimmed again right away, so the
cache always follows the context the target accepted; the next step's accepted positions
are fed from the target's states. Draft ids map to target ids through ``d2t``.

The target must return those states: ``vlmc.load(target, draft=drafter)`` loads it with
text entry points that do (``capture_hidden``); a target loaded without is one clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .artifact import Artifact
from .kv_cache import attention_mask, make_caches
from .speculative import Draft, Drafter


def default_layers(num_layers: int) -> list[int]:
    """The target layers an EAGLE-3 drafter reads when its config names none: an early, the
    middle and a late one (the hidden states entering them), as vLLM, SGLang, EAGLE and
    speculators all default to."""
    return [2, num_layers // 2, num_layers - 3]


class Eagle3Model:
    """A loaded EAGLE-3 drafter artifact: no tokenizer and no chat of its own, only the
    program and what its manifest says (``vlmc.load`` returns one for such an artifact)."""

    def __init__(self, artifact: Artifact):
        self.artifact, self.model, self.meta = artifact, artifact.model, artifact.meta
        self.spec = dict(self.meta.get("drafter") or {})
        if self.spec.get("kind") != "eagle3":
            raise InputError(f"{artifact.path} is not an EAGLE-3 drafter")
        self.kv_layers = artifact.kv_layers
        text = self.meta["text"]
        self.kv_heads, self.head_dim = int(text["num_kv_heads"]), int(text["head_dim"])

    def layers_for(self, target_layers: int) -> list[int]:
        """The target layers whose entering hidden states this drafter reads, in increasing
        order: the order its ``fc`` takes them in, whatever order the config lists them in
        (an index equal to the target's layer count: the last layer's output, before the
        final norm)."""
        layers = [int(j) for j in self.spec.get("layers") or default_layers(target_layers)]
        if len(set(layers)) != len(layers) or any(not 0 <= j <= target_layers for j in layers) or \
                len(layers) != int(self.spec["aux_states"]):
            raise InputError(f"the EAGLE-3 drafter reads layers {layers} of its target, which has {target_layers}")
        return sorted(layers)


class Eagle3Drafter(Drafter):
    """Greedy drafts from an ``Eagle3Model`` for a target loaded with its captured layers
    (a deterministic drafter: exact under sampling too, by the acceptance rule)."""

    name = "eagle3"
    batch_refusal = ("EAGLE-3 drafters draft for one request at a time (vlmc run, generate); the batching loop "
                     "and the server do not take them")

    def __init__(self, draft: Eagle3Model, target: Any):
        spec, text = draft.spec, target.meta["text"]
        layers = draft.layers_for(int(text["num_layers"]))
        if int(spec["target_hidden_size"]) != int(text["hidden_size"]):
            raise InputError(f"the EAGLE-3 drafter reads hidden states of width {spec['target_hidden_size']}; the "
                             f"target's are {text['hidden_size']}")
        if int(spec["target_vocab_size"]) != int(text["vocab_size"]):
            raise InputError(f"the EAGLE-3 drafter was made for a vocabulary of {spec['target_vocab_size']} tokens; "
                             f"the target's has {text['vocab_size']}")
        if not spec.get("own_embeddings") and int(spec["hidden_size"]) != int(text["hidden_size"]):
            raise InputError("the EAGLE-3 drafter embeds with the target's embeddings, which are of another width")
        if list(target.meta.get("captured_layers") or []) != layers:
            raise InputError(f"the target does not return the hidden states of layers {layers} the EAGLE-3 drafter "
                             f"reads: load it with vlmc.load(target, draft=drafter) (--draft-model)")
        vd = int(spec["draft_vocab_size"])
        d2t = np.asarray(draft.model.target_ids(ids=mx.arange(vd, dtype=mx.int32)[None])).reshape(-1).astype(np.int64)
        self.to_target = np.arange(d2t.size) + d2t
        if self.to_target.min() < 0 or self.to_target.max() >= int(text["vocab_size"]):
            raise InputError("the EAGLE-3 drafter's d2t maps draft tokens outside the target's vocabulary")
        self.vlm, self.target = draft, target
        self.width = int(spec["hidden_size"])
        self.max_context = int(target.meta["text"]["max_position_embeddings"])

    @dataclass
    class _State:
        seqs: Any = None                                 # the target's Sequences
        caches: list = field(default_factory=list)
        fed: int = 0                                     # positions in the drafter's cache
        pending: list = field(default_factory=list)      # captured rows [1, n, 3 Ht] for positions fed..
        logits: list = field(default_factory=list)       # the last draft's logits, one row per token
        last: Any = None                                 # the captured row of the last position fed
        prompt_embeds: Any = None                        # the target's prompt rows, image features merged

    def start(self, prompt_ids: Sequence[int], prompt: Any = None, target: Any = None) -> Any:
        """``target`` None (the batching loop, whose rows share one batch of caches): no drafts."""
        if target is None:
            return None
        state = Eagle3Drafter._State(seqs=target, caches=make_caches(self.vlm.kv_layers, 1, self.vlm.kv_heads,
                                                                     self.vlm.head_dim))
        if not self.vlm.spec.get("own_embeddings") and target.prompt_embeds is not None:
            state.prompt_embeds = target.prompt_embeds[..., :self.width]   # image positions: their features
        self._collect(state)
        return state

    def _collect(self, state: "_State") -> None:
        """Keep the target's captured rows of positions the drafter has not got yet (the
        last step's rows of accepted positions: those below the target's cache offset)."""
        seqs = state.seqs
        if seqs.hidden is None:
            raise InputError("the target's steps return no hidden states for the EAGLE-3 drafter")
        first, rows = seqs.hidden
        have = state.fed + sum(int(r.shape[1]) for r in state.pending)
        lo, hi = max(have, first), min(seqs.offset, first + int(rows.shape[1]))
        if lo > have:
            raise ValueError(f"the EAGLE-3 drafter missed the target's states of positions {have}..{lo - 1}")
        if hi > lo:
            state.pending.append(rows[:, lo - first:hi - first])

    def _embed_context(self, state: "_State", context: Sequence[int], lo: int, hi: int) -> mx.array:
        """The embeddings of context[lo:hi]: the target's prompt rows where it has them (the
        drafter then sees the image features the target saw), the token embeddings after."""
        n = 0 if state.prompt_embeds is None else int(state.prompt_embeds.shape[1])
        parts = []
        if lo < n:
            parts.append(state.prompt_embeds[:, lo:min(hi, n)])
        if hi > max(lo, n):
            parts.append(self._embed(context[max(lo, n):hi]))
        return parts[0] if len(parts) == 1 else mx.concatenate([parts[0], parts[1].astype(parts[0].dtype)], axis=1)

    def _embed(self, tokens: Sequence[int]) -> mx.array:
        ids = mx.array([list(tokens)], dtype=mx.int32)
        if self.vlm.spec.get("own_embeddings"):
            return self.vlm.model.embed(ids=ids)
        return self.target.model.embed(ids=ids)[..., :self.width]

    def _run(self, state: "_State", embeds: mx.array, hidden: mx.array) -> tuple[mx.array, mx.array]:
        """Feed rows at the next positions of the drafter's cache: (logits, output states)."""
        n = int(embeds.shape[1])
        offset = state.caches[0].offset
        pos = mx.arange(offset, offset + n, dtype=mx.int32)[None]
        mask = attention_mask(mx.zeros(1, mx.int32), offset, n, False)
        return self.vlm.model.draft(embeds=embeds, hidden=hidden.astype(embeds.dtype), positions=pos, mask=mask,
                                    caches=state.caches)

    def propose(self, state: "_State", context: Sequence[int], k: int, sampler: Any = None,
                rng: np.random.Generator | None = None) -> Draft:
        if state is None or k <= 0:
            return Draft([])
        seqs = state.seqs
        if seqs.offset != len(context) - 1:
            return Draft([])
        self._collect(state)
        k = min(k, self.max_context - len(context) - 1)
        if k <= 0:
            return Draft([])
        if not state.pending and state.last is not None:  # all fed already: feed the last row again
            for cache in state.caches:
                cache.trim(1)
            state.fed -= 1
            state.pending = [state.last]
        if not state.pending:
            return Draft([])
        aux = state.pending[0] if len(state.pending) == 1 else mx.concatenate(state.pending, axis=1)
        state.pending = []
        lo = state.fed
        hi = lo + int(aux.shape[1])                      # == seqs.offset
        logits, hidden = self._run(state, self._embed_context(state, context, lo + 1, hi + 1),
                                  self.vlm.model.fuse(aux=aux))
        state.fed, state.last = hi, aux[:, -1:]
        tokens: list[int] = []
        state.logits = []
        for i in range(k):
            state.logits.append(logits[0, -1])
            token = int(self.to_target[int(mx.argmax(logits[0, -1]).item())])
            tokens.append(token)
            if i + 1 < k:
                logits, hidden = self._run(state, self._embed([token]), hidden[:, -1:])
        spare = state.caches[0].offset - state.fed       # the drafter's own rows: forget them
        if spare:
            for cache in state.caches:
                cache.trim(spare)
        return Draft(tokens)

    def accepted(self, state: "_State", context: Sequence[int]) -> None:
        """Keep the captured rows of the step the target just took (its cache is trimmed)."""
        if state is not None:
            self._collect(state)
