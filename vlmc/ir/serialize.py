"""A Program as JSON and back (an artifact's ``program.json``: the program before KV
planning and lowering, from which a re-plan at load recompiles)."""
from __future__ import annotations

from typing import Any

from .core import Block, Function, Op, Param, Program, TensorRef, TensorType


def _type(t: TensorType) -> list:
    return [list(t.shape), t.dtype]


def _fn(fn: Function) -> dict[str, Any]:
    return {"name": fn.name, "inputs": fn.inputs, "outputs": fn.outputs, "doc": fn.doc,
            "ops": [_op(op) for op in fn.ops], "types": {v: _type(t) for v, t in fn.types.items()}}


def _op(op: Op) -> dict[str, Any]:
    return {"op": op.op, "inputs": op.inputs, "outputs": op.outputs, "attrs": op.attrs}


def to_json(prog: Program) -> dict[str, Any]:
    return {
        "name": prog.name, "meta": prog.meta, "history": prog.history,
        "params": {n: {"shape": list(p.shape), "dtype": p.dtype, "attrs": p.attrs, "transforms": p.transforms,
                       "sources": [[r.file, r.key, list(r.shape), r.dtype] for r in p.sources]}
                   for n, p in prog.params.items()},
        "blocks": {n: {"body": _fn(b.body), "param_prefix": b.param_prefix, "layers": b.layers,
                       "param_shapes": {k: _type(t) for k, t in b.param_shapes.items()},
                       "param_roles": b.param_roles, "fast_path": None if b.fast_path is None else _op(b.fast_path)}
                   for n, b in prog.blocks.items()},
        "functions": {n: _fn(f) for n, f in prog.functions.items()},
    }


def _from_type(t: list) -> TensorType:
    return TensorType(tuple(t[0]), t[1])


def _from_fn(d: dict[str, Any]) -> Function:
    return Function(name=d["name"], inputs=list(d["inputs"]), outputs=list(d["outputs"]), doc=d["doc"],
                    ops=[_from_op(o) for o in d["ops"]], types={v: _from_type(t) for v, t in d["types"].items()})


def _from_op(d: dict[str, Any]) -> Op:
    return Op(d["op"], list(d["inputs"]), list(d["outputs"]), dict(d["attrs"]))


def from_json(d: dict[str, Any]) -> Program:
    params = {n: Param(name=n, shape=tuple(p["shape"]), dtype=p["dtype"], attrs=dict(p["attrs"]),
                       transforms=[(t[0], dict(t[1])) for t in p["transforms"]],
                       sources=[TensorRef(s[0], s[1], tuple(s[2]), s[3]) for s in p["sources"]])
              for n, p in d["params"].items()}
    blocks = {n: Block(name=n, body=_from_fn(b["body"]), param_prefix=b["param_prefix"], layers=list(b["layers"]),
                       param_shapes={k: _from_type(t) for k, t in b["param_shapes"].items()},
                       param_roles=dict(b["param_roles"]),
                       fast_path=None if b["fast_path"] is None else _from_op(b["fast_path"]))
              for n, b in d["blocks"].items()}
    return Program(name=d["name"], params=params, blocks=blocks,
                   functions={n: _from_fn(f) for n, f in d["functions"].items()},
                   meta=dict(d["meta"]), history=list(d["history"]))
