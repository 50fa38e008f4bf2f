"""Zero-pad MLP hidden widths that the quantization group does not divide.

A weight is quantized in groups along its input axis, so a projection whose input width
is not a multiple of the group size stays float: SigLIP-so400m's fc2 (4304 inputs, the
Gemma 3 / PaliGemma / LLaVA-interleave towers) and Qwen2.5-VL's vision down_proj (3420)
then run as float GEMMs, a third of a Gemma 3 tower's time.

Where that input is an MLP's hidden state this pass widens the hidden state instead, at
no cost at run time: the projections that produce it get zero rows (and zero bias), so
the extra hidden units are act(0) = 0 (``ZERO_AT_ZERO``: every activation vlmc knows but
sigmoid), and the projection that reads it gets the same number of zero columns, which multiply
those zeros. The model computes the same function; the widened weights quantize. Matched
shapes (one consumer each step, in a vision or projector block):

    linear(@w1) -> act -> linear(@w2)
    linear(@wgu) -> split into two equal halves -> glu -> linear(@w2)
    linear(@wg), linear(@wu) -> glu -> linear(@w2)

Anything else stays as it is (and float, as the quantize pass reports).
"""
from __future__ import annotations

from typing import Any

from ..ir.core import Block, Function, Op, Program, TensorType
from ..ir.infer import infer_types
from .manager import register

# activations whose value at 0 is exactly 0 (silu, gelu, gelu_tanh, quick_gelu, relu; not sigmoid)
ZERO_AT_ZERO = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")
PARTS = ("vision", "projector")


def _producers(fn: Function) -> tuple[dict[str, Op], dict[str, int]]:
    made, uses = {}, {}
    for op in fn.ops:
        for o in op.outputs:
            made[o] = op
        for v in op.inputs:
            if v:
                uses[v] = uses.get(v, 0) + 1
    for v in fn.outputs:
        uses[v] = uses.get(v, 0) + 1
    return made, uses


def _only_use(v: str, uses: dict[str, int]) -> bool:
    return uses.get(v, 0) == 1


def _widened_rows(op: Op, made: dict[str, Op], uses: dict[str, int], width: int,
                  ndim: int) -> list[tuple[Op, int, Op | None]] | None:
    """The linears (with their row split into ``parts`` equal parts, and the split op
    between, if any) that make ``op``'s hidden input of ``width`` units (``ndim`` axes), or
    None."""
    h = op.inputs[0]
    src = made.get(h)
    if src is None or not _only_use(h, uses):
        return None
    if src.op == "act" and src.attrs.get("kind") in ZERO_AT_ZERO:
        lin = made.get(src.inputs[0])
        if lin is not None and lin.op == "linear" and _only_use(src.inputs[0], uses):
            return [(lin, 1, None)]
        return None
    if src.op != "glu" or src.attrs.get("kind") not in ZERO_AT_ZERO:
        return None
    g, u = src.inputs[0], src.inputs[1]
    pg, pu = made.get(g), made.get(u)
    if pg is None or pu is None or not (_only_use(g, uses) and _only_use(u, uses)):
        return None
    if pg is pu and pg.op == "split" and list(pg.attrs.get("sizes", [])) == [width, width] \
            and pg.attrs.get("axis") in (-1, ndim - 1) and pg.outputs == [g, u]:
        lin = made.get(pg.inputs[0])
        if lin is not None and lin.op == "linear" and _only_use(pg.inputs[0], uses):
            return [(lin, 2, pg)]
        return None
    if pg.op == "linear" and pu.op == "linear" and pg is not pu:
        return [(pg, 1, None), (pu, 1, None)]
    return None


def _pad_param(prog: Program, name: str, axis: int, after: int, parts: int) -> None:
    p = prog.params[name]
    shape = list(p.shape)
    shape[axis] += after * parts
    p.transforms = list(p.transforms) + [("pad", {"axis": axis, "after": after, "parts": parts})]
    p.shape = tuple(shape)


def _rewrite(prog: Program, fn: Function, prefixes: list[str], multiple: int, shapes: dict[str, TensorType] | None,
             done: list[str]) -> None:
    made, uses = _producers(fn)
    for op in fn.ops:
        if op.op != "linear" or not (op.inputs[1] or "").startswith("@"):
            continue
        rel = op.inputs[1][1:]
        names = [pre + rel for pre in prefixes]
        if any(n not in prog.params for n in names):
            continue
        w2 = prog.params[names[0]]
        if len(w2.shape) != 2 or w2.part not in PARTS or w2.shape[-1] % multiple == 0:
            continue
        width = w2.shape[-1]
        producers = _widened_rows(op, made, uses, width, len(fn.types[op.inputs[0]].shape))
        if producers is None:
            continue
        extra = -width % multiple
        for lin, parts, split in producers:
            for ref, axis in ((lin.inputs[1], 0), (lin.inputs[2] if len(lin.inputs) > 2 else None, 0)):
                if not ref or not ref.startswith("@"):
                    continue
                for pre in prefixes:
                    _pad_param(prog, pre + ref[1:], axis, extra, parts)
                if shapes is not None:
                    t = shapes[ref[1:]]
                    dims = list(t.shape)
                    dims[0] += extra * parts
                    shapes[ref[1:]] = TensorType(tuple(dims), t.dtype)
            if split is not None:
                split.attrs["sizes"] = [width + extra] * parts
        for n in names:
            _pad_param(prog, n, 1, extra, 1)
        if shapes is not None:
            t = shapes[rel]
            shapes[rel] = TensorType((t.shape[0], width + extra), t.dtype)
        done.append(f"{names[0] if len(names) == 1 else prefixes[0] + rel + ' (x' + str(len(names)) + ')'} "
                    f"{width} -> {width + extra}")


@register("pad_hidden")
def pad_hidden(prog: Program, multiple: int | None = None) -> tuple[Program, str]:
    """Widen vision/projector MLP hidden states to a multiple of ``multiple`` (the weight
    quantization's group size; None: nothing to do)."""
    if not multiple:
        return prog, "off"
    done: list[str] = []
    blk: Block
    for blk in prog.blocks.values():
        prefixes = [blk.param_prefix.format(i=i) for i in range(len(blk.layers))]
        _rewrite(prog, blk.body, prefixes, multiple, blk.param_shapes, done)
    for fn in prog.functions.values():
        _rewrite(prog, fn, [""], multiple, None, done)
    if not done:
        return prog, "nothing to pad"
    infer_types(prog)
    return prog, f"widened {len(done)} hidden states with zeros: " + ", ".join(done)


def options_for(quant: dict[str, Any]) -> dict[str, Any]:
    """The pass's options under the quantize pass's options: the group size of a weight
    scheme that quantizes vision weights, else nothing."""
    if not quant.get("scheme") or not quant.get("vision", True):
        return {}
    from .quantize import scheme_spec
    return {"multiple": scheme_spec(quant["scheme"], quant.get("group_size", 64))["group_size"]}
