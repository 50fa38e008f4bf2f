"""Dead code and weight-transform cleanups.

- ``cleanup``: drops ops whose results nothing uses, block layers no entry point runs
  (e.g. LLaVA tower layers after the chosen feature layer) and params nothing reads.
- ``fold_transforms``: composes each param's pending transforms (consecutive reshapes
  collapse into one; identity reshapes vanish) so the backend does the minimum work.
"""
from __future__ import annotations

from ..ir.core import Function, Program
from .manager import register


def _dce(fn: Function) -> int:
    live = set(fn.outputs)
    kept = []
    for op in reversed(fn.ops):
        if any(o in live for o in op.outputs):
            kept.append(op)
            live.update(v for v in op.inputs if v)
    removed = len(fn.ops) - len(kept)
    fn.ops = list(reversed(kept))
    return removed


def _used_params(fn: Function) -> set[str]:
    return {v[1:] for op in fn.ops for v in op.inputs if v and v.startswith("@")}


@register("cleanup")
def cleanup(prog: Program) -> tuple[Program, str]:
    dead_ops = sum(_dce(fn) for fn in prog.functions.values())
    dead_ops += sum(_dce(b.body) for b in prog.blocks.values())
    used = set()
    dropped_layers = 0
    for name, blk in list(prog.blocks.items()):
        stops = [op.attrs["stop"] for fn in prog.functions.values() for op in fn.ops
                 if op.op == "call_block" and op.attrs["block"] == name]
        if not stops:
            del prog.blocks[name]
            continue
        keep = max(stops)
        dropped_layers += len(blk.layers) - keep
        blk.layers = blk.layers[:keep]
        body_params = _used_params(blk.body)
        blk.param_shapes = {k: v for k, v in blk.param_shapes.items() if k in body_params}
        for i in range(keep):
            used.update(blk.param_prefix.format(i=i) + rel for rel in blk.param_shapes)
    for fn in prog.functions.values():
        used |= _used_params(fn)
    unused = [n for n in prog.params if n not in used]
    for n in unused:
        del prog.params[n]
    return prog, f"removed {dead_ops} dead ops, {dropped_layers} unused layers, {len(unused)} unused params"


@register("fold_transforms")
def fold_transforms(prog: Program) -> tuple[Program, str]:
    folded = 0
    for p in prog.params.values():
        out = []
        for name, opts in p.transforms:
            if name == "reshape" and out and out[-1][0] == "reshape":
                out[-1] = ("reshape", opts)
                folded += 1
            else:
                out.append((name, opts))
        if len(p.sources) == 1 and out and out[-1][0] == "reshape" \
                and tuple(out[-1][1]["shape"]) == tuple(p.sources[0].shape) and len(out) == 1:
            out = []
            folded += 1
        p.transforms = out
    return prog, f"folded {folded} transforms"
