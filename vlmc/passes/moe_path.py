"""The cpu target's one-call MoE block: ``fuse_moe_blocks`` finds the ops
``models.common.moe.SparseMoe.apply`` emits (after ``gate_up`` fused the shared expert's
gate and up projections and ``quantize`` chose linear / qlinear) by their data flow,

    n -> router -> moe_route -> (q)moe_experts(n, ..)                       = y
    n -> shared gate_up -> split -> glu -> shared down                      = s
    n -> shared_expert_gate -> act(sigmoid)                                 = g
    y + s * g             (or y alone: no shared expert)

or Gemma 4's routed experts (``models/common/gemma4.py``), whose router reads its own input
r and whose weights are scaled per expert before the experts run:

    r -> router -> moe_route -> (w, e);  w * take(@per_expert_scale, e)
      -> (q)moe_experts(n, .., e)                                           = y

and replaces them with one ``moe_block`` op (``kernels/cpu/moe.py``: router, routing,
routed and shared experts in one C call per layer and decode step; the separate ops
otherwise). The ops making n and r (norms) stay. Intermediate values read by anything
else leave the ops as they are.
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

    rx, router = proj(route.inputs[0])
    seen.add(id(route))
    only(route.inputs[0])
    w_v, e_v = route.outputs
    need(e_v not in fn.outputs)
    first, scale, w_in = only(w_v), None, w_v
    if first.op == "mul":  # Gemma 4: the weights times their experts' per_expert_scale
        other = first.inputs[1] if first.inputs[0] == w_v else first.inputs[0]
        take = prod(other, "take", axis=0)
        only(other)
        need(take.inputs[1] == e_v and isinstance(take.inputs[0], str) and take.inputs[0].startswith("@"))
        scale, w_in = take.inputs[0], first.outputs[0]
        prod(w_in, "mul")
        experts = only(w_in)
        need({id(op) for op in users[e_v]} == {id(take), id(experts)} and len(users[e_v]) == 2)
    else:
        experts = first
        need(only(e_v) is experts)
    need(experts.op in ("moe_experts", "qmoe_experts") and experts.inputs[1:3] == [w_in, e_v])
    need(all(isinstance(v, str) and v.startswith("@") for v in experts.inputs[3:5]))
    seen.add(id(experts))
    n = experts.inputs[0]  # the experts' input; the router's may be its own (Gemma 4)
    attrs = {"top_k": route.attrs["top_k"], "normalize": route.attrs.get("normalize", True),
             "kind": experts.attrs["kind"]}
    y = experts.outputs[0]
    inputs = [n, router, *experts.inputs[3:5]]
    extra = [rx if rx != n else None, scale]
    routed = set(seen)
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
            seen.update(routed)
    if any(v is not None for v in extra):
        inputs += [None] * (7 - len(inputs)) + extra
        while inputs[-1] is None:
            inputs.pop()
    matched = [op for op in fn.ops if id(op) in seen]
    return matched, Op("moe_block", inputs, [out], attrs)
