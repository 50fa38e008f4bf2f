"""The cache of a linear-attention layer (Gated DeltaNet): a fixed-size recurrent state
[B, H, Dk, Dv] plus the last kernel-1 inputs of its causal convolution [B, K-1, C], per
sequence, whatever the number of tokens seen. The ``kv_layout`` pass plans it as the
``recurrent`` layout (bytes per sequence, not per token).

It answers the same batch interface as the KV caches (``offset``, ``pad_left``,
``drop_left``, ``select``, ``concat``, ``trim``), so ``Sequences`` steps hybrid stacks
unchanged. Left padding needs nothing here: the layer zeroes padding rows before they
reach the state (``zero_padded``), and columns put before held tokens are never read.

Rewinding cannot slice a state. Each step records the inputs it folded in (conv inputs;
keys, values, decays and rates) and its conv window before it; the state it started from
is kept only at checkpoints: the oldest record, the last step (what a verify step's
rejected drafts need back) and a step starting ``stride`` or more tokens after the previous
checkpoint. ``trim`` restores the nearest checkpoint at or before the cut and recomputes the
recurrence from there over the kept tokens, token by token, as decode would have computed
them. Records cover the last ``history`` tokens (at least the last step): a draft model
rewinds at most its 15 drafted tokens. A state is H x Dk x Dv floats per sequence (1 MiB at
16 heads of 128 x 128), so one per decode step would hold ~1 GiB per sequence over 18 such
layers in 60 steps; checkpoints hold a handful.

Prefix caching keeps a state only where a prompt's prefill stopped on a block boundary:
``snapshot`` copies one sequence's conv inputs and state there, ``import_state`` starts a
fresh cache from one. Its per-block exports are empty (a state is not per token), so the
full-attention layers' KV blocks and these snapshots make up a cached prefix together
(``runtime/prefix_cache.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..kernels.linear_attention import delta_rule_steps

@dataclass
class _Step:
    n: int
    conv_before: mx.array        # [B, K-1, C]
    rows: mx.array               # [B, n, C] conv inputs
    state_before: mx.array | None = None   # [B, H, Dk, Dv]
    k: mx.array | None = None    # [B, H, n, Dk] (heads-first, float32, as the recurrence takes them)
    v: mx.array | None = None
    g: mx.array | None = None    # [B, H, n]
    beta: mx.array | None = None

    def take(self, index: mx.array) -> "_Step":
        pick = (lambda a: a if a is None else a[index])
        return _Step(self.n, pick(self.conv_before), pick(self.rows), pick(self.state_before), pick(self.k),
                     pick(self.v), pick(self.g), pick(self.beta))


class StateCache:
    layout = "recurrent"
    history = 16   # tokens of records kept at least (a draft of up to 15 tokens, one re-fed)
    stride = 4     # tokens between kept states: a rewind recomputes at most stride - 1 tokens

    def __init__(self, batch: int, dtype=mx.float32, sizes: dict | None = None):
        """``sizes``: the plan's heads, key_dim, value_dim, conv_channels and conv_width (what
        a snapshot read back from the prefix cache must match)."""
        self.batch, self.dtype, self.sizes = batch, dtype, sizes
        self.conv: mx.array | None = None
        self.state: mx.array | None = None
        self.offset = 0          # columns seen (padding included), as the KV caches count them
        self.start = 0
        self._steps: list[_Step] = []
        self._open: _Step | None = None  # this step's conv record, until its recurrence runs

    # ---------------------------------------------------------------- what the ops call
    def conv_window(self, batch: int, width: int, channels: int, dtype) -> mx.array:
        if self.conv is None:
            return mx.zeros((batch, width, channels), dtype)
        return self.conv

    def conv_step(self, before: mx.array, rows: mx.array, after: mx.array) -> None:
        self._open = _Step(rows.shape[1], before, rows)
        self.conv = after

    def recurrent_state(self, batch: int, heads: int, k_dim: int, v_dim: int) -> mx.array:
        if self.state is None:
            return mx.zeros((batch, heads, k_dim, v_dim), mx.float32)
        return self.state

    def delta_step(self, before: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                   after: mx.array) -> None:
        step = self._open
        if step is None or step.n != k.shape[2]:
            raise RuntimeError("a recurrent cache's step must run its convolution before its recurrence")
        step.state_before, step.k, step.v, step.g, step.beta = before, k, v, g, beta
        self._open = None
        self.state = after
        self.offset += step.n
        self._steps.append(step)
        self._prune()

    def _prune(self) -> None:
        """Keep the records of at least the last ``history`` tokens (the last step always),
        from a step that kept its state on, and the states only at the checkpoints."""
        first, total = len(self._steps) - 1, self._steps[-1].n
        while first > 0 and total < self.history:
            first -= 1
            total += self._steps[first].n
        while first > 0 and self._steps[first].state_before is None:
            first -= 1
        self._steps = self._steps[first:]
        since = 0  # tokens from the previous checkpoint's start to this step's
        for i, s in enumerate(self._steps):
            if s.state_before is not None and 0 < i < len(self._steps) - 1 and since < self.stride:
                s.state_before = None
            since = s.n if s.state_before is not None else since + s.n

    # ---------------------------------------------------------------- rewinding
    @property
    def held(self) -> int:
        return self.offset - self.start

    def rewindable(self) -> int:
        return sum(s.n for s in self._steps)

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens: the states as they were before them. Returns how many
        (fewer when the records do not reach back that far: nothing is changed then)."""
        if n <= 0 or n > self.rewindable():
            return 0
        cut, start = self.rewindable() - n, 0   # the cut, in tokens from the oldest record
        for i, step in enumerate(self._steps):
            if cut < start + step.n:
                break
            start += step.n
        keep = cut - start
        before = self._start_state(step, self._steps[:i])
        del self._steps[i:]
        if keep == 0:
            self.conv, self.state = step.conv_before, before
        else:  # the cut falls inside this step: its kept tokens again, as decode ran them
            window = mx.concatenate([step.conv_before, step.rows[:, :keep]], axis=1)
            self.conv = window[:, window.shape[1] - step.conv_before.shape[1]:]
            _, self.state = delta_rule_steps(None, step.k[:, :, :keep], step.v[:, :, :keep], step.g[:, :, :keep],
                                             step.beta[:, :, :keep], before)
            self._steps.append(_Step(keep, step.conv_before, step.rows[:, :keep], before, step.k[:, :, :keep],
                                     step.v[:, :, :keep], step.g[:, :, :keep], step.beta[:, :, :keep]))
        self.offset -= n
        return n

    @staticmethod
    def _start_state(step: _Step, earlier: list[_Step]) -> mx.array:
        """The state ``step`` started from: its own record, or the last checkpoint among the
        ``earlier`` steps carried over their recorded inputs."""
        if step.state_before is not None:
            return step.state_before
        i = len(earlier) - 1
        while earlier[i].state_before is None:
            i -= 1
        run = earlier[i:]
        cat = lambda name: mx.concatenate([getattr(s, name) for s in run], axis=2)  # noqa: E731
        _, state = delta_rule_steps(None, cat("k"), cat("v"), cat("g"), cat("beta"), run[0].state_before)
        return state

    # ---------------------------------------------------------------- batch reshaping
    def pad_left(self, n: int) -> None:
        self.offset += max(n, 0)

    def drop_left(self, n: int) -> None:
        self.offset -= min(max(n, 0), self.offset)

    def select(self, rows: list[int]) -> None:
        index = mx.array(rows, dtype=mx.int32)
        if self.conv is not None:
            self.conv, self.state = self.conv[index], self.state[index]
        self._steps = [s.take(index) for s in self._steps]
        self.batch = len(rows)

    def concat(self, other: "StateCache") -> None:
        if not isinstance(other, StateCache) or other.offset != self.offset:
            raise ValueError("caches joined into one batch must be aligned and share a layout")
        if self.conv is None or other.conv is None:
            raise ValueError("only caches that hold tokens can be joined")
        self.conv = mx.concatenate([self.conv, other.conv], axis=0)
        self.state = mx.concatenate([self.state, other.state], axis=0)
        self._steps = []  # a rewind never reaches back past a join
        self.batch += other.batch

    # ---------------------------------------------------------------- prefix caching
    def export_blocks(self, block_size: int, first: int = 0, *, row: int | None = None,
                      start: int = 0) -> list[dict[str, mx.array]]:
        """One empty entry per whole block (as ``KVCache.export_blocks`` counts them): the
        state is not per token; ``snapshot`` keeps it at a boundary instead."""
        return [{} for _ in range(first, (self.offset - start) // block_size)]

    def snapshot(self, row: int) -> dict[str, mx.array]:
        """Sequence ``row``'s conv inputs [1, K-1, C] and state [1, H, Dk, Dv] now, as arrays
        of their own ("* 1": not views keeping the batch's buffers alive)."""
        if self.state is None:
            raise ValueError("a recurrent cache that has seen no tokens has no state to keep")
        return {"conv": self.conv[row:row + 1] * 1, "state": self.state[row:row + 1] * 1}

    def snapshot_spec(self) -> dict[str, tuple[tuple[int, ...], str | None]] | None:
        """The shapes and dtypes a ``snapshot`` of this cache has (None without planned sizes)."""
        z = self.sizes
        if not z:
            return None
        return {"conv": ((1, z["conv_width"], z["conv_channels"]), None),   # (the activations' dtype)
                "state": ((1, z["heads"], z["key_dim"], z["value_dim"]), str(mx.float32))}

    def import_state(self, snap: dict[str, mx.array], tokens: int) -> None:
        """Start this (empty, one-sequence) cache from a ``snapshot`` taken after ``tokens``
        tokens, as ``KVCache.import_blocks`` starts one from blocks."""
        if self.offset or self.batch != 1:
            raise ValueError("a snapshot goes into an empty cache of one sequence")
        self.conv, self.state = snap["conv"], snap["state"]   # as the prefill kept them, uncast
        self.offset = tokens
        self._steps, self._open = [], None

    def host_writable(self) -> bool:
        return False

    def write_host(self, k, v) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv, self.state) if a is not None)

    def bytes_per_token(self) -> int:
        return 0
