"""The served models: one resident at a time, others swapped in when a request names them.

Each resident model owns a generation loop (``runtime.batcher.Batcher``) and a vision
feature cache. A swap waits for the resident model's requests to finish, shuts its loop
down and frees it before loading the next one, so two models never share the memory.
"""
from __future__ import annotations

import asyncio
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime import memory
from ..runtime.batcher import Batcher
from ..runtime.engine import VLM
from ..runtime.prefix_cache import DiskTier, PrefixCache
from ..runtime.vision_cache import VisionFeatureCache


class UnknownModel(Exception):
    pass


def model_id(source: str) -> str:
    """The id clients use: a hub id as given, a folder by its name."""
    from ..demo import MODEL_DIR
    path = Path(source).expanduser()
    if path.exists() and path.resolve() == MODEL_DIR.resolve():
        return "vlmc-demo"
    return path.name if path.exists() else source


@dataclass
class Resident:
    id: str
    vlm: VLM
    batcher: Batcher
    vision_cache: VisionFeatureCache
    prefix_cache: PrefixCache
    loaded_at: float = field(default_factory=time.time)
    _grammar: Any = None

    def grammar(self):
        """The model's grammar compiler for constrained decoding, built on first use."""
        if self._grammar is None:
            from ..runtime.constrained import GrammarCompiler
            self._grammar = GrammarCompiler(self.vlm.tokenizer, int(self.vlm.meta["text"]["vocab_size"]),
                                            set(self.vlm.eos_ids))
        return self._grammar


class Models:
    def __init__(self, sources: list[str], *, load_options: dict[str, Any] | None = None,
                 max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512, prefill_batch_tokens: int = 2048,
                 vision_cache_bytes: int = 512 * 2**20, prefix_cache_bytes: int = 2**30, prefix_block_size: int = 32,
                 prefix_cache_dir: str | None = None, prefix_cache_disk_bytes: int = 10 * 2**30,
                 prefix_state_every: int = 0):
        if not sources:
            raise ValueError("at least one model source is needed")
        self.sources = {model_id(s): s for s in sources}
        self.default = model_id(sources[0])
        self.load_options = load_options or {}
        self.batch_options = dict(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                  prefill_batch_tokens=prefill_batch_tokens)
        self.vision_cache_bytes = vision_cache_bytes
        self.prefix_cache_bytes, self.prefix_block_size = prefix_cache_bytes, prefix_block_size
        self.prefix_cache_dir, self.prefix_cache_disk_bytes = prefix_cache_dir, prefix_cache_disk_bytes
        self.prefix_state_every = prefix_state_every
        self.resident: Resident | None = None
        self._lock = asyncio.Lock()
        self.loads = 0

    def listing(self) -> list[str]:
        return list(self.sources)

    def _load(self, mid: str) -> Resident:
        from ..api import load
        vlm = load(self.sources[mid], **self.load_options)
        cache = VisionFeatureCache(self.vision_cache_bytes)
        disk = DiskTier(self.prefix_cache_dir, self.prefix_cache_disk_bytes) if self.prefix_cache_dir else None
        prefix = PrefixCache(self.prefix_cache_bytes, self.prefix_block_size, disk, state_every=self.prefix_state_every)
        batcher = Batcher(vlm, vision_cache=cache, prefix_cache=prefix, speculation=vlm.speculation,
                          **self.batch_options)
        self.loads += 1
        return Resident(mid, vlm, batcher, cache, prefix)

    def load_now(self, mid: str | None = None) -> Resident:
        """Load synchronously (at startup, before serving)."""
        self.resident = self._load(mid or self.default)
        return self.resident

    async def get(self, requested: str | None) -> Resident:
        mid = requested or (self.resident.id if self.resident else self.default)
        if mid not in self.sources:
            raise UnknownModel(mid)
        current = self.resident
        if current is not None and current.id == mid and current.batcher.alive:
            return current
        async with self._lock:
            current = self.resident
            if current is not None and current.id == mid and current.batcher.alive:
                return current
            if current is not None:
                while current.batcher.alive and not current.batcher.idle():  # let its requests finish first
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(self._free)
            self.resident = await asyncio.to_thread(self._load, mid)
            return self.resident

    def close(self) -> None:
        """At server shutdown: stop the loop and keep the prefix cache on disk."""
        self._free()

    async def unload(self) -> str | None:
        async with self._lock:
            gone = self.resident.id if self.resident else None
            await asyncio.to_thread(self._free)
            return gone

    def _free(self) -> None:
        resident, self.resident = self.resident, None
        if resident is None:
            return
        resident.batcher.shutdown()
        resident.vision_cache.clear()
        resident.prefix_cache.flush()  # to the disk tier, if there is one
        resident.prefix_cache.clear()
        del resident
        gc.collect()
        memory.release()


def resident_memory_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
