"""A small DSL that importers use to write functions and blocks.

    fb = FunctionBuilder("vision_encode")
    x = fb.input("pixels", ("N", 1176), "float32")
    h = fb.op("linear", x, fb.param("vision.patch_embed.weight"))
    fb.output(h)

Params are looked up in a shape table (the Program's params, or a Block's per-layer
params) so every op's output type is inferred as it is added.
"""
from __future__ import annotations

from typing import Any

from .core import Block, Function, Op, TensorType
from .ops import OPS, ShapeError


class FunctionBuilder:
    def __init__(self, name: str, param_types: dict[str, TensorType], doc: str = ""):
        self.fn = Function(name=name, inputs=[], outputs=[], doc=doc)
        self.param_types = param_types
        self._n = 0

    # -- values -----------------------------------------------------------------------
    def input(self, name: str, shape: tuple, dtype: str) -> str:
        v = "%" + name
        self.fn.inputs.append(v)
        self.fn.types[v] = TensorType(tuple(shape), dtype)
        return v

    def param(self, name: str) -> str:
        if name not in self.param_types:
            raise KeyError(f"{self.fn.name}: unknown param {name!r}")
        v = "@" + name
        self.fn.types.setdefault(v, self.param_types[name])
        return v

    def has_param(self, name: str) -> bool:
        return name in self.param_types

    def type(self, v: str) -> TensorType:
        return self.fn.types[v]

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"%{hint}{self._n}"

    # -- ops --------------------------------------------------------------------------
    def op(self, opname: str, *inputs: str | None, n_out: int = 1, name: str | None = None,
           **attrs: Any):
        if opname not in OPS:
            raise ShapeError(f"unknown op {opname!r}")
        types = [self.fn.types[i] if i is not None else None for i in inputs]
        try:
            out_types = OPS[opname](types, attrs)
        except ShapeError as e:
            raise ShapeError(f"{self.fn.name}: {opname}: {e}") from None
        outs = [self._fresh(name or opname) for _ in out_types]
        for o, t in zip(outs, out_types):
            self.fn.types[o] = t
        self.fn.ops.append(Op(opname, list(inputs), outs, attrs))
        if n_out == 1 and len(outs) == 1:
            return outs[0]
        return outs

    def select_input(self, attr: str, choices: list[str]) -> str:
        """A per-layer choice among block inputs, resolved from the layer table (``$attr``)."""
        v = "$" + attr
        self.fn.types[v] = self.fn.types[choices[0]]
        return v

    def output(self, *values: str) -> Function:
        self.fn.outputs = list(values)
        return self.fn


def make_block(name: str, body: Function, param_prefix: str, param_shapes: dict[str, TensorType],
               layers: list[dict[str, Any]], param_roles: dict[str, str] | None = None) -> Block:
    return Block(name=name, body=body, param_prefix=param_prefix, param_shapes=param_shapes, layers=layers,
                 param_roles=dict(param_roles or {}))
