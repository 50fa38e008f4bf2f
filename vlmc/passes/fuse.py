"""Fusion: sibling projections become one matmul, their weights concatenated at compile time.

- ``qkv``: q/k/v (or any non-MLP projections) reading the same normalized input.
- ``gate_up``: an MLP's gate and up projections.
- ``add_norm``: a residual add and the RMSNorm that reads its sum become one
  ``add_rms_norm`` op (a single pass over the row with vlmc's GPU kernel; on the CPU
  target the same two MLX ops).
- ``decode_layer`` (cpu target, applied when lowering): a pre-norm decoder layer gets a
  fast path, one C call per decode step instead of ~20 op calls
  (``fast_path.decode_layer_fast_path``).

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
        if add is None or len(norm.inputs) < 2 or norm.inputs[1] is None or not norm.inputs[1].startswith("@"):
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
