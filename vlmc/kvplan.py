"""KV-cache planning: how each attention layer's cache stores keys and values.

Shared by the ``kv_layout`` pass (at compile time) and the runtime (``vlmc.load`` /
``vlmc run`` options that re-plan an artifact's caches); it needs no IR.

Per decoder layer (the ``kv`` entry of the text block's layer table):

- ``dense``: keys and values in the compute dtype, preallocated in steps;
- ``rotating``: a sliding window of ``window`` tokens: always for sliding-window layers,
  and for every layer under ``max_kv_size`` (then tokens older than the window are
  forgotten: a cap on memory, not the model's own attention);
- ``quantized``: uniform affine codes of ``bits`` (2, 3, 4 or 8) per ``group_size`` values;
- ``turboquant``: rotated, codebook-coded vectors with ``k_bits``/``v_bits`` (2-4); a
  fractional ``kv_bits`` such as 3.5 means 3-bit keys and 4-bit values.

The last full-attention layer is spared unless ``quantize_last``: it feeds the LM head
directly. Under 8-bit codes it stays dense; under fewer bits it keeps 8-bit codes, which
are near lossless and keep the whole plan within the byte targets (Qwen2-VL-2B shapes:
4-bit 0.29x and TurboQuant 3.5-bit 0.245x of dense bf16, where a dense last layer gave
0.31x and 0.26x). With ``kv_memory_budget`` the pass picks the least compression whose cache fits
the budget at ``context`` tokens. Requests a layer cannot honour (quantizing a
sliding-window layer, a head dim the codes do not fit) are reported, not silently
changed. The plan (bytes per token per layer and in total, at the planned context) goes
into the manifest and ``vlmc inspect``.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import VlmcError


SCHEMES = ("uniform", "turboquant")
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


OPTIONS = ("kv_bits", "kv_quant_scheme", "kv_group_size", "max_kv_size", "kv_memory_budget", "context",
           "quantize_last")


def compile_options(kv: dict[str, Any]) -> dict[str, Any]:
    """``vlmc.load`` / ``plan`` KV option names -> ``vlmc.compile`` keyword names."""
    renamed = {"context": "kv_context", "quantize_last": "kv_quantize_last"}
    return {renamed.get(k, k): v for k, v in kv.items()}


class KVLayoutError(VlmcError, ValueError):
    """A KV option the model cannot honour, or a budget nothing fits."""


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


def requested_spec(kv_bits: float | None, scheme: str, group_size: int | None) -> dict[str, Any]:
    if kv_bits is None:
        return {"layout": "dense"}
    if scheme not in SCHEMES:
        raise KVLayoutError(f"--kv-quant-scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "uniform":
        if kv_bits != int(kv_bits) or int(kv_bits) not in (2, 3, 4, 8):
            raise KVLayoutError(f"uniform KV quantization takes 2, 3, 4 or 8 bits, got {kv_bits:g} "
                                "(fractional bits need --kv-quant-scheme turboquant)")
        if group_size is not None and group_size not in (16, 32, 64, 128):
            raise KVLayoutError(f"--kv-group-size must be 16, 32, 64 or 128, got {group_size}")
        return {"layout": "quantized", "bits": int(kv_bits), "group_size": group_size}
    k_bits, v_bits = math.floor(kv_bits), math.ceil(kv_bits)
    if kv_bits * 2 != int(kv_bits * 2) or k_bits < 2 or v_bits > 4:
        raise KVLayoutError(f"TurboQuant KV takes 2 to 4 bits in steps of 0.5 (e.g. 3.5 = 3-bit keys, "
                            f"4-bit values), got {kv_bits:g}")
    return {"layout": "turboquant", "k_bits": k_bits, "v_bits": v_bits}


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
         kv_bits: float | None = None, kv_quant_scheme: str = "uniform", kv_group_size: int | None = None,
         max_kv_size: int | None = None, kv_memory_budget: int | None = None, context: int | None = None,
         quantize_last: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """(one kv spec per layer, the plan summary for the manifest, a one-line description).
    ``layers`` are the decoder's layer-table entries (``index``, optional ``window``)."""
    if max_kv_size is not None and max_kv_size < 1:
        raise KVLayoutError(f"--max-kv-size must be at least 1 token, got {max_kv_size}")
    if kv_memory_budget is not None and kv_bits is not None:
        raise KVLayoutError("give either --kv-bits or --kv-memory-budget, not both (the budget picks the bits)")
    context = int(context or max_context)
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
            elif wanted["layout"] != "dense" and L["index"] == last_full and not quantize_last:
                spec = _spared(wanted, head_dim)
            else:
                spec = dict(wanted)
                if spec["layout"] == "quantized" and spec.get("group_size") is None:
                    spec["group_size"] = auto_group_size(head_dim)
                if (why := _fits(spec, head_dim)) is not None:
                    raise KVLayoutError(f"{spec['layout']} KV cannot be used for this model: {why}")
            if max_kv_size is not None and not L.get("window"):
                if spec["layout"] != "dense":
                    raise KVLayoutError("--max-kv-size caps layers with a dense rotating window; "
                                        "it cannot be combined with KV quantization")
                spec = {"layout": "rotating", "window": max_kv_size}
            spec["bytes_per_token"] = bytes_per_token(spec, kv_heads, head_dim, compute)
            specs.append(spec)
        return specs

    def total(specs: list[dict[str, Any]]) -> int:
        return sum(s["bytes_per_token"] * min(context, s.get("window", context)) for s in specs)

    if kv_memory_budget is not None:
        for wanted in LADDER:
            if wanted["layout"] == "quantized":
                wanted = {**wanted, "group_size": kv_group_size}
            notes.clear()
            specs = plan_with(wanted)
            if total(specs) <= kv_memory_budget:
                break
        else:
            raise KVLayoutError(f"no KV layout fits {kv_memory_budget} bytes at {context} tokens: the smallest "
                                f"needs {total(specs)} bytes; lower the context or raise the budget")
    else:
        specs = plan_with(requested_spec(kv_bits, kv_quant_scheme, kv_group_size))
    dense_bf16 = bytes_per_token({"layout": "dense"}, kv_heads, head_dim, "bfloat16") * len(specs)
    per_token = sum(s["bytes_per_token"] for s in specs)
    summary_meta = {
        "context": context, "bytes_per_token": per_token, "bytes_at_context": total(specs),
        "dense_bfloat16_bytes_per_token": dense_bf16, "ratio_to_dense_bfloat16": round(per_token / dense_bf16, 4),
        "budget": kv_memory_budget, "notes": sorted(set(notes)),
    }
    kinds: dict[str, int] = {}
    for s in specs:
        key = describe(s)
        kinds[key] = kinds.get(key, 0) + 1
    summary = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    summary += f"; {per_token} B/token ({per_token / dense_bf16:.2f}x dense bf16), {total(specs) / 2**20:.1f} MiB at {context} tokens"
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
    if layout == "quantized":
        return f"quantized {spec['bits']}-bit g{spec['group_size']}"
    if layout == "turboquant":
        return f"turboquant k{spec['k_bits']}/v{spec['v_bits']}"
    if layout == "rotating":
        return f"rotating {spec['window']}"
    return "dense"
