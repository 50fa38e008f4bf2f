"""Vision features reused across requests: an LRU keyed by image *content*.

The key is a hash of the preprocessed pixels and their patch grid (what the vision tower
actually reads; for a video also its sampled frame rate, which some families' positions
depend on and the prefix cache keys on), never a path or URL, so a changed file behind the
same name is a miss and the same picture sent twice (as a URL, then as a data URI) is a hit. Each image is encoded
and stored on its own; the towers with dynamic resolution attend within one image only, and
fixed-size towers encode each image independently, so per-image encoding computes the same
features as encoding the images together.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import mlx.core as mx
import numpy as np

from ..models.common.image_processing import ProcessedImages


def split_images(processed: ProcessedImages) -> list[ProcessedImages]:
    """One ProcessedImages per image, in order."""
    n = len(processed.num_tokens)

    def item(i: int) -> dict:
        return dict(token_ids=None if processed.token_ids is None else processed.token_ids[i:i + 1],
                    timing=None if processed.timing is None else processed.timing[i:i + 1])
    if processed.grid_thw is None:
        return [ProcessedImages(processed.pixel_values[i:i + 1], None, [processed.num_tokens[i]],
                                processed.image_sizes[i:i + 1], **item(i)) for i in range(n)]
    out, lo = [], 0
    for i in range(n):
        hi = lo + int(np.prod(processed.grid_thw[i]))
        out.append(ProcessedImages(processed.pixel_values[lo:hi], processed.grid_thw[i:i + 1],
                                   [processed.num_tokens[i]], processed.image_sizes[i:i + 1], **item(i)))
        lo = hi
    return out


def content_key(image: ProcessedImages) -> str:
    h = hashlib.sha256()
    pixels = np.ascontiguousarray(image.pixel_values)
    h.update(str((pixels.dtype.str, pixels.shape)).encode())
    h.update(pixels.data)
    if image.grid_thw is not None:
        h.update(np.ascontiguousarray(image.grid_thw, dtype=np.int64).data)
    timing = image.item_timing()[0] if len(image.num_tokens) == 1 else None
    if timing is not None:  # a video: its sampled rate can set positions (prefix-cache blocks follow this key)
        h.update(f"video:{timing['fps']!r}".encode())
    return h.hexdigest()


def image_keys(processed: ProcessedImages) -> list[str]:
    """The content key of every image of ``processed``, hashed once and kept on it."""
    if processed.content_keys is None:
        processed.content_keys = [content_key(image) for image in split_images(processed)]
    return processed.content_keys


class VisionFeatureCache:
    """At most ``max_bytes`` of image features, least recently used dropped first.
    ``max_bytes=0`` disables it (every image is encoded, and counted as a miss)."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, mx.array] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def features(self, encode: Any, processed: ProcessedImages) -> mx.array:
        """Feature rows for every image of ``processed``, in order; ``encode`` maps a
        single-image ProcessedImages to its features (``VLM.encode_images``)."""
        rows = []
        for image, key in zip(split_images(processed), image_keys(processed)):
            with self._lock:
                found = self._items.get(key)
                if found is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
            if found is None:
                found = encode(image)
                mx.eval(found)
                self._store(key, found)
            rows.append(found)
        return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)

    def _store(self, key: str, value: mx.array) -> None:
        with self._lock:
            self.misses += 1
            if value.nbytes > self.max_bytes:
                return
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}
