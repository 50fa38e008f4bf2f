"""Per-target lowering: which op library the generated code calls, and the compute dtype.

- ``cpu``: activations in float32 (MLX's CPU backend is slow in bf16/fp16), matmuls
  through ``vlmc.kernels.cpu_ops`` (compact-weight GEMV kernels for decode, float32 BLAS
  GEMM for prefill). Weights stay stored as compiled (bf16 / quantized). Pre-norm decoder
  layers get a ``decode_layer`` fast path (fuse.decode_layer_fast_path) unless
  ``--no-fuse decode_layer``.
- ``metal`` / ``cuda``: MLX's own kernels plus vlmc's GPU kernels (``vlmc.kernels.gpu_ops``:
  Metal and CUDA sources in ``vlmc/kernels/gpu/``); activations in the storage dtype.

Embedding outputs are cast to the compute dtype when the table is stored differently.
"""
from __future__ import annotations

from ..ir.core import Op, Program, TensorType
from .fuse import decode_layer_fast_path
from .manager import register

LIBRARIES = {"cpu": "cpu_ops", "metal": "gpu_ops", "cuda": "gpu_ops"}


@register("lower")
def lower(prog: Program, target: str = "cpu", decode_layer: bool = True) -> tuple[Program, str]:
    if target not in LIBRARIES:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(LIBRARIES)}")
    fast = 0
    if target == "cpu" and decode_layer:  # one C call per decoder layer and decode step (--no-fuse decode_layer)
        for blk in prog.blocks.values():
            blk.fast_path = decode_layer_fast_path(blk.body)
            fast += len(blk.layers) if blk.fast_path is not None else 0
        if fast:
            prog.meta.setdefault("fusions", {})["decode_layer"] = fast
    storage = prog.meta.get("dtype", "float32")
    compute = "float32" if target == "cpu" else storage
    casts = 0
    if compute != storage:
        for fn in prog.functions.values():
            new_ops = []
            for op in fn.ops:
                new_ops.append(op)
                if op.op in ("embedding", "qembedding"):
                    raw = op.outputs[0]
                    stored = raw + "_stored"
                    op.outputs[0] = stored
                    fn.types[stored] = fn.types[raw]
                    fn.types[raw] = TensorType(fn.types[raw].shape, compute)
                    new_ops.append(Op("cast", [stored], [raw], {"dtype": compute}))
                    casts += 1
            fn.ops = new_ops
    prog.meta.update(target=target, compute_dtype=compute, ops_library=LIBRARIES[target])
    return prog, f"target {target}: ops from vlmc.kernels.{LIBRARIES[target]}, compute in {compute}" + \
        (f", {casts} casts inserted" if casts else "") + (f", decode_layer fast path for {fast} layers" if fast else "")
