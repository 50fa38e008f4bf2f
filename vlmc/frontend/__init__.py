"""Checkpoint discovery: a folder or hub id -> its config, lazily opened tensors and a
content fingerprint. The family importers (``vlmc.models``) build the IR from it."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .source import read_json, resolve_source
from .tensors import TensorStore


@dataclass
class Checkpoint:
    """What a compile needs from the source besides the program: the folder, its tensors
    and a content fingerprint for the compile cache."""

    folder: Path
    config: dict[str, Any]
    store: TensorStore
    fingerprint: str


def fingerprint(folder: Path) -> str:
    """Hash of every JSON/tokenizer file's bytes plus each weight file's name, size, mtime
    and safetensors header. Cheap for multi-GB checkpoints; changes whenever a file does."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        h.update(path.name.encode())
        st = path.stat()
        if path.suffix == ".safetensors":
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
        elif st.st_size < (64 << 20):
            h.update(path.read_bytes())
    return h.hexdigest()


def open_checkpoint(src: str | os.PathLike, *, progress: bool = True) -> Checkpoint:
    folder = resolve_source(src, progress=progress)
    config = read_json(folder / "config.json")
    if config.get("model_type") in (None, "speculator_model") and config.get("speculators_model_type"):
        # a speculators drafter names its kind here (e.g. "eagle3"), the family's model type
        config = {**config, "model_type": config["speculators_model_type"]}
    return Checkpoint(folder, config, TensorStore(folder), fingerprint(folder))
