"""Reused memory for the host path's large intermediate arrays.

Prefill and vision run op by op on numpy arrays (``host=True``), each op writing a fresh
result: a vision layer of 17 SmolVLM tiles makes arrays of 53-214 MB. Memory that large
comes from the kernel (mmap) on every allocation and goes back on every free, so each op
first takes page faults on all of its output (the kernel zeroes and maps every page). On
the 2-core VM these benchmarks run on, that was a quarter of the vision tower's CPU time
(8.8-11 s of system time for 17 tiles). malloc's own reuse stops at 32 MB.

``empty`` hands out views of buffers it keeps, a buffer being free again once no array
uses it any more: numpy views keep their owner alive, so an owner whose only references
are the pool's is free (``sys.getrefcount``). Arrays below ``MIN_BYTES`` come from numpy as
usual. The pool keeps at most ``VLMC_HOST_POOL_MB`` megabytes of buffers (default: an
eighth of physical memory, at most 4096; 0 turns it off); past that, free buffers are
dropped oldest first, or the array is an ordinary one.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

MIN_BYTES = 4 << 20
# A free buffer serves a request of at least this share of its size (less would hold on
# to memory a bigger request needs).
MIN_FILL = 0.6


def _default_limit() -> int:
    env = os.environ.get("VLMC_HOST_POOL_MB")
    if env is not None and env.strip():
        try:
            return max(0, int(env)) << 20
        except ValueError:
            raise ValueError(f"VLMC_HOST_POOL_MB must be a whole number of megabytes, not {env!r}") from None
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return min(4096 << 20, phys // 8)


class Pool:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._bufs: list[np.ndarray] = []   # owners (uint8, 1-D), oldest first
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    @property
    def held_bytes(self) -> int:
        return sum(b.nbytes for b in self._bufs)

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """An uninitialized C-contiguous array, like ``np.empty(shape, dtype)``."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        n = dtype.itemsize
        for d in shape:
            n *= d
        if n < MIN_BYTES or self.limit <= 0:
            return np.empty(shape, dtype)
        with self._lock:
            buf = self._take(n)
            if buf is None:
                buf = self._add(n)
                if buf is None:
                    return np.empty(shape, dtype)
        return buf[:n].view(dtype).reshape(shape)

    def _take(self, n: int) -> np.ndarray | None:
        best = None
        for buf in self._bufs:
            # refs: the list's, the loop variable's, getrefcount's argument: nothing else
            if n <= buf.nbytes and n >= MIN_FILL * buf.nbytes and sys.getrefcount(buf) == 3:
                if best is None or buf.nbytes < best.nbytes:
                    best = buf
        if best is not None:
            self.reused += 1
        return best

    def _add(self, n: int) -> np.ndarray | None:
        if n > self.limit:
            return None
        held = self.held_bytes
        if held + n > self.limit:
            keep = []
            for buf in self._bufs:  # oldest first
                if held + n > self.limit and sys.getrefcount(buf) == 3:
                    held -= buf.nbytes
                else:
                    keep.append(buf)
            self._bufs = keep
            if held + n > self.limit:
                return None
        buf = np.empty(n, np.uint8)
        self._bufs.append(buf)
        self.allocated += 1
        return buf

    def clear(self) -> None:
        """Drop every buffer (arrays still in use keep theirs alive)."""
        with self._lock:
            self._bufs = []


pool = Pool(_default_limit())
empty = pool.empty


def contiguous(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype)``, a copy (when one is needed) in pooled memory."""
    if a.flags.c_contiguous and a.dtype == dtype:
        return a
    out = empty(a.shape, dtype)
    np.copyto(out, a, casting="unsafe" if a.dtype != dtype else "no")
    return out
