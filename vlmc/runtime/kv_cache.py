"""Preallocated, batch-ready KV caches, one per attention layer, in the layout the
``kv_layout`` pass planned (the artifact manifest's ``kv_plan``).

Every cache stores what its codecs (``kv_codecs``) make of each token's keys and values:
the vectors (dense), packed affine codes or TurboQuant codes. Buffers grow in steps of
``step`` tokens (a new buffer, one copy), never by concatenation per decode step. All
sequences of a batch share the write index; each sequence's own start (left padding)
lives in an array that the attention mask reads, so ragged prompts and continuous
batching need no different cache.

Every cache can ``trim`` its last tokens (speculative decoding rewinds this way) and
``export_blocks`` / ``import_blocks`` whole blocks of tokens in their stored form (prefix
caching stores them). A rotating cache exports only the blocks it still holds whole
(the prefix cache takes them after each prefill chunk, and ``keep_from`` keeps a block
the chunks have not finished yet), and an import keeps only the blocks its window can still
show a later query.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .kv_codecs import Dense, make_codec


class KVCache:
    step = 256

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype=mx.float32, k_codec=None, v_codec=None):
        self.batch, self.kv_heads, self.head_dim, self.dtype = batch, kv_heads, head_dim, dtype
        self.codecs = {"k": k_codec or Dense(dtype), "v": v_codec or Dense(dtype)}
        self.buffers: dict[str, dict[str, mx.array]] | None = None
        self.offset = 0      # tokens seen (absolute position of the next one)
        self.start = 0       # absolute position of the first token held (rotating caches drop old ones)
        self.exported = 0    # columns below this were exported (write_host never writes there)

    # ---------------------------------------------------------------- storage
    @property
    def held(self) -> int:
        return self.offset - self.start

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else next(iter(self.buffers["k"].values())).shape[2]

    @property
    def layout(self) -> str:
        return self.codecs["k"].kind

    def _rounded(self, n: int) -> int:
        """Buffer columns for ``n`` tokens: whole steps, so growth copies rarely."""
        return (n + self.step - 1) // self.step * self.step

    def _reserve(self, n: int) -> None:
        need = self.held + n
        if need <= self.capacity:
            return
        size = self._rounded(need)
        fresh = {}
        for which, codec in self.codecs.items():
            fresh[which] = {}
            for name, (width, dtype) in codec.widths(self.head_dim).items():
                buf = mx.zeros((self.batch, self.kv_heads, size, width), dtype)
                if self.buffers is not None and self.held:
                    buf[:, :, :self.held] = self.buffers[which][name][:, :, :self.held]
                fresh[which][name] = buf
        self.buffers = fresh

    def reserve(self, n: int) -> None:
        """Room for ``n`` more tokens now (one copy of the held ones if the buffers must
        grow), so that the next ``n`` appends or in-place writes move nothing."""
        if self.buffers is not None:
            self._reserve(n)

    def _write(self, which: str, parts: dict[str, mx.array]) -> None:
        n = next(iter(parts.values())).shape[2]
        for name, arr in parts.items():
            self.buffers[which][name][:, :, self.held:self.held + n] = arr

    def append(self, k: mx.array, v: mx.array) -> None:
        """Store this step's keys/values [B, Hkv, L, D]."""
        n = k.shape[2]
        self._reserve(n)
        self._write("k", self.codecs["k"].encode(k))
        self._write("v", self.codecs["v"].encode(v))
        self.offset += n

    def write_host(self, k, v) -> bool:
        """Store one step's keys/values [B, Hkv, 1, D] (float32 numpy arrays, the cpu target's
        host arrays) by writing them into a dense float32 buffer's memory in place, where no
        array can see that column: it lies past every held token, within the capacity, and
        past every block ever exported. False when that does not hold (nothing stored: the
        caller then appends). Through MLX, the slice updates cost a 28-layer 2B decoder's decode
        ~1.2 ms per step to build and ~0.7 ms to evaluate (cProfile, 2-core CPU)."""
        if k.shape[2] != 1 or self.layout != "dense" or not self.host_writable():
            return False
        kb, vb = self.buffers["k"]["x"], self.buffers["v"]["x"]
        mx.eval(kb, vb)  # pending writes first (a no-op when there are none)
        np.asarray(kb)[:, :, self.held] = k[:, :, 0]
        np.asarray(vb)[:, :, self.held] = v[:, :, 0]
        self.offset += 1
        return True

    def host_writable(self) -> bool:
        """Whether one step's keys/values may go into the buffers' memory in place at column
        ``held``: no array can see that column (it lies past every held token, within the
        capacity, past every exported block, and no oldest tokens were dropped), and the
        buffers are ones the host kernels write: dense float32, affine codes (uint8)
        with bfloat16 scales and minimums, or TurboQuant codes with float32 norms.
        write_host stores dense steps so; a kernel that wrote a step there itself then
        calls ``advance_host``."""
        if self.buffers is None or self.held + 1 > self.capacity or self.held < self.exported or not self._room():
            return False
        if self.layout == "dense":
            return self.buffers["k"]["x"].dtype == mx.float32 and self.buffers["v"]["x"].dtype == mx.float32
        if self.layout == "affine":
            return all(parts["codes"].dtype == mx.uint8 and parts["scales"].dtype == mx.bfloat16
                       and parts["biases"].dtype == mx.bfloat16 for parts in self.buffers.values())
        if self.layout == "turboquant":
            return all(parts["codes"].dtype == mx.uint8 and parts["norms"].dtype == mx.float32
                       for parts in self.buffers.values())
        return False

    def _room(self) -> bool:
        """Whether the next append writes at column ``held`` without moving held tokens."""
        return not self.start

    def advance_host(self) -> None:
        """Count the step a kernel wrote in place (see host_writable)."""
        self.offset += 1

    def parts(self, which: str) -> dict[str, mx.array]:
        """The stored form of every held token's keys (``"k"``) or values."""
        return {name: buf[:, :, :self.held] for name, buf in self.buffers[which].items()}

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store this step's keys/values; return every held key and value, decoded to the
        cache dtype (the reference attention reads these)."""
        self.append(k, v)
        return (self.codecs["k"].decode(self.parts("k"), self.dtype),
                self.codecs["v"].decode(self.parts("v"), self.dtype))

    def attention_inputs(self, q: mx.array, k: mx.array, v: mx.array):
        """Store this step's keys/values; return (q', keys, values, finish) such that
        ``finish(attention(q', keys, values))`` is attention over every held token.

        TurboQuant layouts stay in their rotated space (q·k = qR·kR for orthogonal R): q is
        rotated in and the output rotated back, so the cache is never rotated back per
        step. Every other layout decodes its held tokens (``update``)."""
        kc, vc = self.codecs["k"], self.codecs["v"]
        if not hasattr(kc, "decode_rotated"):
            keys, values = self.update(k, v)
            return q, keys, values, lambda out: out
        self.append(k, v)
        q_rot = (q.astype(mx.float32) @ kc.rotation).astype(q.dtype)
        keys = kc.decode_rotated(self.parts("k")).astype(self.dtype)
        values = vc.decode_rotated(self.parts("v")).astype(self.dtype)
        return q_rot, keys, values, lambda out: (out.astype(mx.float32) @ vc.rotation.T).astype(q.dtype)

    def read_inputs(self, q: mx.array):
        """As ``attention_inputs``, over the tokens held, storing nothing: a layer that reads
        the keys and values another layer wrote this step (KV sharing)."""
        kc, vc = self.codecs["k"], self.codecs["v"]
        if not hasattr(kc, "decode_rotated"):
            return q, kc.decode(self.parts("k"), self.dtype), vc.decode(self.parts("v"), self.dtype), lambda out: out
        q_rot = (q.astype(mx.float32) @ kc.rotation).astype(q.dtype)
        keys = kc.decode_rotated(self.parts("k")).astype(self.dtype)
        values = vc.decode_rotated(self.parts("v")).astype(self.dtype)
        return q_rot, keys, values, lambda out: (out.astype(mx.float32) @ vc.rotation.T).astype(q.dtype)

    def mask_for(self, mask: mx.array | None, queries: int) -> mx.array | None:
        """The attention mask over the held keys (the engine's mask covers all positions)."""
        return mask

    # ---------------------------------------------------------------- batch reshaping (continuous batching)
    def pad_left(self, n: int) -> None:
        """Put ``n`` empty columns before every held token, so this batch's write index
        matches a batch it is about to join (the mask hides the columns via ``starts``)."""
        if n <= 0 or self.buffers is None:
            self.offset += max(n, 0)
            return
        self._shift_right(n)
        self.offset += n

    def _shift_right(self, k: int) -> None:
        """Move the held tokens ``k`` columns right in fresh buffers (empty columns before)."""
        held = self.held
        size = self._rounded(held + k)
        for parts in self.buffers.values():
            for name, buf in parts.items():
                fresh = mx.zeros((buf.shape[0], buf.shape[1], size, buf.shape[3]), buf.dtype)
                fresh[:, :, k:k + held] = buf[:, :, :held]
                parts[name] = fresh

    def drop_left(self, n: int) -> None:
        """Forget the ``n`` oldest columns (padding no remaining sequence reads)."""
        n = min(n, self.held)
        if n <= 0:
            return
        keep = self.held - n
        for parts in self.buffers.values():
            for name, buf in parts.items():
                buf[:, :, :keep] = buf[:, :, n:n + keep]
        self.offset -= n

    def select(self, rows: list[int]) -> None:
        """Keep only these sequences (in this order)."""
        if self.buffers is not None:
            index = mx.array(rows, dtype=mx.int32)
            for parts in self.buffers.values():
                for name, buf in parts.items():
                    parts[name] = buf[index]
        self.batch = len(rows)

    def _extend_front(self, k: int) -> None:
        """Hold ``k`` more (empty) columns before the first held one (a rotating cache
        that forgot fewer columns than the batch it joins)."""
        if k <= 0:
            return
        self._shift_right(k)
        self.start -= k

    def concat(self, other: "KVCache") -> None:
        """Append ``other``'s sequences as new rows; both must share the write index."""
        if other.offset != self.offset or other.layout != self.layout:
            raise ValueError("caches joined into one batch must be aligned and share a layout")
        if self.buffers is None or other.buffers is None:
            raise ValueError("only caches that hold tokens can be joined")
        first = min(self.start, other.start)
        self._extend_front(self.start - first)
        other._extend_front(other.start - first)
        width = max(self.capacity, other.capacity)
        for which, parts in self.buffers.items():
            for name, buf in parts.items():
                theirs = other.buffers[which][name]
                parts[name] = mx.concatenate([_widen(buf, width), _widen(theirs, width)], axis=0)
        self.batch += other.batch

    # ---------------------------------------------------------------- rewinding and blocks
    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (at most those held); returns how many."""
        n = min(n, self.held)
        self.offset -= n
        return n

    def export_blocks(self, block_size: int, first: int = 0, *, row: int | None = None,
                      start: int = 0) -> list[dict[str, mx.array]]:
        """Whole blocks of ``block_size`` tokens from block ``first`` on, in stored form:
        {"k.NAME": [B, Hkv, block_size, w], "v.NAME": ...}. With ``row``, only that
        sequence's ([1, ...]), whose tokens begin at column ``start`` (its left padding).
        A rotating cache exports only blocks it still holds whole (ValueError otherwise)."""
        whole = (self.offset - start) // block_size
        if first < whole and start + first * block_size < self.start:
            raise ValueError(f"this cache no longer holds block {first} (it holds positions {self.start} on): "
                             "it can export only the blocks it still holds")
        rows = slice(None) if row is None else slice(row, row + 1)
        self.exported = max(self.exported, start + whole * block_size - self.start)  # in buffer columns
        blocks = []
        for b in range(first, whole):
            lo, hi = start + b * block_size - self.start, start + (b + 1) * block_size - self.start
            blocks.append({f"{w}.{name}": buf[rows, :, lo:hi] for w in ("k", "v")
                           for name, buf in self.buffers[w].items()})
        return blocks

    def import_blocks(self, blocks: list[dict[str, mx.array]]) -> None:
        """Append blocks made by ``export_blocks`` of a cache with the same layout."""
        for block in blocks:
            n = next(iter(block.values())).shape[2]
            self._reserve(n)
            for w in ("k", "v"):
                expected = set(self.codecs[w].widths(self.head_dim))
                got = {key.split(".", 1)[1] for key in block if key.startswith(w + ".")}
                if got != expected:
                    raise ValueError(f"block holds {sorted(got)} for {w}; this cache stores {sorted(expected)}")
                self._write(w, {name: block[f"{w}.{name}"] for name in expected})
            self.offset += n

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers."""
        if self.buffers is None:
            return 0
        return sum(buf.nbytes for parts in self.buffers.values() for buf in parts.values())

    def bytes_per_token(self) -> int:
        """Stored bytes per token over all sequences of the batch."""
        return self.batch * self.kv_heads * sum(
            width * dtype.size for codec in self.codecs.values() for width, dtype in codec.widths(self.head_dim).values())


class RotatingKVCache(KVCache):
    """A sliding window of ``window`` tokens: each query sees itself and the ``window - 1``
    tokens before it. Holds at most ``window - 1 + slack`` tokens (dropping the oldest in
    one copy when it has more), so up to ``slack`` tokens can be trimmed."""

    slack = 32

    def __init__(self, batch, kv_heads, head_dim, dtype=mx.float32, window: int = 4096, k_codec=None, v_codec=None):
        super().__init__(batch, kv_heads, head_dim, dtype, k_codec, v_codec)
        if window < 1:
            raise ValueError(f"a rotating KV window must hold at least 1 token, not {window}")
        self.window = window
        self.keep_from: int | None = None   # a position make_room keeps (a prefix-cache block not yet stored)

    def append(self, k: mx.array, v: mx.array) -> None:
        self.make_room()
        super().append(k, v)

    def make_room(self) -> None:
        """Drop the oldest tokens (those no query can see any more) where it holds more than
        ``window - 1 + slack``: what ``append`` does first, so the cpu kernels that write a
        step in place (``host_writable``) call it before they read the cache. Positions from
        ``keep_from`` on stay (during a prefill, a block the prefix cache has yet to store:
        with a window smaller than a block, a chunk would otherwise drop its first tokens)."""
        if self.held > self.window - 1 + self.slack:
            drop = self.held - (self.window - 1)
            if self.keep_from is not None and self.keep_from >= self.start:  # (below start: gone already)
                drop = min(drop, self.keep_from - self.start)
            if drop <= 0:
                return
            for parts in self.buffers.values():
                for name, buf in parts.items():
                    moved = buf[:, :, drop:self.held]
                    buf[:, :, :moved.shape[2]] = moved
            self.start += drop
            self.exported = max(0, self.exported - drop)  # exported columns moved left with the rest

    def _room(self) -> bool:
        return self.held <= self.window - 1 + self.slack  # the next append drops nothing

    def mask_for(self, mask: mx.array | None, queries: int) -> mx.array | None:
        """The step's mask over the held keys, limited to the window. The step mask is causal
        already, with a family's bidirectional spans: only the window's lower bound is added
        to it, so image tokens keep attending to each other in sliding-window layers too."""
        q_pos = mx.arange(self.offset - queries, self.offset)[:, None]
        k_pos = mx.arange(self.start, self.offset)[None, :]
        window = k_pos > q_pos - self.window
        if mask is None:
            return (window & (k_pos <= q_pos))[None, None]
        return mask[..., self.start:] & window

    def pad_left(self, n: int) -> None:
        if self.start and n > 0:  # the new columns fall among the forgotten ones: re-index only
            self.start += n
            self.offset += n
            return
        super().pad_left(n)

    def drop_left(self, n: int) -> None:
        forgotten = min(max(n, 0), self.start)  # columns already dropped: re-index only
        self.start -= forgotten
        self.offset -= forgotten
        super().drop_left(n - forgotten)

    def import_blocks(self, blocks: list[dict[str, mx.array]]) -> None:
        """As a prefill of these blocks' tokens leaves the window: blocks that end before the
        last ``window - 1`` positions (no later query sees them) are counted, not stored, and
        so is anything held before them; the rest are appended."""
        sizes = [next(iter(block.values())).shape[2] for block in blocks]
        visible = self.offset + sum(sizes) - (self.window - 1)   # the oldest position a later query sees
        skip, end = 0, self.offset
        while skip < len(blocks) and end + sizes[skip] <= visible:
            end += sizes[skip]
            skip += 1
        if skip:
            self.offset = self.start = end
        super().import_blocks(blocks[skip:])

    def trim(self, n: int) -> int:
        if self.start and n > self.held - (self.window - 1):
            raise ValueError(f"a rotating cache can rewind only {self.held - (self.window - 1)} tokens now, not {n}")
        return super().trim(n)


def _widen(buf: mx.array, width: int) -> mx.array:
    if buf.shape[2] == width:
        return buf
    return mx.pad(buf, [(0, 0), (0, 0), (0, width - buf.shape[2]), (0, 0)])


def make_caches(plan: list[dict] | int, batch: int, kv_heads: int, head_dim: int,
                dtype=mx.float32) -> list[KVCache]:
    """One cache per layer of ``plan`` (the manifest's ``kv_plan`` layer entries, each with a
    ``kv`` layout), or ``plan`` dense caches when given a layer count. A ``recurrent``
    layer (linear attention) gets a ``StateCache``. A layer whose ``kv`` names its own
    ``kv_heads`` / ``head_dim`` (a decoder whose global layers have other head sizes)
    gets those instead of the decoder's."""
    if isinstance(plan, int):
        return [KVCache(batch, kv_heads, head_dim, dtype) for _ in range(plan)]
    caches: list[KVCache] = []
    for i, layer in enumerate(plan):
        spec = layer.get("kv", "dense")
        spec = {"layout": spec} if isinstance(spec, str) else spec
        if spec.get("layout") == "recurrent":  # a linear-attention layer: a state, not keys and values
            from .state_cache import StateCache
            caches.append(StateCache(batch, dtype, sizes=spec))
            continue
        heads, dim = int(spec.get("kv_heads", kv_heads)), int(spec.get("head_dim", head_dim))
        codecs = dict(k_codec=make_codec(spec, "k", dim, dtype, i), v_codec=make_codec(spec, "v", dim, dtype, i))
        if spec.get("window"):
            caches.append(RotatingKVCache(batch, heads, dim, dtype, window=int(spec["window"]), **codecs))
        else:
            caches.append(KVCache(batch, heads, dim, dtype, **codecs))
    return caches


def attention_mask(starts: mx.array, offset: int, length: int, padded: bool) -> mx.array | None:
    """Boolean mask [B, 1, L, offset+L]: causal over the cache, and blind to each sequence's
    left padding (keys before ``starts[b]``). None when nothing needs masking (a single
    decode step and no sequence is padded)."""
    total = offset + length
    if length == 1 and not padded:
        return None
    q = mx.arange(offset, total)[:, None]
    k = mx.arange(total)[None, :]
    causal = k <= q                                        # [L, S]
    valid = k[None] >= starts.reshape(-1, 1, 1)            # [B, 1, S]
    return (causal[None] & valid)[:, None]
