"""One importer per model family, registered by config.json ``model_type``."""
from __future__ import annotations

from typing import Any, Callable

from ...ir.core import Program
from ..weights import Weights
from .llava import import_llava
from .qwen2_vl import import_qwen2_vl

Importer = Callable[[dict[str, Any], Weights, str], Program]

IMPORTERS: dict[str, Importer] = {
    "qwen2_vl": import_qwen2_vl,
    "qwen2_5_vl": import_qwen2_vl,
    "llava": import_llava,
}
