"""Handing memory the process no longer uses back to the system (a server going idle,
a model unloaded)."""
from __future__ import annotations

import ctypes

import mlx.core as mx


def _malloc_trim():
    """glibc's malloc_trim, or None (other C libraries). Looked up among the symbols the
    process already has (ctypes.util.find_library would run ldconfig at import)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_trim = _malloc_trim()


def release() -> None:
    """MLX's cache of freed buffers and, on glibc, the heap's free pages: the cpu target's
    activations are numpy arrays and kernel buffers from malloc, whose freed pages otherwise
    stay resident (a server's RSS then wanders by several MB between bursts)."""
    mx.clear_cache()
    if _trim is not None:
        _trim(0)
