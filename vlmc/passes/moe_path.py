"""The cpu target's one-call MoE block: ``fuse_moe_blocks`` finds the ops
``models.common.moe.SparseMoe.apply`` emits (after ``gate_up`` fused the shared expert's
gate and up projections and ``quantize`` chose linear / qlinear) by their data flow,

    n -> router -> moe_route -> (q)moe_experts(n, ..)                       = y
    n -> shared gate_up -> split -> glu -> shared down                      = s
    n -> shared_expert_gate -> act(sigmoid)                                 = g
    y + s * g             (or y alone: no shared expert)

and replaces them with one ``moe_block`` op (``kernels/cpu/moe.py``: router, routing,
routed and shared experts in one C call per layer and decode step; the separate ops
otherwise). Intermediate values read by anything else leave the ops as they are.
"""
from __future__ import annotations

from ..ir.core import Function, Op
from .fast_path import _NoMatch, _matcher

_PROJ = ("linear", "qlinear")


def fuse_moe_blocks(fn: Function) -> int:
    """Rewrite each MoE block of ``fn`` in place; the number rewritten."""
    done = 0
    for route in [op for op in fn.ops if op.op == "moe_route"]:
        try:
            matched, block = _match(fn, route)
        except _NoMatch:
            continue
        last = max(fn.ops.index(op) for op in matched)
        fn.ops[last] = block
        gone = {id(op) for op in matched}
        fn.ops = [op for op in fn.ops if id(op) not in gone or op is block]
        for op in matched:
            for v in op.outputs:
                if v not in block.outputs:
                    fn.types.pop(v, None)
        done += 1
    return done


def _match(fn: Function, route: Op) -> tuple[list[Op], Op]:
    made, seen, need, prod = _matcher(fn, "not a MoE block")
    users: dict[str, list[Op]] = {}
    for op in fn.ops:
        for v in op.inputs:
            if v is not None:
                users.setdefault(v, []).append(op)

    def only(v: str) -> Op:
        """The one op reading v (a value read elsewhere too stays computed: no match)."""
        need(v not in fn.outputs and len(users.get(v, [])) == 1)
        return users[v][0]

    def proj(v: str) -> tuple[str, str]:
        op = prod(v, "proj")
        need(len(op.inputs) < 3 or op.inputs[2] is None, "a projection has a bias")
        need(op.inputs[1].startswith("@"))
        return op.inputs[0], op.inputs[1]

    n, router = proj(route.inputs[0])
    seen.add(id(route))
    only(route.inputs[0])
    w_v, e_v = route.outputs
    experts = only(w_v)
    need(experts.op in ("moe_experts", "qmoe_experts") and only(e_v) is experts and experts.inputs[:3] == [n, w_v, e_v])
    need(all(isinstance(v, str) and v.startswith("@") for v in experts.inputs[3:5]))
    seen.add(id(experts))
    attrs = {"top_k": route.attrs["top_k"], "normalize": route.attrs.get("normalize", True),
             "kind": experts.attrs["kind"]}
    y = experts.outputs[0]
    inputs = [n, router, *experts.inputs[3:5]]
    users_y = [op for op in users.get(y, [])]
    shared = users_y[0] if len(users_y) == 1 and users_y[0].op == "add" and y not in fn.outputs else None
    out = y
    if shared is not None:
        try:
            other = shared.inputs[1] if shared.inputs[0] == y else shared.inputs[0]
            mul = prod(other, "mul")
            only(other)
            s_v, g_v = mul.inputs
            if made.get(s_v) is not None and made[s_v].op == "act":
                s_v, g_v = g_v, s_v
            gate = prod(g_v, "act")
            need(gate.attrs.get("kind") == "sigmoid")
            only(g_v)
            gx, s_gate = proj(gate.inputs[0])
            only(gate.inputs[0])
            hx, s_down = proj(s_v)
            only(s_v)
            glu = prod(hx, "glu")
            need(glu.attrs.get("kind") == attrs["kind"])
            only(hx)
            split = prod(glu.inputs[0], "split")
            need(list(split.outputs) == glu.inputs and split.attrs.get("axis") in (-1,)
                 and len(set(split.attrs.get("sizes") or [])) == 1 and len(split.outputs) == 2)
            only(split.outputs[0])
            only(split.outputs[1])
            ux, s_gu = proj(split.inputs[0])
            only(split.inputs[0])
            need(gx == n and ux == n)
            seen.add(id(shared))
            inputs += [s_gu, s_down, s_gate]
            out = shared.outputs[0]
        except _NoMatch:
            seen.clear()
            seen.update({id(route), id(experts), id(made[route.inputs[0]])})
    matched = [op for op in fn.ops if id(op) in seen]
    return matched, Op("moe_block", inputs, [out], attrs)
