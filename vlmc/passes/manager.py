"""Pass registry, presets, and the runner that verifies and records every pass.

A pass is ``fn(program, **options) -> (program, summary)``: pure (it returns a new
Program), and what it did goes into ``program.history`` and so into the manifest.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Callable

from ..ir.core import Program
from ..ir.verify import verify

PassFn = Callable[..., tuple[Program, str]]
PASSES: dict[str, PassFn] = {}

# Presets name an ordered list of passes; options come from the compile call.
PRESETS: dict[str, list[str]] = {
    "none": [],
    "default": ["fuse", "cleanup", "fold_transforms", "storage_dtype", "pad_hidden", "quantize", "kv_layout",
                "lower"],
}
# The passes a KV re-plan at load runs again, on the program saved before them.
PLAN_PASSES = ("kv_layout", "lower")


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
        prog.history.append({"name": name, "options": _recorded(opts), "summary": summary})
    return prog


def _recorded(opts: dict[str, Any]) -> dict[str, Any]:
    """Options as the manifest records them (typed options as their non-default fields)."""
    out = {}
    for k, v in opts.items():
        out[k] = v.changed() if hasattr(v, "changed") else asdict(v) if is_dataclass(v) else v
    return out

