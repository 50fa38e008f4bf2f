"""Weight quantization: named schemes, a per-layer policy, every decision recorded.

Schemes: affine ``q2 q3 q4 q5 q6 q8`` (group size 32/64/128, scale+bias per group) and the
microscaling formats ``mxfp4 mxfp8 nvfp4`` (fixed groups). The pass only decides: it
marks params with ``attrs["quant"]`` and rewrites their uses (``linear`` -> ``qlinear``,
``embedding`` -> ``qembedding``); the backend quantizes each weight once when it writes
the artifact and records its reconstruction error in the manifest.

Policy:
- text decoder projections get the scheme;
- the vision tower and projector too unless ``vision=False``;
- embeddings and the LM head get ``head`` (default ``auto_head``: q6 under affine 2-4 bits,
  q8 under 5-6 bits, mxfp8 under mxfp4/nvfp4, float under 8-bit schemes; ``"none"`` keeps
  them in float);
- ``recipe="mixed"`` raises sensitive weights (first and last decoder layers, the q/k/v
  projection that holds v_proj, down_proj) to 6 bits (8 for q2/q3);
- a weight whose input dimension does not split into groups stays float and is reported;
- routed experts' stacked [experts, out, in] weights get the scheme like any projection,
  each expert's rows quantized on their own (``moe_experts`` -> ``qmoe_experts``); the
  router and a shared expert's scalar gate (role ``router``) stay float: they choose
  experts, and a rounding there changes which experts run;
- ``activations=True`` (mxfp8 / nvfp4 only) also rounds the inputs of the linear layers that
  carry a block-floating scheme (not the embeddings/LM head) to their weight's format:
  ``linear`` -> ``qqlinear``, the product of two block-quantized operands that MLX's
  ``qqmm`` computes. Each such weight's record says ``"activations": mode``;
- the attention of a vision block whose weights are quantized is marked ``dot="bfloat16"``:
  its products may be taken of bfloat16-rounded operands (the cpu target's lanes kernel
  then runs vdpbf16ps, 1.6x float32's speed; an output error near 4e-3 of its scale, well
  under what 4-8 bit weights already cost the tower). A float tower keeps float32.
"""
from __future__ import annotations

from typing import Any

from ..ir.core import Function, Param, Program
from ..options import ACTIVATION_SCHEMES as ACTIVATION_MODES
from ..options import AFFINE_SCHEMES as AFFINE
from ..options import MICROSCALING_SCHEMES as MICROSCALING
from ..options import QUANT_SCHEMES as SCHEMES
from .manager import register


def scheme_spec(scheme: str, group_size: int) -> dict[str, Any]:
    if scheme in AFFINE:
        if group_size not in (32, 64, 128):
            raise ValueError(f"group size must be 32, 64 or 128, got {group_size}")
        return {"scheme": scheme, "mode": "affine", "bits": AFFINE[scheme], "group_size": group_size}
    if scheme in MICROSCALING:
        bits, group = MICROSCALING[scheme]
        return {"scheme": scheme, "mode": scheme, "bits": bits, "group_size": group}
    raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def _uses(fn: Function, prefixes: list[str], out: dict[str, set[str]]) -> None:
    """Collect param name -> {"linear", "embedding"} for weights used as matmul/table operands
    (a tied embedding is both)."""
    for op in fn.ops:
        if op.op in ("linear", "embedding") and op.inputs[1].startswith("@"):
            for pre in prefixes:
                out.setdefault(pre + op.inputs[1][1:], set()).add(op.op)
        if op.op == "moe_experts":
            for w in op.inputs[3:5]:
                for pre in prefixes:
                    out.setdefault(pre + w[1:], set()).add("experts")


def _op_kind(spec: dict[str, Any] | None) -> str:
    """What a linear over a weight with this decision becomes (see _rewrite)."""
    return "float" if spec is None else "quantized with its activations" if spec.get("activations") else "quantized"


def _rewrite(fn: Function, spec_of) -> None:
    """linear/embedding over a quantized weight -> qlinear/qembedding (qqlinear where the
    activations are quantized too). The scheme travels with the weight (the runtime loads it
    as a QuantWeight), so layers of one block may differ. moe_experts with a quantized
    expert weight -> qmoe_experts (each of its two weights float or quantized)."""
    for op in fn.ops:
        if op.op == "moe_experts" and any(spec_of(w[1:]) is not None for w in op.inputs[3:5]):
            op.op = "qmoe_experts"
        if op.op in ("linear", "embedding") and op.inputs[1].startswith("@"):
            spec = spec_of(op.inputs[1][1:])
            if spec is None:
                continue
            if op.op == "embedding":
                op.op = "qembedding"
            else:
                op.op = "qqlinear" if spec.get("activations") else "qlinear"


def _sensitive(p: Param, last_layer: int) -> bool:
    """A decoder weight the mixed recipe keeps at higher precision: the first and last
    layers', and any projection that holds v or down (fused ones included)."""
    if p.part != "text":
        return False
    return p.attrs.get("layer") in (0, last_layer) or \
        bool({"v", "down", "experts_down"} & set((p.role or "").split("+")))


def auto_head(base: dict[str, Any]) -> str | None:
    """The embeddings/LM head scheme for ``head="auto"``: float for 8-bit schemes; q6 under
    affine 2-4 bits (as llama.cpp's Q4_K_M keeps its output layer at 6 bits: a tied head
    is a large share of a small model's bytes); q8 for 5-6
    bits; mxfp8 under the microscaling schemes."""
    if base["bits"] >= 8:
        return None
    if base["mode"] != "affine":
        return "mxfp8"
    return "q6" if base["bits"] <= 4 else "q8"


@register("quantize")
def quantize(prog: Program, scheme: str | None = None, group_size: int = 64, vision: bool = True,
             head: str | None = "auto", recipe: str = "uniform", activations: bool = False,
             params: str | None = None, params_max_bits: int | None = None) -> tuple[Program, str]:
    if scheme is None:
        if activations:
            raise ValueError("quantized activations need a weight scheme (mxfp8 or nvfp4)")
        return prog, "off"
    base = scheme_spec(scheme, group_size)
    if activations and base["mode"] not in ACTIVATION_MODES:
        raise ValueError(f"activations can be quantized under {' or '.join(ACTIVATION_MODES)} only, not {scheme}")
    if recipe not in ("uniform", "mixed"):
        raise ValueError(f"recipe must be uniform or mixed, got {recipe!r}")
    if head == "auto":
        head = auto_head(base)
    head_spec = None if head in (None, "none") else scheme_spec(head, group_size if head in AFFINE else 0)
    raised = scheme_spec("q8" if base["bits"] <= 3 else "q6", group_size) if base["mode"] == "affine" \
        else scheme_spec("mxfp8", 0)
    if raised["bits"] <= base["bits"]:
        raised = base  # already at or above the sensitive-layer precision

    uses: dict[str, set[str]] = {}
    for blk in prog.blocks.values():
        _uses(blk.body, [blk.param_prefix.format(i=i) for i in range(len(blk.layers))], uses)
    for fn in prog.functions.values():
        _uses(fn, [""], uses)
    last_layer = prog.meta.get("text", {}).get("num_layers", 0) - 1
    decided: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    for name, use in sorted(uses.items()):
        p: Param = prog.params[name]
        if len(p.shape) != (3 if use == {"experts"} else 2) or p.role == "router":
            continue
        is_head = "embedding" in use or p.role in ("embed", "head")
        if is_head:
            spec = head_spec
        elif p.part in ("vision", "projector"):
            spec = base if vision else None
        else:
            spec = raised if recipe == "mixed" and _sensitive(p, last_layer) else base
        if spec is None:
            continue
        if p.shape[-1] % spec["group_size"]:
            kept.append(f"{name} (in={p.shape[-1]})")
            continue
        if activations and not is_head and spec["mode"] in ACTIVATION_MODES and use == {"linear"}:
            spec = {**spec, "activations": spec["mode"]}
        if (params is not None and spec["mode"] == "affine" and "embedding" not in use
                and spec["bits"] <= (params_max_bits or spec["bits"])):
            # scales and biases stored as ``params`` (a table that embeds keeps the weights'
            # dtype: its gathered rows take the parameters' dtype, as MLX's dequantize does)
            spec = {**spec, "param_dtype": params}
        p.attrs["quant"] = dict(spec)
        decided[name] = spec

    for blk in prog.blocks.values():
        for rel in blk.param_shapes:
            # a block body is shared: its layers must all take the same op (float, quantized
            # weight, or quantized weight and activations)
            kinds = {_op_kind(decided.get(blk.param_prefix.format(i=i) + rel)) for i in range(len(blk.layers))}
            if len(kinds) > 1:
                raise ValueError(f"{blk.name}: {rel} is {' in some layers, '.join(sorted(kinds))} in others")
        first = blk.param_prefix.format(i=0)
        _rewrite(blk.body, lambda rel, first=first: decided.get(first + rel))
    for fn in prog.functions.values():
        _rewrite(fn, decided.get)
    marked = _bf16_vision_attention(prog, decided)
    counts: dict[str, int] = {}
    for spec in decided.values():
        key = spec["scheme"] + (" (activations too)" if spec.get("activations") else "")
        counts[key] = counts.get(key, 0) + 1
    prog.meta["quantization"] = {"scheme": scheme, "group_size": base["group_size"], "vision": vision,
                                 "head": head, "recipe": recipe, "activations": activations, "kept_float": kept,
                                 **({"params": params} if params is not None else {}),
                                 **({"params_max_bits": params_max_bits} if params_max_bits else {})}
    summary = ", ".join(f"{v} weights {k}" for k, v in sorted(counts.items()))
    if kept:
        summary += f"; {len(kept)} kept float (group size does not divide): {', '.join(kept[:4])}"
    if marked:
        summary += f"; bfloat16 attention products in {', '.join(marked)}"
    return prog, summary


def _bf16_vision_attention(prog: Program, decided: dict[str, dict[str, Any]]) -> list[str]:
    """Mark ``dot="bfloat16"`` on the attention ops of vision blocks with a quantized weight;
    the names of the blocks marked."""
    marked = []
    for blk in prog.blocks.values():
        names = [blk.param_prefix.format(i=0) + rel for rel in blk.param_shapes]
        if not any(prog.params[n].part == "vision" for n in names if n in prog.params) or \
                not any(n in decided for n in names):
            continue
        ops = [op for op in blk.body.ops if op.op == "attention"]
        for op in ops:
            op.attrs["dot"] = "bfloat16"
        if ops:
            marked.append(blk.name)
    return marked
