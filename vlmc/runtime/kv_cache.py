"""Preallocated, batch-ready KV caches.

Buffers grow in steps of ``step`` tokens (a new buffer, one copy) and are never
concatenated per decode step. All sequences of a batch share the write index; each
sequence's own start (left padding) lives in an array that the attention mask reads,
so ragged prompts and, later, continuous batching need no different cache.
"""
from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype=mx.float32):
        self.batch, self.kv_heads, self.head_dim, self.dtype = batch, kv_heads, head_dim, dtype
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _reserve(self, n: int) -> None:
        need = self.offset + n
        if need <= self.capacity:
            return
        size = ((need + self.step - 1) // self.step) * self.step
        shape = (self.batch, self.kv_heads, size, self.head_dim)
        keys, values = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
        if self.keys is not None and self.offset:
            keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
            values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = keys, values

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write this step's keys/values [B, Hkv, L, D]; return everything cached so far."""
        n = k.shape[2]
        self._reserve(n)
        self.keys[:, :, self.offset: self.offset + n] = k.astype(self.dtype)
        self.values[:, :, self.offset: self.offset + n] = v.astype(self.dtype)
        self.offset += n
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (speculative decoding rewinds this way)."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.nbytes


def make_caches(n_layers: int, batch: int, kv_heads: int, head_dim: int, dtype=mx.float32) -> list[KVCache]:
    return [KVCache(batch, kv_heads, head_dim, dtype) for _ in range(n_layers)]


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
