"""The Python API: ``vlmc.load`` and ``vlmc.compile``."""
from __future__ import annotations

import os
from pathlib import Path

from .runtime.artifact import is_artifact, load_artifact, reject_unfinished
from .runtime.engine import VLM


def load(src: str | os.PathLike, *, dtype: str = "float32", target: str | None = None,
         progress: bool = False, **kv) -> VLM:
    """Load an artifact folder, or compile a checkpoint folder / hub id first (once: the
    artifact is cached by content, see ``vlmc.compiler.cache_dir``).

    KV-cache options (``kv_bits``, ``kv_quant_scheme``, ``kv_group_size``, ``max_kv_size``,
    ``kv_memory_budget``, ``context``, ``quantize_last``; see ``vlmc.kvplan``) re-plan an
    artifact's caches at load, or are compiled into a checkpoint's artifact."""
    from .kvplan import OPTIONS, compile_options
    unknown = set(kv) - set(OPTIONS)
    if unknown:
        raise TypeError(f"load() got unknown option(s) {sorted(unknown)}; KV options: {', '.join(OPTIONS)}")
    kv = {k: v for k, v in kv.items() if v is not None}
    if is_artifact(src):
        return VLM(load_artifact(src), kv=kv or None)
    reject_unfinished(src)
    from .compiler import compile as compile_checkpoint  # only needed for checkpoints
    return VLM(load_artifact(compile_checkpoint(src, dtype=dtype, target=target, progress=progress,
                                                **compile_options(kv))))


__all__ = ["load", "Path"]
