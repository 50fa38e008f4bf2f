"""The body patterns the cpu target's fast paths replace: ``decode_layer_fast_path`` finds a
decoder layer (``layers.decoder_layer`` after the ``qkv`` and ``gate_up`` fusions, with any
of its Gemma and Qwen3 options, and the Gemma 4 layer's: value norm, KV-shared attention,
a per-layer input branch, an output scalar; Qwen3.5's: rotary on part of each head, an
output gate from q_proj) by its data flow and gives the ``decode_layer`` op that ``lower``
attaches to the block (``Block.fast_path``). Gated DeltaNet layers: ``deltanet_path.py``."""
from __future__ import annotations

from ..ir.core import Function, Op

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
    -> + h [-> + norm(proj(act(gate(.)) * select_layer(per-layer inputs)))] [-> * scalar].
    Values may be RMS-normed per head (weighted or not). A layer may instead project
    queries only and read another layer's cache (``shared_attention``; ``lower`` then fills
    in that cache's KV head count). The rotary tables may be block inputs or a per-layer
    choice among them (``$``: Gemma 3's local and global tables). Any other body (or
    wiring) gets None."""
    return decode_layer_match(fn)[0]


def decode_layer_match(fn: Function) -> tuple[Op | None, str]:
    """(the ``decode_layer`` op, "") or (None, why this body is not one): the first place
    where its data flow leaves the pattern, for ``lower``'s notes."""
    try:
        return _match(fn), ""
    except _NoMatch as e:
        return None, str(e)


def _matcher(fn: Function, mismatch: str):
    """The pattern matchers' shared pieces over ``fn``: (made: value -> the op making it,
    seen: ids of the ops matched so far, need(cond, why=mismatch): raise _NoMatch unless
    cond, prod(v, kind, **attrs): the op of this kind (proj: linear/qlinear) that makes v,
    with these attrs, recorded in seen)."""
    made = {o: op for op in fn.ops for o in op.outputs}
    seen: set[int] = set()

    def need(cond, why: str = mismatch) -> None:
        if not cond:
            raise _NoMatch(why)

    def prod(v: str, kind: str, **attrs) -> Op:
        op = made.get(v)
        need(op is not None and (op.op == kind or (kind == "proj" and op.op in _PROJ)),
             f"{v} is made by {'no op' if op is None else op.op} where the pattern has {kind}")
        need(all(op.attrs.get(k) == a for k, a in attrs.items()), f"{op.op} making {v} has other attributes")
        seen.add(id(op))
        return op

    return made, seen, need, prod


def _match(fn: Function) -> Op:
    made, seen, need, prod = _matcher(fn, "its wiring differs from the pattern")

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

    need(len(fn.outputs) == 1 and len(fn.inputs) >= 5, "it does not take (x, rope tables, mask, cache)")
    x, mask, cache = fn.inputs[0], fn.inputs[-2], fn.inputs[-1]
    need(fn.types[cache].dtype == "kvcache", "its last input is not a KV cache")
    # the tail: [* scalar] after [the per-layer input branch] after the MLP's residual add
    y, out_scale = fn.outputs[0], None
    tail = made.get(y)
    if tail is not None and tail.op == "mul" and any(v.startswith("@") for v in tail.inputs):
        prod(y, "mul")
        y, out_scale = sorted(tail.inputs, key=lambda v: v.startswith("@"))
    ple = _ple_branch(y, made, prod, proj, norm, need) if any(op.op == "select_layer" for op in fn.ops) else None
    if ple is not None:
        y = ple["residual"]
        need(ple["input"] in fn.inputs, "its per-layer inputs are not a block input")
    add2 = prod(y, "add")
    for h, m in (add2.inputs, add2.inputs[::-1]):
        op = made.get(h)
        if op is not None and op.op == "add" and x in op.inputs:
            break
    else:
        raise _NoMatch("its output is not a second residual add")
    # the MLP: m = [post_ff](down(glu(split(gate_up(norm2(h))))))
    d_out, post_ff, eps_pf = maybe_norm(m)
    g, d_w, d_b = proj(d_out)
    glu = prod(g, "glu")
    need(glu.attrs.get("kind") in _GATES and len(glu.inputs) == 2,
         f"the MLP gate {glu.attrs.get('kind')} is not one the C layer computes ({', '.join(_GATES)})")
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
    gate_in = None  # Qwen3.5: the attention output times sigmoid(gate columns of q_proj)
    if made.get(r_out) is not None and made[r_out].op == "mul":
        g0, g1 = prod(r_out, "mul").inputs
        sig, r_out = (g1, g0) if made.get(g1) is not None and made[g1].op == "act" else (g0, g1)
        gate = prod(sig, "act")
        need(gate.attrs.get("kind") == "sigmoid", "its attention output is gated by another activation")
        gate_in = gate.inputs[0]
    a_in = prod(prod(r_out, "reshape").inputs[0], "transpose", axes=[0, 2, 1, 3]).inputs[0]
    shared = made.get(a_in) is not None and made[a_in].op == "shared_attention"
    att = prod(a_in, "shared_attention" if shared else "cached_attention")

    def roped(v: str) -> tuple[Op, str, int | None]:
        """(the rope op, the heads it reads, the rotary width where only part of each head
        is rotated: concat(rope(first part), rest) of one split)."""
        op = made.get(v)
        if op is None or op.op != "concat":
            r = prod(v, "rope")
            return r, r.inputs[0], None
        cat = prod(v, "concat")
        r = prod(cat.inputs[0], "rope")
        sp = prod(r.inputs[0], "split")
        need(len(cat.inputs) == 2 and list(sp.outputs) == [r.inputs[0], cat.inputs[1]]
             and cat.attrs.get("axis") in (-1, 3) and sp.attrs.get("axis") in (-1, 3),
             "its partial rotary is not concat(rope(first part), rest) of one split")
        return r, sp.inputs[0], sp.attrs["sizes"][0]

    rq, q_heads, rope_dim = roped(att.inputs[0])
    rk, k_heads, k_rope = (None, None, None) if shared else roped(att.inputs[1])
    need(shared or k_rope == rope_dim, "q and k rotate different widths")
    need(gate_in is None or not shared, "a gated layer reads another layer's cache")
    d = fn.types[q_heads].shape[-1]
    heads, kv_heads = fn.types[q_heads].shape[1], 0 if shared else fn.types[k_heads].shape[1]
    need(all(isinstance(n, int) for n in (d, heads, kv_heads)), "its head counts are not fixed numbers")
    need(made[r_out].attrs.get("shape") == [0, 0, heads * d])
    need(att.inputs[1 if shared else 3:] == [cache, mask], "its attention does not read the block's cache and mask")
    cos, sin = rq.inputs[1:]
    need((shared or rk.inputs[1:] == [cos, sin]) and all(t in fn.inputs or t.startswith("$") for t in (cos, sin)),
         "q and k do not share rope tables that are block inputs")

    def head_of(v: str, n: int, normed: bool, gated: bool = False) -> tuple[str, str | None, float | None]:
        """The split output whose [B, n, L, D] heads v is (reshape, [rms_norm,] transpose);
        gated: reshape to [q, gate] per head, split, the gate half reshaped to gate_in."""
        t = prod(v, "transpose", axes=[0, 2, 1, 3]).inputs[0]
        t, w, eps = maybe_norm(t) if normed else (t, None, None)
        if not gated:
            return prod(t, "reshape", shape=[0, 0, n, d]).inputs[0], w, eps
        sp = prod(t, "split")
        g = prod(gate_in, "reshape", shape=[0, 0, n * d])
        need(list(sp.outputs) == [t, g.inputs[0]] and sp.attrs.get("sizes") == [d, d]
             and sp.attrs.get("axis") in (-1, 3), "its query heads and output gate are not one split")
        return prod(sp.inputs[0], "reshape", shape=[0, 0, n, 2 * d]).inputs[0], w, eps

    q_s, q_norm, eps_q = head_of(q_heads, heads, True, gate_in is not None)
    k_norm = eps_k = v_norm = eps_v = None
    if shared:  # queries only: the projection makes q's heads
        n1, qkv_w, qkv_b = proj(q_s)
    else:
        k_s, k_norm, eps_k = head_of(k_heads, kv_heads, True)
        v_s, v_norm, eps_v = head_of(att.inputs[2], kv_heads, True)
        sp = prod(q_s, "split")
        q_cols = heads * d * (2 if gate_in is not None else 1)
        need(list(sp.outputs) == [q_s, k_s, v_s] and sp.attrs.get("sizes") == [q_cols, kv_heads * d, kv_heads * d])
        n1, qkv_w, qkv_b = proj(sp.inputs[0])
    x_in, norm1, eps1 = norm(n1)
    need(x_in == x and (shared or (q_norm is None) == (k_norm is None)))
    # a norm the C layer takes only with its weight (an unweighted one there means none)
    need(all(w is not None for w, e in ((q_norm, eps_q), (k_norm, eps_k), (post_attn, eps_pa), (post_ff, eps_pf))
             if e is not None), "it has an unweighted query, key or sandwich norm")
    extra = [op.op for op in fn.ops if id(op) not in seen]
    need(not extra, f"the body has ops beyond a decoder layer: {', '.join(sorted(set(extra)))}")
    attrs = {"eps1": eps1, "eps2": eps2, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "inter": inter,
             "scale": att.attrs["scale"], "act": glu.attrs["kind"]}
    optional = [q_norm, k_norm, post_attn, post_ff, v_norm,
                *((ple["gate"], ple["proj"], ple["norm"]) if ple else (None,) * 3), out_scale]
    for name, eps in (("eps_q", eps_q), ("eps_k", eps_k), ("eps_pa", eps_pa), ("eps_pf", eps_pf), ("eps_v", eps_v)):
        if eps is not None:
            attrs[name] = eps
    if att.attrs.get("softcap") is not None:
        attrs["softcap"] = att.attrs["softcap"]
    if shared:
        attrs["shared"] = True
    if rope_dim is not None and rope_dim != d:
        attrs["rope_dim"] = rope_dim
    if gate_in is not None:
        attrs["q_gate"] = True
    if ple:
        attrs.update(ple_act=ple["act"], eps_ple=ple["eps"], ple_layer=ple["index"])
    while optional and optional[-1] is None:
        optional.pop()
    return Op("decode_layer", [x, cos, sin, mask, cache, *([ple["input"]] if ple else []), norm1, qkv_w, qkv_b, o_w,
                               o_b, norm2, gu_w, gu_b, d_w, d_b, *optional], ["%fast"], attrs)


def _ple_branch(y: str, made: dict, prod, proj, norm, need) -> dict:
    """The per-layer input branch ending in y = residual + norm(proj(act(gate(residual)) *
    select_layer(inputs))) (Gemma 4's per-layer embeddings): its parts."""
    add = prod(y, "add")
    for residual, branch in (add.inputs, add.inputs[::-1]):
        op = made.get(branch)
        if op is not None and op.op == "rms_norm":
            break
    else:
        raise _NoMatch("its per-layer input branch does not end in a normed residual add")
    p_out, norm_w, eps = norm(branch)
    need(norm_w is not None, "its per-layer input branch's norm has no weight")
    g, proj_w, proj_b = proj(p_out)
    mul = prod(g, "mul")
    a_out, sel_out = mul.inputs if made.get(mul.inputs[0]) is not None and made[mul.inputs[0]].op == "act" \
        else mul.inputs[::-1]
    act, sel = prod(a_out, "act"), prod(sel_out, "select_layer")
    need(act.attrs.get("kind") in _GATES, f"the per-layer input gate {act.attrs.get('kind')} is not one the C "
                                          f"layer computes ({', '.join(_GATES)})")
    g_in, gate_w, gate_b = proj(act.inputs[0])
    need(g_in == residual and gate_b is None and proj_b is None, "its per-layer input branch is wired otherwise")
    index = sel.attrs.get("index")
    need(isinstance(index, int) or (isinstance(index, str) and index.startswith("$")),
         "its per-layer input slot is neither a number nor a per-layer attribute")
    return {"residual": residual, "gate": gate_w, "proj": proj_w, "norm": norm_w, "eps": eps,
            "act": act.attrs["kind"], "input": sel.inputs[0], "index": index}
