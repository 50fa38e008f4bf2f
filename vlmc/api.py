"""The Python API: ``vlmc.load`` and ``vlmc.compile``."""
from __future__ import annotations

import os
from pathlib import Path

from .runtime.artifact import is_artifact, load_artifact, reject_unfinished
from .runtime.engine import VLM


def load(src: str | os.PathLike, *, dtype: str = "float32", target: str | None = None,
         progress: bool = False) -> VLM:
    """Load an artifact folder, or compile a checkpoint folder / hub id first (once: the
    artifact is cached by content, see ``vlmc.compiler.cache_dir``)."""
    if is_artifact(src):
        return VLM(load_artifact(src))
    reject_unfinished(src)
    from .compiler import compile as compile_checkpoint  # only needed for checkpoints
    return VLM(load_artifact(compile_checkpoint(src, dtype=dtype, target=target, progress=progress)))


__all__ = ["load", "Path"]
