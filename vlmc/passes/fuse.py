"""Fusion: sibling projections become one matmul, their weights concatenated at compile time.

- ``qkv``: q/k/v (or any non-MLP projections) reading the same normalized input.
- ``gate_up``: an MLP's gate and up projections.
- ``add_norm``: a residual add and the RMSNorm that reads its sum become one
  ``add_rms_norm`` op (a single pass over the row with vlmc's GPU kernel; on the CPU
  target the same two MLX ops).
- ``decode_layer`` (cpu target, applied when lowering): a pre-norm decoder layer gets a
  fast path, one C call per decode step instead of ~20 op calls (``decode_layer_fast_path``).

Each fused projection group becomes ``linear(x, W_cat, b_cat) -> split`` whose outputs keep the
original value names, so nothing downstream changes. Fewer, larger matmuls cut the
per-call overhead that dominates decode on every backend. A group is skipped (and
reported) when its parts cannot be concatenated (a pending transform, mixed biases).
"""
from __future__ import annotations

from ..ir.core import Function, Op, Param, Program, TensorType
from .manager import register

from ..options import FUSIONS, OPT_IN_FUSIONS as OPT_IN  # noqa: F401  (decode_layer: applied by ``lower``)


def _kind(roles: list[str | None]) -> str | None:
    """Which fusion a group of sibling projections is, from their params' roles."""
    if sorted(roles) == ["gate", "up"]:
        return "gate_up"
    if set(roles) <= {"q", "k", "v"} and len(set(roles)) == len(roles):
        return "qkv"
    return None


def _fused_name(weights: list[str]) -> str:
    mods = [w[1:].rsplit(".", 1)[0] for w in weights]        # "@self_attn.q_proj.weight" -> "self_attn.q_proj"
    prefix = mods[0].rsplit(".", 1)[0] + "." if "." in mods[0] else ""
    leaves = [m[len(prefix):] for m in mods]
    return prefix + "+".join(leaves)


def _groups(fn: Function) -> list[list[Op]]:
    by_input: dict[str, list[Op]] = {}
    for op in fn.ops:
        if op.op == "linear" and op.inputs[1].startswith("@"):
            by_input.setdefault(op.inputs[0], []).append(op)
    return [g for g in by_input.values() if len(g) >= 2]


def _fuse_function(fn: Function, enabled: set[str], param_of, role_of,
                   make_param) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for group in _groups(fn):
        # a router reads the same input (a MoE layer's shared expert) but is never fused
        group = [op for op in group if role_of(op.inputs[1][1:]) != "router"]
        if len(group) < 2:
            continue
        weights = [op.inputs[1] for op in group]
        kind = _kind([role_of(w[1:]) for w in weights])
        if kind not in enabled:
            continue
        biases = [op.inputs[2] if len(op.inputs) > 2 else None for op in group]
        if len({b is None for b in biases}) != 1:
            skipped.append(f"{weights}: mixed biases")
            continue
        fused = _fused_name(weights)
        ok = make_param(fused + ".weight", [w[1:] for w in weights])
        if ok and biases[0] is not None:
            ok = make_param(fused + ".bias", [b[1:] for b in biases])
        if not ok:
            skipped.append(f"{fused}: parts have pending transforms")
            continue
        sizes = [param_of(w[1:]).shape[0] for w in weights]
        first = fn.ops.index(group[0])
        x = group[0].inputs[0]
        cat = f"%{fused.rsplit('.', 1)[-1].replace('+', '_')}_{first}"
        out_t = fn.types[group[0].outputs[0]]
        fn.types[cat] = TensorType(out_t.shape[:-1] + (sum(sizes),), out_t.dtype)
        dtype = param_of(weights[0][1:]).dtype
        fn.types["@" + fused + ".weight"] = TensorType((sum(sizes), param_of(weights[0][1:]).shape[1]), dtype)
        b = "@" + fused + ".bias" if biases[0] is not None else None
        if b:
            fn.types[b] = TensorType((sum(sizes),), dtype)
        new_ops = [Op("linear", [x, "@" + fused + ".weight", b], [cat], {}),
                   Op("split", [cat], [op.outputs[0] for op in group], {"sizes": sizes, "axis": -1})]
        for op in group:
            fn.ops.remove(op)
        fn.ops[first:first] = new_ops
        counts[kind] = counts.get(kind, 0) + 1
    return counts, skipped


def _fuse_add_norm(fn: Function) -> int:
    """``h = add(a, b); n = rms_norm(h, @w)`` -> ``h, n = add_rms_norm(a, b, @w)`` where a and
    b have the sum's shape (the kernel does not broadcast); h keeps its other readers."""
    sums = {op.outputs[0]: op for op in fn.ops if op.op == "add"}
    fused = 0
    for norm in [op for op in fn.ops if op.op == "rms_norm"]:
        add = sums.pop(norm.inputs[0], None)
        if add is None or not norm.inputs[1].startswith("@"):
            continue
        if not (fn.types[add.inputs[0]].shape == fn.types[add.inputs[1]].shape == fn.types[add.outputs[0]].shape):
            continue
        fn.ops[fn.ops.index(add)] = Op("add_rms_norm", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                                       [add.outputs[0], norm.outputs[0]], dict(norm.attrs))
        fn.ops.remove(norm)
        fused += 1
    return fused


@register("fuse")
def fuse(prog: Program, disable: list[str] | tuple[str, ...] = (),
         enable: list[str] | tuple[str, ...] = ()) -> tuple[Program, str]:
    unknown = (set(disable) | set(enable)) - set(FUSIONS)
    if unknown:
        raise ValueError(f"unknown fusion(s) {sorted(unknown)}; known: {', '.join(FUSIONS)}")
    enabled = (set(FUSIONS) - set(OPT_IN) | set(enable)) - set(disable)
    total: dict[str, int] = {}
    skipped: list[str] = []

    def concat_param(name: str, parts: list[str]) -> Param | None:
        srcs = [prog.params[p] for p in parts]
        if any(s.transforms or len(s.sources) != 1 or "quant" in s.attrs for s in srcs):
            return None
        shape = (sum(s.shape[0] for s in srcs),) + tuple(srcs[0].shape[1:])
        attrs = {**srcs[0].attrs, "role": "+".join(s.role or "?" for s in srcs)}  # e.g. "q+k+v"
        prog.params[name] = Param(name, shape, srcs[0].dtype, [s.sources[0] for s in srcs],
                                  [("concat", {"axis": 0})], attrs)
        return prog.params[name]

    for blk in prog.blocks.values():
        prefixes = [blk.param_prefix.format(i=i) for i in range(len(blk.layers))]

        def make_block_param(rel: str, parts: list[str], blk=blk, prefixes=prefixes) -> bool:
            made = [concat_param(pre + rel, [pre + p for p in parts]) for pre in prefixes]
            if not all(made):
                return False
            blk.param_shapes[rel] = TensorType(made[0].shape, made[0].dtype)
            blk.param_roles[rel] = made[0].role
            return True

        counts, sk = _fuse_function(blk.body, enabled, lambda rel, blk=blk: blk.param_shapes[rel],
                                    lambda rel, blk=blk: blk.param_roles.get(rel), make_block_param)
        if "add_norm" in enabled and (n := _fuse_add_norm(blk.body)):
            counts["add_norm"] = n
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v * len(blk.layers)
        skipped += sk
    for fn in prog.functions.values():
        counts, sk = _fuse_function(fn, enabled, lambda n: prog.params[n], lambda n: prog.params[n].role,
                                    lambda n, parts: concat_param(n, parts) is not None)
        if "add_norm" in enabled and (n := _fuse_add_norm(fn)):
            counts["add_norm"] = n
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        skipped += sk
    prog.meta.setdefault("fusions", {}).update(total)
    summary = ", ".join(f"{k}: {v} groups" for k, v in sorted(total.items())) or "nothing fused"
    if disable:
        summary += f" (disabled: {', '.join(disable)})"
    if skipped:
        summary += f"; skipped {len(skipped)}: " + "; ".join(skipped[:3])
    return prog, summary


_PROJ = ("linear", "qlinear")
# the op kinds of a pre-norm decoder layer (Qwen2 style), in order; "proj" is linear/qlinear
_DECODER = ("rms_norm", "proj", "split", "reshape", "transpose", "reshape", "transpose", "reshape", "transpose",
            "rope", "rope", "cached_attention", "transpose", "reshape", "proj", "add", "rms_norm", "proj", "split",
            "glu", "proj", "add")


def decode_layer_fast_path(fn: Function) -> Op | None:
    """A ``decode_layer`` op for a block body that is exactly a pre-norm decoder layer
    with fused qkv and gate_up projections (what ``fuse`` makes of Qwen2-style layers):
    x -> rms_norm -> qkv -> split -> q/k/v heads -> rope(q), rope(k) -> cached_attention
    -> o_proj -> + x -> rms_norm -> gate_up -> split -> glu -> down -> + h. Any other
    body (or wiring) gets None."""
    ops = fn.ops
    if len(ops) != len(_DECODER) or len(fn.inputs) != 5 or len(fn.outputs) != 1:
        return None
    if any(op.op != k and not (k == "proj" and op.op in _PROJ) for op, k in zip(ops, _DECODER)):
        return None
    x, cos, sin, mask, cache = fn.inputs
    if fn.types[cache].dtype != "kvcache":
        return None
    made = {o: op for op in ops for o in op.outputs}

    def heads_of(v: str, n: int) -> str | None:
        """The [B, L, n*D] value that v is [B, n, L, D] heads of (reshape [0, 0, n, D], then
        transpose [0, 2, 1, 3]), or None."""
        t = made.get(v)
        r = made.get(t.inputs[0]) if t is not None and t.op == "transpose" else None
        if r is None or r.op != "reshape" or t.attrs.get("axes") != [0, 2, 1, 3] \
                or r.attrs.get("shape") != [0, 0, n, d]:
            return None
        return r.inputs[0]

    def proj(op: Op, x_in: str) -> tuple[str, str | None] | None:
        if op.inputs[0] != x_in or not op.inputs[1].startswith("@"):
            return None
        b = op.inputs[2] if len(op.inputs) > 2 else None
        return op.inputs[1], b if b is None or b.startswith("@") else "not a param"

    (n1, qkv, sp, *_heads, rq, rk, att, t_out, r_out, o, add1, n2, gu, sp2, glu, down, add2) = ops
    p_qkv, p_o, p_gu, p_d = proj(qkv, n1.outputs[0]), proj(o, r_out.outputs[0]), proj(gu, n2.outputs[0]), \
        proj(down, glu.outputs[0])
    if None in (p_qkv, p_o, p_gu, p_d) or "not a param" in (p_qkv[1], p_o[1], p_gu[1], p_d[1]):
        return None
    q_s, k_s, v_s = sp.outputs
    sizes = sp.attrs.get("sizes", [])
    d = fn.types[rq.outputs[0]].shape[-1]
    heads, kv_heads = fn.types[rq.outputs[0]].shape[1], fn.types[rk.outputs[0]].shape[1]
    if not all(isinstance(v, int) for v in (d, heads, kv_heads)) or sizes != [heads * d, kv_heads * d, kv_heads * d]:
        return None
    inter = sp2.attrs.get("sizes", [None])[0]
    h = add1.outputs[0]
    checks = (
        n1.inputs[0] == x and n1.inputs[1].startswith("@") and sp.inputs[0] == qkv.outputs[0],
        rq.inputs[1:] == [cos, sin] and rk.inputs[1:] == [cos, sin],
        heads_of(rq.inputs[0], heads) == q_s and heads_of(rk.inputs[0], kv_heads) == k_s,
        att.inputs[:5] == [rq.outputs[0], rk.outputs[0], att.inputs[2], cache, mask]
        and heads_of(att.inputs[2], kv_heads) == v_s,
        t_out.inputs[0] == att.outputs[0] and t_out.attrs.get("axes") == [0, 2, 1, 3]
        and r_out.inputs[0] == t_out.outputs[0] and r_out.attrs.get("shape") == [0, 0, heads * d],
        sorted(add1.inputs) == sorted([x, o.outputs[0]]),
        n2.inputs[0] == h and n2.inputs[1].startswith("@") and sp2.inputs[0] == gu.outputs[0],
        sp2.attrs.get("sizes") == [inter, inter] and isinstance(inter, int),
        glu.inputs == list(sp2.outputs) and glu.attrs.get("kind") in ("silu", "quick_gelu"),
        sorted(add2.inputs) == sorted([h, down.outputs[0]]) and fn.outputs == [add2.outputs[0]],
    )
    if not all(checks):
        return None
    return Op("decode_layer", [x, cos, sin, mask, cache, n1.inputs[1], *p_qkv, *p_o, n2.inputs[1], *p_gu, *p_d],
              ["%fast"], {"eps1": n1.attrs["eps"], "eps2": n2.attrs["eps"], "heads": heads, "kv_heads": kv_heads,
                          "head_dim": d, "inter": inter, "scale": att.attrs["scale"], "act": glu.attrs["kind"]})
