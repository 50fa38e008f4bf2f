"""Per-target lowering: which op library the generated code calls, the compute dtype, and
the fast paths the target has for the layouts planned before it (``kv_layout`` runs first).

- ``cpu``: activations in float32 (MLX's CPU backend is slow in bf16/fp16), matmuls
  through ``vlmc.kernels.cpu_ops`` (compact-weight GEMV kernels for decode, float32 BLAS
  or int8 GEMM for prefill). Weights stay stored as compiled (bf16 / quantized). A
  pre-norm decoder block gets the ``decode_layer`` fast path (one C call per layer, or per
  stack of layers, and decode step) unless ``--no-fuse decode_layer``, and only when every
  layer's planned KV cache is one the fast path reads (``ir.ops.FAST_PATH_KV``); a Gated
  DeltaNet block (Qwen3.5's linear attention) gets the ``deltanet_layer`` fast path
  (``passes/deltanet_path.py``) under the same switch, and a MoE block's router, routing,
  routed and shared experts become one ``moe_block`` op (``passes/moe_path.py``), again
  under that switch.
- ``metal`` / ``cuda``: MLX's own kernels plus vlmc's GPU kernels (``vlmc.kernels.gpu_ops``:
  Metal and CUDA sources in ``vlmc/kernels/gpu/``); activations in the storage dtype.

Values typed ``"float"`` (the compute dtype to be chosen) get the target's; embedding
outputs are cast to it where the table is stored in another dtype; every value's type is
then re-inferred, so the printed program shows what the emitted code computes.
"""
from __future__ import annotations

from ..ir.core import COMPUTE, Op, Program, TensorType
from ..ir.infer import infer_types
from ..ir.ops import fast_path_reads
from .deltanet_path import deltanet_match
from .fast_path import decode_layer_match
from .moe_path import fuse_moe_blocks
from .manager import register

LIBRARIES = {"cpu": "cpu_ops", "metal": "gpu_ops", "cuda": "gpu_ops"}


def compute_dtype(target: str, storage: str) -> str:
    """The activations' dtype on ``target`` for weights stored as ``storage``."""
    return "float32" if target == "cpu" else storage


def _shared_reads(fast: Op, blk, owners: dict) -> tuple[Op | None, str]:
    """A KV-shared layer's fast path with the KV head count of the caches its layers read
    (the producers' rows in the plan), or None and why."""
    rows = [owners.get(L.get("reads")) for L in blk.layers]
    if any(r is None for r in rows):
        return None, "some of its layers read no cache-owning layer's cache"
    shapes = {(r.get("kv_heads"), r.get("head_dim")) for r in rows}
    if len(shapes) != 1 or next(iter(shapes)) != (next(iter(shapes))[0], fast.attrs["head_dim"]) \
            or not isinstance(next(iter(shapes))[0], int):
        return None, "the caches its layers read differ in shape from each other or from its heads"
    fast.attrs["kv_heads"] = next(iter(shapes))[0]
    return fast, ""


@register("lower")
def lower(prog: Program, target: str = "cpu", decode_layer: bool = True) -> tuple[Program, str]:
    if target not in LIBRARIES:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(LIBRARIES)}")
    notes = []
    if target == "cpu" and decode_layer:
        for blk in prog.blocks.values():  # MoE blocks: one op (one C call per decode step)
            if fuse_moe_blocks(blk.body):
                prog.meta.setdefault("fusions", {})["moe_block"] = \
                    prog.meta.get("fusions", {}).get("moe_block", 0) + len(blk.layers)
                notes.append(f"moe_block for the {len(blk.layers)} layers of {blk.name}")
        # the cache-owning layers' rows by decoder layer: what a layer reading another's cache reads
        owners = {L["layer"]: L for b in prog.blocks.values() for L in b.layers if "kv" in L and "layer" in L}
        for blk in prog.blocks.values():
            fast, why = decode_layer_match(blk.body)
            if fast is None and any(op.op == "gated_delta_rule" for op in blk.body.ops):
                fast, why = deltanet_match(blk.body, blk.param_shapes)
            if fast is not None and fast.attrs.get("shared"):
                fast, why = _shared_reads(fast, blk, owners)
            if fast is None:
                if any(blk.body.types[v].dtype == "kvcache" for v in blk.body.inputs):  # a decoder block
                    notes.append(f"no decode_layer fast path for {blk.name}: {why}")
                continue
            unread = [L["index"] for L in blk.layers
                      if not fast_path_reads(fast.op, L.get("kv") or owners.get(L.get("reads"), {}).get("kv", {}))]
            if unread:  # the planned caches decide: no fast path that could never fire
                blk.fast_path = None
                notes.append(f"no {fast.op} fast path: layers {unread[0]}..{unread[-1]} have KV caches it does "
                             f"not read")
                continue
            blk.fast_path = fast
            prog.meta.setdefault("fusions", {})[fast.op] = len(blk.layers)
            notes.append(f"{fast.op} fast path for {len(blk.layers)} layers")
    storage = prog.meta.get("dtype", "float32")
    compute = compute_dtype(target, storage)
    casts = 0
    for fn in [*prog.functions.values(), *(b.body for b in prog.blocks.values())]:
        for v, t in fn.types.items():
            if t.dtype == COMPUTE:
                fn.types[v] = TensorType(t.shape, compute)
        new_ops = []
        for op in fn.ops:
            new_ops.append(op)
            table = op.inputs[1] if op.op in ("embedding", "qembedding") else None
            if table is not None and table.startswith("@") and prog.params[table[1:]].dtype != compute:
                raw = op.outputs[0]
                stored = raw + "_stored"
                op.outputs[0] = stored
                fn.types[stored] = fn.types[raw]
                new_ops.append(Op("cast", [stored], [raw], {"dtype": compute}))
                casts += 1
        fn.ops = new_ops
    infer_types(prog)
    prog.meta.update(target=target, compute_dtype=compute, ops_library=LIBRARIES[target])
    summary = f"target {target}: ops from vlmc.kernels.{LIBRARIES[target]}, compute in {compute}"
    if casts:
        summary += f", {casts} casts inserted"
    return prog, "; ".join([summary, *notes])
