"""Re-infer every value's type from the entry inputs and the params, through the op rules.

Passes that change dtypes (``storage_dtype`` for params, ``lower`` for the compute dtype)
call it so that each value's printed type is what the emitted code computes. A block's
inputs take the types of the values its ``call_block`` passes in.
"""
from __future__ import annotations

from .core import Function, Program, TensorType
from .ops import OPS


def _param_types(prog: Program) -> dict[str, TensorType]:
    return {n: TensorType(p.shape, p.dtype) for n, p in prog.params.items()}


def _retype(fn: Function, params: dict[str, TensorType], prog: Program, seen: set[str]) -> None:
    for v in list(fn.types):
        if v.startswith("@") and v[1:] in params:
            fn.types[v] = params[v[1:]]
        elif v.startswith("$"):  # a per-layer choice among inputs: the choices' type
            choice = next((i for i in fn.inputs if fn.types[i].shape == fn.types[v].shape), None)
            if choice is not None:
                fn.types[v] = fn.types[choice]
    for op in fn.ops:
        types = [None if v is None else fn.types[v] for v in op.inputs]
        if op.op == "call_block":
            blk = prog.blocks[op.attrs["block"]]
            for inner, t in zip(blk.body.inputs, types):
                if t is not None and blk.body.types[inner].dtype != "kvcache":
                    blk.body.types[inner] = TensorType(blk.body.types[inner].shape, t.dtype)
            if blk.name not in seen:
                seen.add(blk.name)
                first = blk.param_prefix.format(i=0)
                rel = {k: prog_t for k in blk.param_shapes
                       if (prog_t := params.get(first + k)) is not None}
                blk.param_shapes.update({k: TensorType(blk.param_shapes[k].shape, t.dtype) for k, t in rel.items()})
                _retype(blk.body, blk.param_shapes, prog, seen)
        outs = OPS[op.op](types, op.attrs)
        for o, t in zip(op.outputs, outs):
            fn.types[o] = t


def infer_types(prog: Program) -> None:
    """Recompute the types of every op output in place (entry inputs are kept as declared)."""
    params = _param_types(prog)
    seen: set[str] = set()
    for fn in prog.functions.values():
        _retype(fn, params, prog, seen)
