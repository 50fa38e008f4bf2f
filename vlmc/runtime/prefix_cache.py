"""Automatic prefix caching: KV blocks of earlier prompts, reused by later ones.

A prompt is cut into blocks of ``block_size`` tokens. Block i's key hashes block i-1's key,
its token ids and the content keys of the images whose placeholder tokens fall into it
(image placeholders share one token id, so the ids alone would let two different images
match). A new prompt imports the longest run of leading blocks found, in their stored
form (any KV layout), and prefills only the rest. At least one prompt token is always
prefilled, since the logits of the last one are needed. Entries are dropped least
recently used first beyond ``max_bytes``.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import mlx.core as mx
import numpy as np

from .vision_cache import content_key, split_images


def image_spans(ids: list[int], image_token: int | None, images: Any) -> list[tuple[int, int, str]]:
    """(start, end, content key) of each image's placeholder run, in prompt order."""
    if images is None or image_token is None:
        return []
    arr = np.asarray(ids)
    where = np.flatnonzero(arr == image_token)
    spans, at = [], 0
    for image, n in zip(split_images(images), images.num_tokens):
        start = int(where[at])
        spans.append((start, start + n, content_key(image)))
        at += n
    return spans


def block_keys(ids: list[int], spans: list[tuple[int, int, str]], block_size: int, salt: str) -> list[str]:
    """One chained key per whole block of ``ids``."""
    keys, prev = [], salt.encode()
    arr = np.asarray(ids, dtype=np.int64)
    for b in range(len(ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        h = hashlib.sha256(prev)
        h.update(arr[lo:hi].tobytes())
        for start, end, key in spans:
            if start < hi and end > lo:
                h.update(f"{key}:{start}".encode())
        prev = h.digest()
        keys.append(prev.hex())
    return keys


class PrefixCache:
    def __init__(self, max_bytes: int = 1 << 30, block_size: int = 32):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.max_bytes, self.block_size = int(max_bytes), block_size
        self._blocks: OrderedDict[str, tuple[list[dict], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hit_tokens = 0
        self.miss_tokens = 0

    def lookup(self, keys: list[str], usable: int) -> list[list[dict]]:
        """Per-layer blocks of the longest cached run among the first ``usable`` keys."""
        found = []
        with self._lock:
            for key in keys[:usable]:
                entry = self._blocks.get(key)
                if entry is None:
                    break
                self._blocks.move_to_end(key)
                found.append(entry[0])
        return found

    def count(self, hit: int, total: int) -> None:
        with self._lock:
            self.hit_tokens += hit
            self.miss_tokens += total - hit

    def store(self, keys: list[str], caches: list, first: int) -> None:
        """Keep blocks ``first`` .. ``len(keys)`` of a one-sequence cache list."""
        if self.max_bytes <= 0 or first >= len(keys):
            return
        try:
            per_layer = [c.export_blocks(self.block_size, first) for c in caches]
        except ValueError:  # a rotating cache that has already dropped tokens
            return
        fresh = []
        for i, key in enumerate(keys[first:]):
            if i < len(per_layer[0]) and key not in self._blocks:
                # "* 1": a block of its own, not a view that would keep the whole cache buffer alive
                fresh.append((key, [{name: a * 1 for name, a in blocks[i].items()} for blocks in per_layer]))
        mx.eval([a for _, layers in fresh for layer in layers for a in layer.values()])
        with self._lock:
            for key, layers in fresh:
                if key in self._blocks:
                    continue
                size = sum(a.nbytes for layer in layers for a in layer.values())
                self._blocks[key] = (layers, size)
                self.bytes += size
            while self.bytes > self.max_bytes and self._blocks:
                _, (_, size) = self._blocks.popitem(last=False)
                self.bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks": len(self._blocks), "block_size": self.block_size, "bytes": self.bytes,
                    "max_bytes": self.max_bytes, "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens}
