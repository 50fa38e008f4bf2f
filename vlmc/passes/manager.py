"""Pass registry, presets, and the runner that verifies and records every pass.

A pass is ``fn(program, **options) -> (program, summary)``: pure (it returns a new
Program), and what it did goes into ``program.history`` and so into the manifest.
"""
from __future__ import annotations

from typing import Any, Callable

from ..ir.core import Program
from ..ir.verify import verify

PassFn = Callable[..., tuple[Program, str]]
PASSES: dict[str, PassFn] = {}

# Presets name an ordered list of passes; options come from the compile call.
PRESETS: dict[str, list[str]] = {
    "none": [],
    "default": ["fuse", "cleanup", "fold_transforms", "storage_dtype", "quantize", "lower", "kv_layout"],
}


def register(name: str):
    def deco(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        return fn
    return deco


def run_passes(prog: Program, names: list[str], options: dict[str, dict[str, Any]] | None = None) -> Program:
    options = options or {}
    verify(prog)
    for name in names:
        if name not in PASSES:
            raise ValueError(f"unknown pass {name!r}; known: {', '.join(sorted(PASSES))}")
        opts = options.get(name, {})
        prog, summary = PASSES[name](prog.clone(), **opts)
        verify(prog)
        prog.history.append({"name": name, "options": opts, "summary": summary})
    return prog


from . import cleanup, dtype, fuse, kv_layout, lower, quantize  # noqa: E402,F401  (register the built-in passes)
