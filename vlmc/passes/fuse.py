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
_GATES = ("silu", "quick_gelu", "gelu_tanh")  # the MLP activations the C gate computes


class _NoMatch(Exception):
    pass


def decode_layer_fast_path(fn: Function) -> Op | None:
    """A ``decode_layer`` op for a block body that is exactly a pre-norm decoder layer with
    fused qkv and gate_up projections (what ``fuse`` makes of ``layers.decoder_layer``):
    x -> rms_norm -> qkv -> split -> q/k/v heads [-> q_norm, k_norm] -> rope(q), rope(k)
    -> cached_attention [softcap] -> o_proj [-> post-attention norm] -> + x -> rms_norm
    -> gate_up -> split -> glu (silu, quick_gelu, gelu_tanh) -> down [-> post-MLP norm]
    -> + h. The rotary tables may be block inputs or a per-layer choice among them (``$``:
    Gemma 3's local and global tables). Any other body (or wiring) gets None."""
    try:
        return _match(fn)
    except _NoMatch:
        return None


def _match(fn: Function) -> Op:
    made = {o: op for op in fn.ops for o in op.outputs}
    seen: set[int] = set()

    def need(cond) -> None:
        if not cond:
            raise _NoMatch

    def prod(v: str, kind: str, **attrs) -> Op:
        """The op of this kind (proj: linear/qlinear) that makes v, with these attrs."""
        op = made.get(v)
        need(op is not None and (op.op == kind or (kind == "proj" and op.op in _PROJ)))
        need(all(op.attrs.get(k) == a for k, a in attrs.items()))
        seen.add(id(op))
        return op

    def param(v: str | None) -> str | None:
        need(v is None or v.startswith("@"))
        return v

    def proj(v: str) -> tuple[str, str, str | None]:
        """(input, weight, bias) of the projection making v."""
        op = prod(v, "proj")
        return op.inputs[0], param(op.inputs[1]), param(op.inputs[2] if len(op.inputs) > 2 else None)

    def norm(v: str) -> tuple[str, str, float]:
        op = prod(v, "rms_norm")
        return op.inputs[0], param(op.inputs[1]), op.attrs["eps"]

    def maybe_norm(v: str) -> tuple[str, str | None, float | None]:
        op = made.get(v)
        return norm(v) if op is not None and op.op == "rms_norm" else (v, None, None)

    need(len(fn.outputs) == 1 and len(fn.inputs) >= 5)
    x, mask, cache = fn.inputs[0], fn.inputs[-2], fn.inputs[-1]
    need(fn.types[cache].dtype == "kvcache")
    add2 = prod(fn.outputs[0], "add")
    for h, m in (add2.inputs, add2.inputs[::-1]):
        op = made.get(h)
        if op is not None and op.op == "add" and x in op.inputs:
            break
    else:
        raise _NoMatch
    # the MLP: m = [post_ff](down(glu(split(gate_up(norm2(h))))))
    d_out, post_ff, eps_pf = maybe_norm(m)
    g, d_w, d_b = proj(d_out)
    glu = prod(g, "glu")
    need(glu.attrs.get("kind") in _GATES and len(glu.inputs) == 2)
    sp2 = prod(glu.inputs[0], "split")
    inter = sp2.attrs.get("sizes", [None])[0]
    need(list(sp2.outputs) == glu.inputs and sp2.attrs.get("sizes") == [inter, inter] and isinstance(inter, int))
    n2, gu_w, gu_b = proj(sp2.inputs[0])
    h_in, norm2, eps2 = norm(n2)
    need(h_in == h)
    # the attention: h = x + [post_attn](o_proj(heads(cached_attention(...))))
    add1 = prod(h, "add")
    a = add1.inputs[1] if add1.inputs[0] == x else add1.inputs[0]
    need(sorted(add1.inputs) == sorted([x, a]))
    o_out, post_attn, eps_pa = maybe_norm(a)
    r_out, o_w, o_b = proj(o_out)
    att = prod(prod(prod(r_out, "reshape").inputs[0], "transpose", axes=[0, 2, 1, 3]).inputs[0], "cached_attention")
    rq, rk = prod(att.inputs[0], "rope"), prod(att.inputs[1], "rope")
    d = fn.types[rq.outputs[0]].shape[-1]
    heads, kv_heads = fn.types[rq.outputs[0]].shape[1], fn.types[rk.outputs[0]].shape[1]
    need(all(isinstance(n, int) for n in (d, heads, kv_heads)))
    need(made[r_out].attrs.get("shape") == [0, 0, heads * d])
    need(att.inputs[3:5] == [cache, mask] and len(att.inputs) == 5)
    cos, sin = rq.inputs[1:]
    need(rk.inputs[1:] == [cos, sin] and all(t in fn.inputs or t.startswith("$") for t in (cos, sin)))

    def head_of(v: str, n: int, normed: bool) -> tuple[str, str | None, float | None]:
        """The split output whose [B, n, L, D] heads v is (reshape, [rms_norm,] transpose)."""
        t = prod(v, "transpose", axes=[0, 2, 1, 3]).inputs[0]
        t, w, eps = maybe_norm(t) if normed else (t, None, None)
        r = prod(t, "reshape", shape=[0, 0, n, d])
        return r.inputs[0], w, eps

    q_s, q_norm, eps_q = head_of(rq.inputs[0], heads, True)
    k_s, k_norm, eps_k = head_of(rk.inputs[0], kv_heads, True)
    v_s, _, _ = head_of(att.inputs[2], kv_heads, False)
    sp = prod(q_s, "split")
    need(list(sp.outputs) == [q_s, k_s, v_s] and sp.attrs.get("sizes") == [heads * d, kv_heads * d, kv_heads * d])
    n1, qkv_w, qkv_b = proj(sp.inputs[0])
    x_in, norm1, eps1 = norm(n1)
    need(x_in == x and (q_norm is None) == (k_norm is None))
    need(len(seen) == len(fn.ops))  # nothing else in the body
    attrs = {"eps1": eps1, "eps2": eps2, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "inter": inter,
             "scale": att.attrs["scale"], "act": glu.attrs["kind"]}
    optional = [q_norm, k_norm, post_attn, post_ff]
    for name, eps in (("eps_q", eps_q), ("eps_k", eps_k), ("eps_pa", eps_pa), ("eps_pf", eps_pf)):
        if eps is not None:
            attrs[name] = eps
    if att.attrs.get("softcap") is not None:
        attrs["softcap"] = att.attrs["softcap"]
    while optional and optional[-1] is None:
        optional.pop()
    return Op("decode_layer", [x, cos, sin, mask, cache, norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, d_w, d_b,
                               *optional], ["%fast"], attrs)
