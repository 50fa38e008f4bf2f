"""Automatic prefix caching: KV blocks of earlier prompts, reused by later ones.

A prompt is cut into blocks of ``block_size`` tokens. Block i's key hashes block i-1's key,
its token ids and the content keys of the images whose placeholder tokens fall into it
(image placeholders share one token id, so the ids alone would let two different images
match). A new prompt imports the longest run of leading blocks found, in their stored
form (any KV layout), and prefills only the rest. At least one prompt token is always
prefilled, since the logits of the last one are needed. Entries are dropped least
recently used first beyond ``max_bytes``; with a disk folder they go there instead (and
every block goes there on ``flush``), so a later lookup, or a restarted server with the same
model and KV layout, can still use them.

Sliding-window (rotating) layers: the batching loop stores the blocks each prefill chunk
completed right after that chunk, when the window surely holds them (the chunk plus at
least ``window - 1`` tokens before it, and, for a window smaller than a block, the start
of the block a chunk left unfinished: ``RotatingKVCache.keep_from``). A block holds every
layer's part, sliding ones included, since any block may end a later prompt's shared
prefix; an import keeps in a rotating cache only the blocks its window still shows.

Layers whose cache is a recurrent state (linear attention) have nothing per token: their
part of a block is empty, and their state is kept as a snapshot at a block boundary, an
entry of its own under that block's key plus ``STATE``, holding each such layer's state
and convolution inputs after the block. A prefix of n blocks is reusable when blocks
0..n-1 are cached and so is the snapshot after block n-1. Snapshots cost a fixed size per
boundary (all recurrent layers' states: often more than many blocks of KV), so the batching
loop keeps them only where a later prompt can start: after a prompt's last whole block
(a repeated prompt, a next turn), where a prompt left a cached run of blocks (the branch
point of prompts sharing a start), and every ``state_every`` blocks if that is set.

A block read back from disk is trusted only if it proves itself: its file's metadata holds a
SHA-256 of its arrays and their names, shapes and dtypes, checked on load, and the block must
have the shapes and dtypes the cache it goes into stores (``block_spec``). One that fails is
deleted and counted (``corrupt_blocks``), and the prompt is prefilled instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path
from collections import OrderedDict
from typing import Any

import mlx.core as mx
import numpy as np

from .vision_cache import image_keys


def image_spans(ids: list[int], image_token: int | tuple[int, ...] | None, images: Any) -> list[tuple[int, int, str]]:
    """(start, end, content key) of each image's (or video's) placeholder run, in prompt order;
    ``image_token``: the placeholder id, or all of them (images and videos)."""
    if images is None or image_token is None or (isinstance(image_token, tuple) and not image_token):
        return []
    arr = np.asarray(ids)
    where = np.flatnonzero(np.isin(arr, np.asarray(image_token)))
    spans, at = [], 0
    for key, n in zip(image_keys(images), images.num_tokens):
        start = int(where[at])
        spans.append((start, start + n, key))
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


Spec = dict[str, tuple[tuple[int, ...], str | None]]   # array name -> (shape, dtype or None: any) per layer
FORMAT = "vlmc-prefix-block-1"
STATE = "-state"   # a block key + this: the recurrent layers' snapshot after that block


def block_spec(cache: Any, block_size: int) -> Spec | None:
    """The arrays one block of ``cache`` holds (``KVCache.export_blocks``' names), with
    their shapes and dtypes; None for a cache that does not say."""
    codecs = getattr(cache, "codecs", None)
    if codecs is None:
        return None
    return {f"{w}.{name}": ((1, cache.kv_heads, block_size, width), str(dtype))
            for w, codec in codecs.items() for name, (width, dtype) in codec.widths(cache.head_dim).items()}


def _fits(layers: list[dict], expect: list[Spec | None]) -> bool:
    if len(layers) != len(expect):
        return False
    for layer, spec in zip(layers, expect):
        if spec is None:
            continue
        if set(layer) != set(spec):
            return False
        if any(tuple(layer[n].shape) != shape or (dtype is not None and str(layer[n].dtype) != dtype)
               for n, (shape, dtype) in spec.items()):
            return False
    return True


def _describe(arrays: dict[str, mx.array]) -> tuple[str, str]:
    """(JSON of each array's shape and dtype, SHA-256 over names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    shapes = {}
    for name in sorted(arrays):
        a = arrays[name]
        shapes[name] = [list(a.shape), str(a.dtype)]
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(bytes(memoryview(a)))
    return json.dumps(shapes, sort_keys=True), h.hexdigest()


def _header_sound(path: Path) -> bool:
    """Whether a safetensors file's header parses and its tensors lie inside the file
    (checked before MLX reads it, so a damaged length cannot ask for gigabytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 1 << 24):
                return False
            header = json.loads(f.read(n))
        data = size - 8 - n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            lo, hi = entry["data_offsets"]
            if not 0 <= lo <= hi <= data:
                return False
        return isinstance(header.get("__metadata__"), dict)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


class DiskTier:
    """Blocks as safetensors files (one per block, written atomically), oldest-used
    files deleted beyond ``max_bytes``. A file that does not load, or whose checksum or
    shapes do not match its metadata, is deleted and counted, not used."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 10 << 30):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, layers: list[dict]) -> None:
        if self.has(key):
            return
        arrays = {f"{i}.{name}": a for i, layer in enumerate(layers) for name, a in layer.items()}
        shapes, digest = _describe(arrays)
        tmp = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.safetensors"
        try:
            mx.save_safetensors(str(tmp), arrays, metadata={"format": FORMAT, "key": key, "arrays": shapes,
                                                            "sha256": digest, "layers": str(len(layers))})
            os.replace(tmp, self._path(key))
        except OSError:  # a full or read-only disk costs the cache, never the request
            tmp.unlink(missing_ok=True)
            return
        self._trim()

    def get(self, key: str) -> list[dict] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            if not _header_sound(path):
                raise ValueError("damaged header")
            arrays, meta = mx.load(str(path), return_metadata=True)
            mx.eval(list(arrays.values()))
            shapes, digest = _describe(arrays)
            if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("sha256") != digest \
                    or json.loads(meta.get("arrays", "null")) != json.loads(shapes):
                raise ValueError("checksum or shapes differ from the block's metadata")
            count = int(meta["layers"]) if "layers" in meta else None   # (files written before it was recorded)
            layers: dict[int, dict] = {i: {} for i in range(count or 0)}
            for name, a in arrays.items():
                i, part = name.split(".", 1)
                layers.setdefault(int(i), {})[part] = a
            if sorted(layers) != list(range(len(layers))) or (count is not None and len(layers) != count):
                raise ValueError("layers missing")
            os.utime(path)
        except Exception:  # noqa: BLE001 - whatever is wrong with the file, it is not served
            self.drop(key)
            return None
        self.hits += 1
        return [layers[i] for i in sorted(layers)]

    def drop(self, key: str) -> None:
        """Delete a block found damaged (or not fitting the model) and count it."""
        self.corrupt += 1
        self._path(key).unlink(missing_ok=True)

    def _trim(self) -> None:
        files = []
        for f in self.folder.glob("*.safetensors"):
            if not f.name.startswith("."):
                try:
                    st = f.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.glob("*.safetensors") if not f.name.startswith("."))


class PrefixCache:
    def __init__(self, max_bytes: int = 1 << 30, block_size: int = 32, disk: DiskTier | None = None,
                 state_every: int = 0):
        """``state_every``: also keep recurrent snapshots every this many blocks of a prompt
        (0: only at prompt ends and branch points)."""
        if block_size < 1 or state_every < 0:
            raise ValueError("block_size must be >= 1 and state_every >= 0")
        self.max_bytes, self.block_size, self.disk = int(max_bytes), block_size, disk
        self.state_every = int(state_every)
        self.state_entries = 0
        self.state_bytes = 0
        self.state_bytes_per_snapshot = 0
        self._blocks: OrderedDict[str, tuple[list[dict], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.corrupt_blocks = 0

    def lookup(self, keys: list[str], usable: int, expect: list[Spec | None] | None = None) -> list[list[dict]]:
        """Per-layer blocks of the longest cached run among the first ``usable`` keys
        (memory first, then the disk tier, whose blocks come back into memory). With
        ``expect`` (one ``block_spec`` per layer), a block of other shapes or dtypes ends
        the run and is dropped from both tiers."""
        found = []
        for key in keys[:usable]:
            with self._lock:
                entry = self._blocks.get(key)
                if entry is not None:
                    self._blocks.move_to_end(key)
            layers = entry[0] if entry is not None else (self.disk.get(key) if self.disk else None)
            if layers is None:
                break
            if expect is not None and not _fits(layers, expect):
                self.discard([key])
                with self._lock:
                    self.corrupt_blocks += 1
                break
            if entry is None:
                self._insert([(key, layers)])
            found.append(layers)
        return found

    def lookup_state(self, key: str, expect: list[Spec | None] | None = None) -> list[dict] | None:
        """The recurrent layers' snapshot after the block of ``key`` (memory, then disk), or
        None; one not matching ``expect`` is dropped and counted."""
        key += STATE
        with self._lock:
            entry = self._blocks.get(key)
            if entry is not None:
                self._blocks.move_to_end(key)
        layers = entry[0] if entry is not None else (self.disk.get(key) if self.disk else None)
        if layers is None:
            return None
        if expect is not None and not _fits(layers, expect):
            self.discard([key])
            with self._lock:
                self.corrupt_blocks += 1
            return None
        if entry is None:
            self._insert([(key, layers)])
        return layers

    def store_states(self, keys: list[str], snapshots: dict[int, list[dict]]) -> None:
        """Keep snapshots taken after ``n`` blocks ({n: one dict per recurrent layer}) under
        the key of block n-1."""
        if self.max_bytes <= 0:
            return
        fresh = [(keys[n - 1] + STATE, snap) for n, snap in sorted(snapshots.items())
                 if 0 < n <= len(keys) and keys[n - 1] + STATE not in self._blocks]
        mx.eval([a for _, layers in fresh for layer in layers for a in layer.values()])
        self._insert(fresh)

    def _count(self, key: str, size: int, sign: int) -> None:
        """Bookkeeping of one entry coming (+1) or going (-1); the lock is held."""
        self.bytes += sign * size
        if key.endswith(STATE):
            self.state_entries += sign
            self.state_bytes += sign * size
            self.state_bytes_per_snapshot = size

    def discard(self, keys: list[str]) -> None:
        """Forget these blocks in memory and on disk."""
        with self._lock:
            for key in keys:
                entry = self._blocks.pop(key, None)
                if entry is not None:
                    self._count(key, entry[1], -1)
        if self.disk is not None:
            for key in keys:
                if self.disk.has(key):
                    self.disk.drop(key)

    def count(self, hit: int, total: int) -> None:
        with self._lock:
            self.hit_tokens += hit
            self.miss_tokens += total - hit

    def store(self, keys: list[str], caches: list, first: int, *, row: int = 0, start: int = 0) -> int:
        """Keep the whole blocks from ``first`` on that sequence ``row`` of a cache list holds
        now, whose tokens begin at column ``start`` (left padding of a batch prefilled
        together); returns the block to store from next time. The batching loop calls it
        after every prefill chunk, while a sliding window still holds the blocks the chunk
        completed. A block some cache no longer holds ends the run for good (``len(keys)``):
        later blocks' keys chain through it, so no lookup could reach them."""
        if self.max_bytes <= 0 or first >= len(keys):
            return first
        try:
            per_layer = [c.export_blocks(self.block_size, first, row=row, start=start) for c in caches]
        except ValueError:  # a rotating cache dropped part of a block (no keep_from held it)
            return len(keys)
        count = min([len(keys) - first, *(len(blocks) for blocks in per_layer)])
        fresh = []
        for i, key in enumerate(keys[first:first + count]):
            if key not in self._blocks:
                # "* 1": a block of its own, not a view that would keep the whole cache buffer alive
                fresh.append((key, [{name: a * 1 for name, a in blocks[i].items()} for blocks in per_layer]))
        mx.eval([a for _, layers in fresh for layer in layers for a in layer.values()])
        self._insert(fresh)
        return first + count

    def _insert(self, entries: list[tuple[str, list[dict]]]) -> None:
        evicted = []
        with self._lock:
            for key, layers in entries:
                if key in self._blocks:
                    continue
                size = sum(a.nbytes for layer in layers for a in layer.values())
                self._blocks[key] = (layers, size)
                self._count(key, size, 1)
            while self.bytes > self.max_bytes and self._blocks:
                key, (layers, size) = self._blocks.popitem(last=False)
                self._count(key, size, -1)
                evicted.append((key, layers))
        if self.disk is not None:
            for key, layers in evicted:
                self.disk.put(key, layers)

    def flush(self) -> None:
        """Write every block held in memory to the disk tier (at shutdown)."""
        if self.disk is None:
            return
        with self._lock:
            entries = [(key, layers) for key, (layers, _) in self._blocks.items()]
        for key, layers in entries:
            self.disk.put(key, layers)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = self.state_entries = self.state_bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {"blocks": len(self._blocks) - self.state_entries, "block_size": self.block_size, "bytes": self.bytes,
                   "max_bytes": self.max_bytes, "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens,
                   "corrupt_blocks": self.corrupt_blocks}
            if self.state_entries or self.state_bytes_per_snapshot:  # a model with recurrent layers
                out.update(state_snapshots=self.state_entries, state_bytes=self.state_bytes,
                           state_bytes_per_snapshot=self.state_bytes_per_snapshot, state_every=self.state_every)
        if self.disk is not None:
            out.update(disk_bytes=self.disk.bytes(), disk_max_bytes=self.disk.max_bytes, disk_hits=self.disk.hits,
                       disk_corrupt_blocks=self.disk.corrupt)
        return out
