"""The ``kv_layout`` pass: plans every decoder layer's KV-cache layout (``vlmc.kvplan``)
into the text block's layer table (``kv`` entries, which the runtime's caches follow)
and the manifest's ``meta.kv_plan`` (bytes per token per layer and in total)."""
from __future__ import annotations

from ..ir.core import Program
from ..kvplan import plan
from .manager import register


@register("kv_layout")
def kv_layout(prog: Program, **options) -> tuple[Program, str]:
    blk = prog.blocks.get("text_layer")
    if blk is None:
        return prog, "no decoder block: nothing to plan"
    text = prog.meta["text"]
    specs, summary_meta, summary = plan(
        blk.layers, kv_heads=text["num_kv_heads"], head_dim=text["head_dim"],
        compute=prog.meta.get("compute_dtype", prog.meta.get("dtype", "float32")),
        max_context=text["max_position_embeddings"], **options)
    for layer, spec in zip(blk.layers, specs):
        layer["kv"] = spec
    prog.meta["kv_plan"] = summary_meta
    return prog, summary
