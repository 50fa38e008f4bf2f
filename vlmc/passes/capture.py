"""``capture_hidden``: text entry points that also return the hidden states entering chosen
decoder layers.

A drafter that reads the target's intermediate states (EAGLE-3: three layers, early,
middle, late) needs them beside the logits at every position a step runs. The pass splits
each text entry point's ``call_block`` ops at those layers, keeps the value that enters
each one (all rows, before any slice to the last position) and returns
(logits, [B, L, len(layers) * hidden]), concatenated in increasing layer order whatever
order the layers are given in. Layer j < n is the state entering layer j (transformers'
``hidden_states[j]``, the embeddings for j = 0); j = n, one past the last layer, is the
last layer's output before the final norm. These are vLLM's hidden-state indices, which
EAGLE-3 drafters are trained and served with (docs/speculative-decoding.md). It reads only
the program's structure (``call_block`` ranges and the layer tables' decoder indices), so
it works for every family whose decoder runs through blocks; a program built otherwise is
refused with one clear error. It is in no preset: ``vlmc.load(target, draft=...)`` re-plans
the target with it (``compiler.replan``) only when such a drafter is given.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import UnsupportedModelError
from ..ir.core import Function, Op, Program
from ..ir.ops import OPS
from .manager import register

ENTRIES = ("prefill", "decode", "verify")


def _decoder_layer(prog: Program, op: Op, local: int) -> int:
    row = prog.blocks[op.attrs["block"]].layers[local]
    return int(row.get("layer", local))


def _fresh(fn: Function, base: str) -> str:
    name, n = f"%{base}", 0
    while name in fn.types:
        n += 1
        name = f"%{base}_{n}"
    return name


def _capture(prog: Program, fn: Function, layers: Sequence[int], n: int) -> None:
    want = {int(j): None for j in layers}
    ops: list[Op] = []
    for op in fn.ops:
        if op.op != "call_block":
            ops.append(op)
            continue
        start, stop = op.attrs["start"], op.attrs["stop"]
        cuts = [i for i in range(start, stop) if _decoder_layer(prog, op, i) in want]
        x, pieces = op.inputs[0], []
        bounds = [start, *[c for c in cuts if c > start], stop]
        for lo, hi in zip(bounds, bounds[1:]):
            if _decoder_layer(prog, op, lo) in want:
                want[_decoder_layer(prog, op, lo)] = x
            last = hi == stop
            out = op.outputs[0] if last else _fresh(fn, f"x_to{_decoder_layer(prog, op, hi)}")
            if not last:
                fn.types[out] = fn.types[op.outputs[0]]
            pieces.append(Op("call_block", [x, *op.inputs[1:]], [out], {**op.attrs, "start": lo, "stop": hi}))
            x = out
        if n in want and _decoder_layer(prog, op, stop - 1) == n - 1:   # leaving the last layer
            want[n] = op.outputs[0]
        ops.extend(pieces)
    missing = [j for j, v in want.items() if v is None]
    if missing:
        raise UnsupportedModelError(f"{fn.name}: no decoder layer {missing} runs through a block here, so its "
                                    f"hidden state cannot be returned")
    values = [want[j] for j in sorted(want)]
    out = _fresh(fn, "aux_hidden")
    fn.types[out] = OPS["concat"]([fn.types[v] for v in values], {"axis": -1})[0]
    ops.append(Op("concat", values, [out], {"axis": -1}))
    fn.ops = ops
    fn.outputs = [fn.outputs[0], out]
    fn.doc += f"; and the hidden states entering decoder layers {sorted(want)}, concatenated"


@register("capture_hidden")
def capture_hidden(prog: Program, layers: Sequence[int] = ()) -> tuple[Program, str]:
    n = int(prog.meta.get("text", {}).get("num_layers", 0))
    layers = [int(j) for j in layers]
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= j <= n for j in layers):
        raise UnsupportedModelError(f"hidden states to capture must be distinct layer indices in 0..{n} (n: the "
                                    f"last layer's output), got {layers}")
    layers = sorted(layers)
    for name in ENTRIES:
        fn = prog.functions.get(name)
        if fn is None:
            raise UnsupportedModelError(f"the program has no {name} entry point")
        if len(fn.outputs) != 1:
            raise UnsupportedModelError(f"{name} already returns more than its logits; its hidden states "
                                        f"cannot be added")
        _capture(prog, fn, layers, n)
    prog.meta["captured_layers"] = layers
    return prog, f"prefill/decode/verify also return the hidden states entering layers {layers}"
