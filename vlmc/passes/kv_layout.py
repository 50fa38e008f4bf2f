"""The ``kv_layout`` pass: how each attention layer's KV cache stores keys and values.

It runs before ``lower``, so fast paths are chosen for the layouts actually planned. Per
layer of every block with a ``cached_attention`` (the ``kv`` entry of its layer table,
which the runtime's caches follow):

- ``dense``: keys and values in the compute dtype, preallocated in steps;
- ``rotating``: a sliding window of ``window`` tokens: always for sliding-window layers,
  and for every layer under ``max_kv_size`` (then tokens older than the window are
  forgotten: a cap on memory, not the model's own attention);
- ``quantized``: uniform affine codes of ``bits`` (2, 3, 4 or 8) per ``group_size`` values;
- ``turboquant``: rotated, codebook-coded vectors with ``k_bits``/``v_bits`` (2-4); a
  fractional ``kv_bits`` such as 3.5 means 3-bit keys and 4-bit values.

A decoder whose attention layers differ in shape (Gemma 4: global layers with a wider head
than the sliding-window ones) has one attention block per shape; each row names its
decoder ``layer`` and, where they differ from the decoder's, its ``kv_heads`` and
``head_dim``, which the plan copies into the layer's ``kv`` (the runtime's caches read
them). The plan then lists the cache-owning layers in decoder order (``meta
["cache_layers"]``). Layers that read another layer's cache (``shared_attention``: Gemma 4's
KV-shared layers) own none.

Linear-attention layers (a block with a ``gated_delta_rule``) keep a ``recurrent`` state
instead: a fixed [heads, key_dim, value_dim] float32 matrix plus the causal convolution's
last inputs per sequence, planned in bytes per sequence (``bytes_per_sequence``), whatever
the context. In a hybrid decoder the plan lists every decoder layer in order
(``meta["cache_layers"]``: each layer's ``kv``), which is the runtime's cache list; the KV
options apply to the full-attention layers only.

The last full-attention layer feeds the LM head directly, so it is spared unless
``kv_quantize_last``: dense next to 8-bit codes, 8-bit codes next to fewer bits (near
lossless, and within the byte targets). With ``kv_memory_budget`` the pass picks the least
compression whose cache fits the budget at ``kv_context`` tokens. Requests a layer cannot
honour (quantizing a sliding-window layer, a head dim the codes do not fit) are reported,
not silently changed. The plan (bytes per token per layer and in total, at the planned
context) goes into ``meta["kv_plan"]`` and so the manifest and ``vlmc inspect``.
"""
from __future__ import annotations

from typing import Any

from ..ir.core import Block, Program
from ..options import KVLayoutError, KVOptions
from .lower import compute_dtype
from .manager import register

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Compression ladder for --kv-memory-budget, least lossy first.
LADDER: list[dict[str, Any]] = [
    {"layout": "dense"},
    {"layout": "quantized", "bits": 8},
    {"layout": "quantized", "bits": 4},
    {"layout": "turboquant", "k_bits": 3, "v_bits": 4},
    {"layout": "turboquant", "k_bits": 3, "v_bits": 3},
    {"layout": "turboquant", "k_bits": 2, "v_bits": 3},
    {"layout": "turboquant", "k_bits": 2, "v_bits": 2},
]


def attention_blocks(prog: Program) -> list[Block]:
    """The blocks whose layers keep a KV cache (their body has a ``cached_attention``)."""
    return [b for b in prog.blocks.values() if any(op.op == "cached_attention" for op in b.body.ops)]


def recurrent_blocks(prog: Program) -> list[Block]:
    """The blocks whose layers keep a recurrent state (their body has a ``gated_delta_rule``)."""
    return [b for b in prog.blocks.values() if any(op.op == "gated_delta_rule" for op in b.body.ops)]


def recurrent_spec(spec: dict[str, Any], compute: str) -> dict[str, Any]:
    """A linear-attention layer's cache: its sizes and bytes per sequence (the state in
    float32, the convolution's inputs in the compute dtype)."""
    state = spec["heads"] * spec["key_dim"] * spec["value_dim"] * 4
    conv = spec["conv_width"] * spec["conv_channels"] * DTYPE_BYTES[compute]
    keys = ("heads", "key_dim", "value_dim", "conv_channels", "conv_width")
    return {"layout": "recurrent", **{k: int(spec[k]) for k in keys}, "bytes_per_token": 0,
            "bytes_per_sequence": state + conv}


@register("kv_layout")
def kv_layout(prog: Program, options: KVOptions | None = None, target: str = "cpu") -> tuple[Program, str]:
    blocks, states = attention_blocks(prog), recurrent_blocks(prog)
    if not blocks:
        return prog, "no attention layers with a KV cache: nothing to plan"
    text = prog.meta["text"]
    compute = compute_dtype(target, prog.meta.get("dtype", "float32"))
    if len(blocks) > 1 or any("head_dim" in L for L in blocks[0].layers):
        if states:
            raise ValueError("a decoder with several attention blocks and recurrent layers is not planned")
        return _plan_blocks(prog, blocks, text, compute, options or KVOptions())
    blk = blocks[0]
    specs, summary_meta, summary = plan(
        blk.layers, kv_heads=text["num_kv_heads"], head_dim=text["head_dim"], compute=compute,
        max_context=text["max_position_embeddings"], options=options or KVOptions())
    for layer, spec in zip(blk.layers, specs):
        layer["kv"] = spec
    if states:
        rows = [L for b in states for L in b.layers]
        for L in rows:
            L["kv"] = recurrent_spec(L["kv"], compute)
        per_seq = sum(L["kv"]["bytes_per_sequence"] for L in rows)
        order = sorted([*blk.layers, *rows], key=lambda L: L["layer"])
        if [L["layer"] for L in order] != list(range(text["num_layers"])):
            raise ValueError("a hybrid decoder's blocks must hold each decoder layer once (layer-table 'layer')")
        prog.meta["cache_layers"] = [{"index": L["layer"], "kv": L["kv"]} for L in order]
        summary_meta.update(bytes_per_sequence=per_seq, recurrent_layers=len(rows),
                            bytes_at_context=summary_meta["bytes_at_context"] + per_seq)
        summary = (f"{len(rows)} x recurrent state ({per_seq / 2**20:.2f} MiB per sequence), "
                   f"full-attention layers: {summary}")
    prog.meta["kv_plan"] = summary_meta
    return prog, summary


def _plan_blocks(prog: Program, blocks: list[Block], text: dict[str, Any], compute: str,
                 options: KVOptions) -> tuple[Program, str]:
    """Several attention blocks (layers of different shapes): each planned with its own
    head count and head dim; the cache list is their layers in decoder order."""
    rows, metas, summaries = [], [], []
    for blk in blocks:
        first = blk.layers[0]
        heads, dim = int(first.get("kv_heads", text["num_kv_heads"])), int(first.get("head_dim", text["head_dim"]))
        specs, meta, summary = plan(blk.layers, kv_heads=heads, head_dim=dim, compute=compute,
                                    max_context=text["max_position_embeddings"], options=options)
        for layer, spec in zip(blk.layers, specs):
            if "layer" not in layer:
                raise ValueError(f"block {blk.name}: a decoder with several attention blocks names each row's layer")
            extra = {k: int(layer[k]) for k in ("kv_heads", "head_dim") if k in layer}
            layer["kv"] = {**spec, **extra}
        rows += blk.layers
        metas.append(meta)
        summaries.append(f"{blk.name}: {summary}")
    order = sorted(rows, key=lambda L: L["layer"])
    if [L["layer"] for L in order] != list(range(len(order))):
        raise ValueError("the attention blocks' layers must be the decoder's first layers, each once")
    prog.meta["cache_layers"] = [{"index": L["layer"], "kv": L["kv"]} for L in order]
    total = {k: sum(m[k] for m in metas) for k in ("bytes_per_token", "bytes_at_context",
                                                     "dense_bfloat16_bytes_per_token")}
    prog.meta["kv_plan"] = {**metas[0], **total, "notes": sorted({n for m in metas for n in m["notes"]}),
                            "ratio_to_dense_bfloat16": round(total["bytes_per_token"]
                                                             / total["dense_bfloat16_bytes_per_token"], 4)}
    return prog, "; ".join(summaries)


def bytes_per_token(spec: dict[str, Any], kv_heads: int, head_dim: int, compute: str) -> int:
    """Stored bytes of one token's keys and values in one layer (batch 1)."""
    layout = spec["layout"]
    if layout in ("dense", "rotating"):
        per = head_dim * DTYPE_BYTES[compute] * 2
    elif layout == "quantized":
        per = 2 * (head_dim * spec["bits"] // 8 + 2 * 2 * (head_dim // spec["group_size"]))  # codes + bf16 scale, min
    else:
        per = sum(head_dim * spec[f"{w}_bits"] // 8 + 4 for w in ("k", "v"))  # codes + float32 norm
    return per * kv_heads


def auto_group_size(head_dim: int) -> int | None:
    """64 when it divides the head dim, else the largest of 128, 32, 16 that does."""
    return next((g for g in (64, 128, 32, 16) if head_dim % g == 0), None)


def _fits(spec: dict[str, Any], head_dim: int) -> str | None:
    """Why ``spec`` cannot store vectors of ``head_dim`` (None when it can)."""
    if spec["layout"] == "quantized" and (spec["group_size"] is None or head_dim % spec["group_size"]):
        return f"head dim {head_dim} is not a multiple of the group size {spec['group_size'] or 16}"
    if spec["layout"] == "turboquant" and head_dim % 8:
        return f"head dim {head_dim} is not a multiple of 8"
    return None


def plan(layers: list[dict[str, Any]], *, kv_heads: int, head_dim: int, compute: str, max_context: int,
         options: KVOptions) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """(one kv spec per layer, the plan summary for the manifest, a one-line description).
    ``layers`` are the decoder's layer-table entries (``index``, optional ``window``)."""
    o = options
    context = int(o.kv_context or max_context)
    full = [L for L in layers if not L.get("window")]
    last_full = full[-1]["index"] if full else None
    notes: list[str] = []

    def plan_with(wanted: dict[str, Any]) -> list[dict[str, Any]]:
        specs = []
        for L in layers:
            if L.get("window"):
                spec = {"layout": "rotating", "window": int(L["window"])}
                if wanted["layout"] != "dense":
                    notes.append(f"layer {L['index']}: sliding-window layer ({L['window']} tokens) kept rotating dense")
            elif wanted["layout"] != "dense" and L["index"] == last_full and not o.kv_quantize_last:
                spec = _spared(wanted, head_dim)
            else:
                spec = dict(wanted)
                if spec["layout"] == "quantized" and spec.get("group_size") is None:
                    spec["group_size"] = auto_group_size(head_dim)
                if (why := _fits(spec, head_dim)) is not None:
                    raise KVLayoutError(f"{spec['layout']} KV cannot be used for this model: {why}")
            if o.max_kv_size is not None and not L.get("window"):
                if spec["layout"] != "dense":
                    raise KVLayoutError("--max-kv-size caps layers with a dense rotating window; "
                                        "it cannot be combined with KV quantization")
                spec = {"layout": "rotating", "window": o.max_kv_size}
            spec["bytes_per_token"] = bytes_per_token(spec, kv_heads, head_dim, compute)
            specs.append(spec)
        return specs

    def total(specs: list[dict[str, Any]]) -> int:
        return sum(s["bytes_per_token"] * min(context, s.get("window", context)) for s in specs)

    if o.kv_memory_budget is not None:
        for wanted in LADDER:
            if wanted["layout"] == "quantized":
                wanted = {**wanted, "group_size": o.kv_group_size}
            notes.clear()
            specs = plan_with(wanted)
            if total(specs) <= o.kv_memory_budget:
                break
        else:
            raise KVLayoutError(f"no KV layout fits {o.kv_memory_budget} bytes at {context} tokens: the smallest "
                                f"needs {total(specs)} bytes; lower --kv-context or raise --kv-memory-budget")
    else:
        specs = plan_with(o.requested())
    dense_bf16 = bytes_per_token({"layout": "dense"}, kv_heads, head_dim, "bfloat16") * len(specs)
    per_token = sum(s["bytes_per_token"] for s in specs)
    summary_meta = {
        "context": context, "bytes_per_token": per_token, "bytes_at_context": total(specs),
        "dense_bfloat16_bytes_per_token": dense_bf16, "ratio_to_dense_bfloat16": round(per_token / dense_bf16, 4),
        "budget": o.kv_memory_budget, "notes": sorted(set(notes)),
    }
    kinds: dict[str, int] = {}
    for s in specs:
        key = describe(s)
        kinds[key] = kinds.get(key, 0) + 1
    summary = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    summary += (f"; {per_token} B/token ({per_token / dense_bf16:.2f}x dense bf16), "
                f"{total(specs) / 2**20:.1f} MiB at {context} tokens")
    if notes:
        summary += "; " + "; ".join(sorted(set(notes))[:3])
    return specs, summary_meta, summary


def _spared(wanted: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The last full-attention layer's layout: dense next to 8-bit codes, 8-bit codes next
    to fewer bits (when 8-bit codes fit the head dim)."""
    if wanted["layout"] == "quantized" and wanted["bits"] >= 8:
        return {"layout": "dense"}
    eight = {"layout": "quantized", "bits": 8, "group_size": auto_group_size(head_dim)}
    return {"layout": "dense"} if _fits(eight, head_dim) is not None else eight


def describe(spec: dict[str, Any]) -> str:
    layout = spec["layout"]
    if layout == "recurrent":
        return f"recurrent state {spec['heads']}x{spec['key_dim']}x{spec['value_dim']} + conv {spec['conv_width']}"
    if layout == "quantized":
        return f"quantized {spec['bits']}-bit g{spec['group_size']}"
    if layout == "turboquant":
        return f"turboquant k{spec['k_bits']}/v{spec['v_bits']}"
    if layout == "rotating":
        return f"rotating {spec['window']}"
    return "dense"
