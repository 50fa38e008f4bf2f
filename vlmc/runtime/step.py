"""The step loop: a batch of sequences inside the compiled program.

``Sequences`` is the one place that calls the program's text entry points: the prompt's
columns through ``prefill`` (in chunks, or all at once), new tokens through ``decode``
(one per sequence) and ``verify`` (several per sequence, with the logits after each), and
``trim`` to forget the last tokens again. ``generate``/``stream_generate``, the batching
loop and ``vlmc bench`` all step through it, so positions, masks and caches are built the
same way everywhere.

All sequences share the caches' write index. Each one's first real column (its left
padding) lives in ``starts``, which the attention mask reads, and the position its next
token takes in ``next_pos``; ``join`` and ``keep`` reshape the batch for continuous
batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..kernels.step_rows import prompt_rows
from .kv_cache import KVCache, attention_mask, make_caches

PREFIX_LAYOUTS = ("dense", "rotating", "quantized", "turboquant", "recurrent")  # what the prefix cache stores
STATE_SIZES = ("heads", "key_dim", "value_dim", "conv_channels", "conv_width")


@dataclass
class PromptInputs:
    """A prompt ready for the program: embeddings [1, L, D] (image features merged in),
    rotary positions [streams, L], ``delta`` (the token after it is at L + delta) and
    ``spans``: [start, end) ranges of prompt positions that attend to each other in both
    directions (a family's image tokens, or a prefix-LM's prefix); causal everywhere else."""

    embeds: mx.array
    positions: np.ndarray
    delta: int
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Decoder:
    """What stepping needs of a loaded artifact: its generated model, the KV plan (one
    layer-table entry per decoder layer) and the shapes of its caches."""

    model: Any
    kv_layers: list[dict[str, Any]]
    kv_heads: int
    head_dim: int
    position_streams: int

    def caches(self, batch: int, dtype=mx.float32) -> list[KVCache]:
        return make_caches(self.kv_layers, batch, self.kv_heads, self.head_dim, dtype)

    def prefix_refusal(self) -> str | None:
        """Why prompt prefixes cannot be reused from the prefix cache (None when they can): a
        layer whose cache the prefix cache cannot store and check. A recurrent layer is
        stored as snapshots of its state, checked against the sizes its plan records."""
        for i, layer in enumerate(self.kv_layers):
            spec = layer.get("kv") or {}
            spec = {"layout": spec} if isinstance(spec, str) else spec
            layout = spec.get("layout", "dense")
            if layout not in PREFIX_LAYOUTS:
                return f"prefix caching is off for this model: layer {i}'s {layout!r} cache has no stored form"
            if layout == "recurrent" and not all(k in spec for k in STATE_SIZES):
                return (f"prefix caching is off for this model: layer {i}'s recurrent state has no planned sizes "
                        f"({', '.join(STATE_SIZES)}) to check a stored state against")
        return None

    def program_positions(self, positions: np.ndarray) -> mx.array:
        """[streams, B, L] positions as the program takes them ([B, L] for one stream)."""
        return mx.array(positions[0] if self.position_streams == 1 else positions, dtype=mx.int32)


class Sequences:
    def __init__(self, decoder: Decoder, caches: list[KVCache], starts: np.ndarray, next_pos: np.ndarray):
        self.decoder = decoder
        self.caches = caches
        self.starts = np.asarray(starts, dtype=np.int64)
        self.next_pos = np.asarray(next_pos, dtype=np.int64)
        self._pending: tuple[mx.array, np.ndarray] | None = None  # prompt columns not yet prefilled
        self.prefilled = 0
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(len(self.starts))]
        # the prefix cache's state snapshots: columns where a row's recurrent states are kept
        # (a prefill step ends there), and what was kept: row -> column -> one dict per such layer
        self.keep_states: list[set[int]] = [set() for _ in range(len(self.starts))]
        self.states: list[dict[int, list[dict[str, mx.array]]]] = [{} for _ in range(len(self.starts))]
        # (column of the first row, rows [B, n, D]): the final hidden states of the last
        # step, for programs whose entry points return them beside the logits (a drafter
        # that reads the target's hidden state asks ``hidden_at``)
        self.hidden: tuple[int, mx.array] | None = None

    # ------------------------------------------------------------------ making a batch
    @classmethod
    def start(cls, decoder: Decoder, prompts: list[PromptInputs]) -> "Sequences":
        """A batch whose prompts are still to be prefilled, left-padded to the longest."""
        width = max(p.embeds.shape[1] for p in prompts)
        pads = [width - p.embeds.shape[1] for p in prompts]
        embeds = [mx.pad(p.embeds, [(0, 0), (n, 0), (0, 0)]) if n else p.embeds for p, n in zip(prompts, pads)]
        positions = np.stack([np.pad(p.positions, [(0, 0), (n, 0)]) for p, n in zip(prompts, pads)], axis=1)
        seqs = cls(decoder, decoder.caches(len(prompts), embeds[0].dtype), np.array(pads),
                   np.array([p.embeds.shape[1] + p.delta for p in prompts]))
        seqs._pending = (mx.concatenate(embeds, axis=0) if len(embeds) > 1 else embeds[0], positions)
        seqs.spans = [[(a + n, b + n) for a, b in p.spans] for p, n in zip(prompts, pads)]  # in columns
        return seqs

    @classmethod
    def empty(cls, decoder: Decoder, batch: int, dtype=mx.float32) -> "Sequences":
        """Sequences with empty caches and nothing to prefill (tests and benchmarks fill the
        caches themselves and set ``next_pos``)."""
        return cls(decoder, decoder.caches(batch, dtype), np.zeros(batch), np.zeros(batch))

    @property
    def batch(self) -> int:
        return len(self.starts)

    @property
    def offset(self) -> int:
        """Columns the caches have seen (the write index, padding included)."""
        return self.caches[0].offset

    @property
    def prompt_width(self) -> int:
        return 0 if self._pending is None else self._pending[0].shape[1]

    @property
    def prompt_embeds(self) -> mx.array | None:
        """The prompt's input rows [B, W, D] (image features merged in, left-padded), while
        the batch still holds them."""
        return None if self._pending is None else self._pending[0]

    @property
    def prefill_done(self) -> bool:
        return self._pending is None or self.prefilled >= self.prompt_width

    def _mask(self, queries: int) -> mx.array | None:
        mask = attention_mask(mx.array(self.starts, dtype=mx.int32), self.offset, queries, bool(self.starts.any()))
        lo, hi = self.offset, self.offset + queries
        blocks = [(b, s, e) for b, row in enumerate(self.spans) for s, e in row if s < hi and e > lo]
        if not blocks:
            return mask
        if mask is None:
            mask = mx.broadcast_to(attention_mask(mx.zeros(1, mx.int32), lo, queries, True), (self.batch, 1, queries, hi))
        extra = np.zeros((self.batch, 1, queries, hi), dtype=bool)
        for b, s, e in blocks:  # a span's queries in this chunk see all its keys so far (the chunk covers it)
            extra[b, 0, max(s, lo) - lo:min(e, hi) - lo, s:min(e, hi)] = True
        return mask | mx.array(extra)

    def _chunk_end(self, hi: int) -> int:
        """A prefill chunk never ends inside a span: its queries need all of the span's keys."""
        for row in self.spans:
            for s, e in row:
                if s < hi < e:
                    hi = e
        return hi

    def safe_prefix(self, row: int, columns: int) -> int:
        """The longest prefix of ``columns`` prompt columns of ``row`` that ends at no span's
        inside: cached keys and values of a prefix cut inside a span would depend on the
        span's rest (the prefix cache reuses only such prefixes)."""
        for s, e in self.spans[row]:
            if s < columns < e:
                columns = s
        return columns

    # ------------------------------------------------------------------ stepping
    def skip(self, n: int) -> None:
        """The first ``n`` prompt columns are already in the caches (a prefix-cache hit)."""
        self.prefilled += n

    def prefill(self, chunk: int | None = None) -> mx.array:
        """Run the next ``chunk`` prompt columns (all of them without a chunk size): the
        logits [B, V] after the last column run; once ``prefill_done``, the next-token
        logits. A step also ends where a row's recurrent states are to be kept
        (``keep_states``), which it then snapshots."""
        embeds, positions = self._pending
        lo = self.prefilled
        hi = self.prompt_width if chunk is None else min(self.prompt_width, lo + chunk)
        hi = min(self.prompt_width, self._chunk_end(min([hi, *(c for cols in self.keep_states for c in cols if lo < c < hi)])))
        with prompt_rows():  # the prompt kernels at any chunk size (kernels/step_rows.py)
            logits = self._keep_hidden(self.decoder.model.prefill(
                embeds=embeds[:, lo:hi], positions=self.decoder.program_positions(positions[..., lo:hi]),
                mask=self._mask(hi - lo), caches=self.caches), hi)[:, -1]
        self.prefilled = hi
        kept = []
        for b, cols in enumerate(self.keep_states):
            if hi in cols:
                self.states[b][hi] = [c.snapshot(b) for c in self.caches if c.layout == "recurrent"]
                kept += [a for snap in self.states[b][hi] for a in snap.values()]
        if kept:
            mx.eval(logits, kept)
        return logits

    def _keep_hidden(self, out, end: int) -> mx.array:
        """The logits of an entry point's output; hidden states beside them are kept: one row
        per column the step ran, or the last ones only (prefill's final state), ending
        before column ``end``."""
        if isinstance(out, (tuple, list)):
            out, hidden = out
            self.hidden = (end - int(hidden.shape[1]), hidden)
        return out

    def hidden_at(self, column: int) -> mx.array:
        """The final hidden state [B, 1, D] the last step computed at this cache column."""
        if self.hidden is None:
            raise ValueError("this program's steps return no hidden states")
        first, rows = self.hidden
        if not 0 <= column - first < rows.shape[1]:
            raise ValueError(f"column {column} is not among the last step's rows ({first}..{first + rows.shape[1] - 1})")
        return rows[:, column - first:column - first + 1]

    def hidden_rows(self, columns: np.ndarray) -> mx.array:
        """[B, 1, D]: row b's final hidden state at cache column ``columns[b]`` (the last step's)."""
        if self.hidden is None:
            raise ValueError("this program's steps return no hidden states")
        first, rows = self.hidden
        at = np.asarray(columns, dtype=np.int64) - first
        if at.min() < 0 or at.max() >= rows.shape[1]:
            raise ValueError(f"columns {list(columns)} are not all among the last step's rows "
                             f"({first}..{first + rows.shape[1] - 1})")
        return rows[mx.arange(self.batch), mx.array(at.astype(np.int32))][:, None]

    def _new_positions(self, n: int) -> np.ndarray:
        pos = self.next_pos[:, None] + np.arange(n)[None]                  # [B, n]
        return np.broadcast_to(pos[None], (self.decoder.position_streams, *pos.shape))

    def decode(self, tokens: mx.array) -> mx.array:
        """One new token per sequence ([B] or [B, 1]) -> the next-token logits [B, V]."""
        ids = tokens.reshape(-1, 1).astype(mx.int32)
        first = self.offset
        logits = self._keep_hidden(self.decoder.model.decode(
            ids=ids, positions=self.decoder.program_positions(self._new_positions(1)), mask=self._mask(1),
            caches=self.caches), first + 1)[:, -1]
        self.next_pos = self.next_pos + 1
        return logits

    def verify(self, tokens: mx.array) -> mx.array:
        """Several new tokens per sequence [B, n] -> the logits after each [B, n, V]."""
        ids = tokens.astype(mx.int32)
        n = ids.shape[1]
        first = self.offset
        logits = self._keep_hidden(self.decoder.model.verify(
            ids=ids, positions=self.decoder.program_positions(self._new_positions(n)), mask=self._mask(n),
            caches=self.caches), first + n)
        self.next_pos = self.next_pos + n
        return logits

    def trim(self, n: int) -> None:
        """Forget every sequence's last ``n`` tokens (rejected drafts)."""
        for cache in self.caches:
            if cache.trim(n) != n:
                raise ValueError(f"cannot rewind {n} tokens: the caches hold fewer")
        self.next_pos = self.next_pos - n

    # ------------------------------------------------------------------ continuous batching
    def join(self, other: "Sequences") -> None:
        """Append ``other``'s sequences (prefilled) as new rows: the side with fewer columns
        is padded on the left so both share the write index."""
        ours, theirs = self.offset, other.offset
        width = max(ours, theirs)
        for mine, new in zip(self.caches, other.caches):
            mine.pad_left(width - ours)
            new.pad_left(width - theirs)
            mine.concat(new)
        self.starts = np.concatenate([self.starts + (width - ours), other.starts + (width - theirs)])
        self.next_pos = np.concatenate([self.next_pos, other.next_pos])
        self.spans = [[(s + width - ours, e + width - ours) for s, e in row] for row in self.spans] + \
            [[(s + width - theirs, e + width - theirs) for s, e in row] for row in other.spans]

    def keep(self, rows: list[int]) -> None:
        """Keep only these sequences (in this order), then cut the columns only padding holds."""
        self.starts, self.next_pos = self.starts[rows], self.next_pos[rows]
        self.spans = [self.spans[r] for r in rows]
        cut = int(self.starts.min())
        self.spans = [[(s - cut, e - cut) for s, e in row] for row in self.spans]
        for cache in self.caches:
            cache.select(rows)
            cache.drop_left(cut)
        self.starts = self.starts - cut
