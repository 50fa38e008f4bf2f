"""Drafting from the target's own caches: a drafter artifact with no cache of its own
(``meta["drafter"]["kind"] == "shared_kv"``, a multi-token-prediction assistant).

Each step of its ``draft`` entry point takes [the target's embedding of the last token | a
hidden state of the target's width] at the last token's position, attends over the
target's caches (those ``meta["kv_producers"]`` names for the kinds the drafter lists) and
returns (logits, the next step's hidden state). The first step takes the target's final
hidden state at the token before the last (the one that predicted it); every drafted token
is fed back the same way, at the same position. Drafts are greedy (a deterministic
drafter: exact under sampling too, by the acceptance rule).

One sequence (``propose``): the target's ``Sequences`` of that sequence, its caches holding
the context but its last token. The batching loop (``propose_rows``): all rows of the
running batch in one drafter call per drafted token, right after a step and before the
step's rejected columns are trimmed, so each row still finds every token it accepted in
the caches, also those the loop will re-feed because another row kept fewer. Rows then
end at different columns: each reads its own (``RowEnds``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .kv_cache import attention_mask
from .speculative import Draft, Drafter


class RowEnds:
    """A target cache as the drafter reads it when the batch's rows end at different columns:
    row b sees its columns [starts[b], ends[b]), within the window before ``ends[b]`` on a
    rotating cache (the keys a query at column ``ends[b] - 1`` of its own would see, as the
    one-sequence drafter's). Its layout names no stored form, so the attention takes the
    path that applies a mask rather than a kernel that ends every row at the same column."""

    layout = "row-ends"

    def __init__(self, cache: Any, starts: np.ndarray, ends: np.ndarray):
        self.cache = cache
        cols = np.arange(cache.start, cache.offset)[None]
        seen = (cols >= starts[:, None]) & (cols < ends[:, None])
        window = getattr(cache, "window", None)
        if window:
            seen &= cols > ends[:, None] - 1 - window
        self.mask = mx.array(seen[:, None, None, :])

    def read_inputs(self, q: mx.array):
        return self.cache.read_inputs(q)

    def mask_for(self, mask: mx.array | None, queries: int) -> mx.array:
        return self.mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class SharedKVDrafter(Drafter):
    """Drafts with a shared-KV drafter artifact (module docstring)."""

    name = "shared-kv"
    reads_batch = True

    def __init__(self, draft: Any, target: Any):
        spec = draft.meta.get("drafter") or {}
        if spec.get("kind") != "shared_kv":
            raise InputError("the draft model is not a drafter that reads its target's caches")
        producers = target.meta.get("kv_producers")
        if not producers:
            raise InputError("this target exposes no caches a shared-KV drafter can read "
                             f"(its family: {target.meta.get('family')})")
        if int(draft.meta["text"]["vocab_size"]) != int(target.meta["text"]["vocab_size"]) or \
                int(spec["hidden_size"]) != int(target.meta["text"]["hidden_size"]):
            raise InputError("the draft model was not made for this target (vocabulary or hidden size differ)")
        layers = {int(L["index"]): L.get("kv") or {} for L in target.kv_layers}
        self.sources: list[int | None] = []
        for kind in spec["caches"]:
            src = producers.get(kind)
            want = (spec.get("cache_shapes") or {}).get(kind)
            if want is not None:
                if src is None:
                    raise InputError(f"the draft model reads the target's {kind} cache, which it has none of")
                kv = layers.get(int(src), {})
                have = [int(kv.get("kv_heads", target.meta["text"]["num_kv_heads"])),
                        int(kv.get("head_dim", target.meta["text"]["head_dim"]))]
                if have != list(want):
                    raise InputError(f"the draft model reads {kind} caches of {want} (heads, head dim); the "
                                     f"target's are {have}")
            self.sources.append(None if src is None else int(src))
        self.vlm, self.target = draft, target
        self.entry = getattr(draft.model, spec.get("entry", "draft"))
        self.width = int(target.meta["text"]["hidden_size"])

    @dataclass
    class _State:
        seqs: Any = None
        logits: list = field(default_factory=list)   # the last draft's logits, one row per token

    def start(self, prompt_ids: Sequence[int], prompt: Any = None, target: Any = None) -> Any:
        return SharedKVDrafter._State(seqs=target)

    def _steps(self, tokens: Sequence[int], positions: mx.array, hidden: mx.array, caches: list, mask: Any,
               k: int) -> tuple[np.ndarray, list[mx.array]]:
        """k greedy drafter steps for every row: (tokens [B, k], the logits [B, V] of each step)."""
        token = mx.array(np.asarray(tokens, dtype=np.int32)[:, None])
        picks, logits_out = [], []
        for _ in range(k):
            emb = self.target.model.embed(ids=token)[..., :self.width]
            x = mx.concatenate([emb.astype(hidden.dtype), hidden], axis=-1)
            logits, hidden = self.entry(x=x, positions=positions, mask=mask, caches=caches)
            last = logits[:, -1]
            # numpy's argmax picks what MLX's does (the first of equal maxima)
            pick = np.argmax(np.asarray(last.astype(mx.float32)), axis=-1).astype(np.int32)
            picks.append(pick)
            logits_out.append(last)
            token = mx.array(pick[:, None])
        return np.stack(picks, axis=1), logits_out

    def propose(self, state: "_State", context: Sequence[int], k: int, sampler: Any = None,
                rng: np.random.Generator | None = None) -> Draft:
        seqs = state.seqs
        if seqs is None or seqs.batch != 1 or k <= 0 or len(context) < 2 or seqs.offset != len(context) - 1:
            return Draft([])
        k = min(k, self.vlm.max_context - len(context) - 1)
        if k <= 0:
            return Draft([])
        hidden = seqs.hidden_at(len(context) - 2)   # the target's state that predicted the last token
        caches = [None if s is None else seqs.caches[s] for s in self.sources]
        pos = mx.array([[len(context) - 1]], dtype=mx.int32)
        tokens, logits = self._steps([int(context[-1])], pos, hidden, caches, None, k)
        state.logits = [row[0] for row in logits]
        return Draft([int(t) for t in tokens[0]])

    def propose_rows(self, seqs: Any, tokens: Sequence[int], ends: Sequence[int], ks: Sequence[int]) -> list[list[int]]:
        """Drafts for every row of a batch at once (``Drafter.propose_rows``)."""
        k = max(ks, default=0)
        if k <= 0:
            return [[] for _ in ks]
        offset = seqs.offset
        # a row that drafts nothing reads where the caches end (it then takes no ragged path)
        ends = np.where(np.asarray(ks) > 0, np.asarray(ends, dtype=np.int64), offset)
        ends = np.maximum(ends, seqs.starts + 1)
        hidden = seqs.hidden_rows(ends - 1)          # each row's state that predicted its last token
        positions = mx.array((seqs.next_pos - offset + ends)[:, None].astype(np.int32))
        caches = [None if s is None else seqs.caches[s] for s in self.sources]
        if (ends == offset).all():  # every row ends where the caches do: the one-sequence path's reads
            mask = attention_mask(mx.array(seqs.starts, dtype=mx.int32), offset - 1, 1, bool(seqs.starts.any()))
        else:
            caches, mask = [None if c is None else RowEnds(c, seqs.starts, ends) for c in caches], None
        drafts, _ = self._steps(tokens, positions, hidden, caches, mask, k)
        return [[int(t) for t in row[:n]] for row, n in zip(drafts, ks)]
