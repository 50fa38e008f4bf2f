"""Structural checks run after import and after every pass."""
from __future__ import annotations

from .core import Function, Program, TensorType, kv_spec_error
from .ops import OPS, ShapeError


class VerifyError(ValueError):
    pass


def _check_function(fn: Function, params: dict[str, TensorType], where: str,
                    blocks: dict, layer_attrs: set[str] | None = None) -> None:
    defined = set(fn.inputs)
    for v in fn.inputs:
        if v not in fn.types:
            raise VerifyError(f"{where}: input {v} has no type")
    for i, op in enumerate(fn.ops):
        if op.op not in OPS:
            raise VerifyError(f"{where}: op #{i} {op.op!r} is not in the op set")
        types = []
        for v in op.inputs:
            if v is None:
                types.append(None)
                continue
            if v.startswith("@"):
                if v[1:] not in params:
                    raise VerifyError(f"{where}: op #{i} {op.op} uses unknown param {v[1:]}")
                types.append(params[v[1:]])
            elif v.startswith("$"):
                if layer_attrs is None or v[1:] not in layer_attrs:
                    raise VerifyError(f"{where}: op #{i} uses per-layer input {v} but no layer attribute "
                                      f"{v[1:]!r} exists")
                types.append(fn.types[v])
            else:
                if v not in defined:
                    raise VerifyError(f"{where}: op #{i} {op.op} uses {v} before it is defined")
                types.append(fn.types[v])
        for k, a in op.attrs.items():  # "$name": the layer table's entry, in a block only
            if isinstance(a, str) and a.startswith("$") and (layer_attrs is None or a[1:] not in layer_attrs):
                raise VerifyError(f"{where}: op #{i} {op.op} attribute {k}={a!r} names no layer attribute")
        if op.op == "call_block":
            blk = blocks.get(op.attrs.get("block"))
            if blk is None:
                raise VerifyError(f"{where}: call_block of unknown block {op.attrs.get('block')!r}")
            if not 0 <= op.attrs["start"] <= op.attrs["stop"] <= len(blk.layers):
                raise VerifyError(f"{where}: call_block range {op.attrs['start']}..{op.attrs['stop']} "
                                  f"outside the block's {len(blk.layers)} layers")
            if len(op.inputs) != len(blk.body.inputs):
                raise VerifyError(f"{where}: call_block passes {len(op.inputs)} inputs, block takes "
                                  f"{len(blk.body.inputs)}")
        try:
            out = OPS[op.op](types, op.attrs)
        except ShapeError as e:
            raise VerifyError(f"{where}: op #{i} {op.op}: {e}") from None
        if len(out) != len(op.outputs):
            raise VerifyError(f"{where}: op #{i} {op.op} has {len(op.outputs)} outputs, rule gives {len(out)}")
        for o in op.outputs:
            if o in defined:
                raise VerifyError(f"{where}: {o} is defined twice")
            defined.add(o)
    for o in fn.outputs:
        if o not in defined:
            raise VerifyError(f"{where}: output {o} is never defined")


def verify(prog: Program) -> None:
    ptypes = {n: TensorType(p.shape, p.dtype) for n, p in prog.params.items()}
    for name, blk in prog.blocks.items():
        attrs = set().union(*[set(layer) for layer in blk.layers]) if blk.layers else set()
        for i, _ in enumerate(blk.layers):
            prefix = blk.param_prefix.format(i=i)
            for rel, t in blk.param_shapes.items():
                p = prog.params.get(prefix + rel)
                if p is None:
                    raise VerifyError(f"block {name} layer {i}: param {prefix + rel} is missing")
                if tuple(p.shape) != tuple(t.shape):
                    raise VerifyError(f"block {name} layer {i}: param {prefix + rel} shape {p.shape} != {t.shape}")
        _check_function(blk.body, {k: v for k, v in blk.param_shapes.items()}, f"block {name}",
                        prog.blocks, attrs)
        if any(op.op == "cached_attention" for op in blk.body.ops):
            for layer in blk.layers:  # every attention layer's cache has a type (dense until planned)
                why = kv_spec_error(layer.get("kv"))
                if why is not None:
                    raise VerifyError(f"block {name} layer {layer.get('index')}: {why}")
        if blk.fast_path is not None:
            for v in blk.fast_path.inputs:  # a block input, a per-layer choice among them ($) or a param
                if v is not None and v not in blk.body.inputs and not (v.startswith("@") and v[1:] in blk.param_shapes) \
                        and not (v.startswith("$") and v in blk.body.types and all(v[1:] in L for L in blk.layers)):
                    raise VerifyError(f"block {name}: fast path {blk.fast_path.op} reads {v}, not an input or param")
    for name, fn in prog.functions.items():
        _check_function(fn, ptypes, f"function {name}", prog.blocks)
    for name, p in prog.params.items():
        if not p.sources:
            raise VerifyError(f"param {name} has no source tensor")
