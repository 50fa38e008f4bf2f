"""Resolve a checkpoint source to a local folder: a path, or a Hugging Face hub id.

Hub ids go through huggingface_hub and its cache. When the hub is unreachable a cached
snapshot is used; when there is none, the error says so plainly.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import SourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_source(src: str | os.PathLike, *, progress: bool = True) -> Path:
    """A folder (an existing path wins), the bundled demo model's name, or a hub id."""
    path = Path(src).expanduser()
    from ..demo import MODEL_DIR, NAME
    if str(src) == NAME and not path.exists():
        path = MODEL_DIR
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{path} is a file; expected a checkpoint folder with config.json")
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
        return path.resolve()
    text = str(src)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) \
            or not HUB_ID.match(text):
        raise SourceError(f"no such checkpoint folder: {text} (a model is a folder, a hub id such as "
                          f"Qwen/Qwen2-VL-2B-Instruct, or vlmc-demo for the bundled demo model)")
    return _download(text, progress=progress)


def _download(repo_id: str, *, progress: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - declared dependency
        raise SourceError("huggingface_hub is not installed; pass a local checkpoint folder") from None
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(repo_id, allow_patterns=CHECKPOINT_PATTERNS)
    except Exception as online_error:  # network down, repo missing, gated...
        try:
            folder = snapshot_download(repo_id, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True)
        except Exception:
            reason = str(online_error).splitlines()[0] if str(online_error) else type(online_error).__name__
            raise SourceError(
                f"cannot fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache "
                f"({reason})") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SourceError(f"hub repo {repo_id!r} has no config.json")
    return path


def read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise SourceError(f"missing {path.name} in {path.parent}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object")
    return data
