"""The cpu target's fast path for Gated DeltaNet layers: ``deltanet_match`` finds the body
``models.common.linear_attention.gated_deltanet_layer`` builds (after the ``gate_up``
fusion) by its data flow and gives the ``deltanet_layer`` op that ``lower`` attaches to the
block (``Block.fast_path``; ``kernels/cpu/deltanet.py`` runs it)."""
from __future__ import annotations

from ..ir.core import Function, Op
from .fast_path import _GATES, _NoMatch, _matcher


def deltanet_match(fn: Function, params: dict) -> tuple[Op | None, str]:
    """(the ``deltanet_layer`` op, "") or (None, why this body is not a DeltaNet layer);
    ``params``: the block's per-layer param types (``Block.param_shapes``)."""
    try:
        return _match(fn, params), ""
    except _NoMatch as e:
        return None, str(e)


def _match(fn: Function, params: dict) -> Op:
    made, seen, need, prod = _matcher(fn, "its wiring differs from the Gated DeltaNet layer")

    def param(v: str) -> str:
        need(isinstance(v, str) and v.startswith("@"), f"{v} is not a parameter")
        return v

    def proj(v: str) -> tuple[str, str]:
        op = prod(v, "proj")
        need(len(op.inputs) < 3 or op.inputs[2] is None, "a projection has a bias")
        return op.inputs[0], param(op.inputs[1])

    def norm(v: str) -> tuple[str, str, float]:
        op = prod(v, "rms_norm")
        return op.inputs[0], param(op.inputs[1]), op.attrs["eps"]

    need(len(fn.outputs) == 1 and len(fn.inputs) == 5, "it does not take (x, rope tables, mask, cache)")
    x, mask, cache = fn.inputs[0], fn.inputs[3], fn.inputs[4]
    need(fn.types[cache].dtype == "kvcache", "its last input is not a cache")
    need(any(op.op == "gated_delta_rule" for op in fn.ops), "it has no gated delta rule")
    add2 = prod(fn.outputs[0], "add")
    h, m = add2.inputs if made.get(add2.inputs[0]) is not None and made[add2.inputs[0]].op == "add" \
        else add2.inputs[::-1]
    g_in, down = proj(m)
    glu = prod(g_in, "glu")
    need(glu.attrs.get("kind") in _GATES and len(glu.inputs) == 2, "its MLP gate is not one the C layer computes")
    sp2 = prod(glu.inputs[0], "split")
    inter = (sp2.attrs.get("sizes") or [None])[0]
    need(list(sp2.outputs) == glu.inputs and sp2.attrs.get("sizes") == [inter, inter] and isinstance(inter, int))
    n2, gate_up = proj(sp2.inputs[0])
    h_in, norm2, eps2 = norm(n2)
    need(h_in == h)
    add1 = prod(h, "add")
    need(x in add1.inputs, "its first residual add does not read x")
    o_in, out = proj(add1.inputs[1] if add1.inputs[0] == x else add1.inputs[0])
    gated = prod(prod(o_in, "reshape").inputs[0], "rms_norm_gated")
    delta_v, z_v, o_norm = gated.inputs[0], gated.inputs[1], param(gated.inputs[2])
    zp, z = proj(prod(z_v, "reshape").inputs[0])
    rule = prod(delta_v, "gated_delta_rule")
    q_v, k_v, v_v, g_v, b_v, rule_cache = rule.inputs
    need(rule_cache == cache, "its recurrence does not read the block's cache")
    ql, kl = prod(q_v, "l2_norm", eps=1e-6), prod(k_v, "l2_norm", eps=1e-6)
    q_r, k_r, v_r = prod(ql.inputs[0], "reshape"), prod(kl.inputs[0], "reshape"), prod(v_v, "reshape")
    sp = prod(q_r.inputs[0], "split")
    need(list(sp.outputs) == [q_r.inputs[0], k_r.inputs[0], v_r.inputs[0]], "q, k, v are not the conv's split")
    conv = prod(sp.inputs[0], "causal_conv1d", activation="silu")
    need(conv.inputs[2] == cache, "its convolution does not read the block's cache")
    conv_w = param(conv.inputs[1])
    zq, qkv = proj(conv.inputs[0])
    gates = prod(g_v, "delta_gates")
    need(list(gates.outputs) == [g_v, b_v], "the decay and rate are not one delta_gates'")
    za, a = proj(gates.inputs[0])
    zb, b = proj(gates.inputs[1])
    a_log, dt_bias = param(gates.inputs[2]), param(gates.inputs[3])
    need(zp == zq == za == zb, "the in-projections do not read one normed input")
    zpad = prod(zp, "zero_padded")
    need(zpad.inputs[1] == mask, "its padding rows are not zeroed by the block's mask")
    x_in, norm1, eps1 = norm(zpad.inputs[0])
    need(x_in == x, "its first norm does not read x")
    hk, dk = q_r.attrs["shape"][2:]
    hv, dv = v_r.attrs["shape"][2:]
    sizes = sp.attrs.get("sizes")
    need(sizes == [hk * dk, hk * dk, hv * dv] and k_r.attrs["shape"][2:] == [hk, dk] and hv % hk == 0,
         "its heads do not split the conv channels as q, k, v")
    conv_type = params.get(conv_w[1:])
    kern = conv_type.shape[1] if conv_type is not None and len(conv_type.shape) == 2 else None
    need(isinstance(kern, int) and kern >= 2, "its conv kernel width is not a fixed number")
    extra = [op.op for op in fn.ops if id(op) not in seen]
    need(not extra, f"the body has ops beyond a Gated DeltaNet layer: {', '.join(sorted(set(extra)))}")
    attrs = {"eps1": eps1, "eps2": eps2, "eps_o": gated.attrs["eps"], "key_heads": hk, "value_heads": hv,
             "key_dim": dk, "value_dim": dv, "conv_kernel": kern, "inter": inter, "scale": rule.attrs["scale"],
             "act": glu.attrs["kind"]}
    return Op("deltanet_layer", [x, mask, cache, norm1, qkv, z, b, a, conv_w, a_log, dt_bias, o_norm, out, norm2,
                                 gate_up, down], ["%fast"], attrs)
