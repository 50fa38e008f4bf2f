"""Compact text form of a Program (what ``vlmc inspect`` prints)."""
from __future__ import annotations

from .core import Function, Program


def _fmt_attrs(attrs: dict) -> str:
    parts = []
    for k, v in attrs.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        parts.append(f"{k}={v}")
    return (" {" + ", ".join(parts) + "}") if parts else ""


def _fmt_value(v) -> str:
    """A layer-table value; a KV-cache type as layout(fields), its byte count left out."""
    if isinstance(v, dict) and "layout" in v:
        fields = ", ".join(f"{k}={x}" for k, x in v.items() if k not in ("layout", "bytes_per_token"))
        return f"{v['layout']}({fields})" if fields else v["layout"]
    return str(v)


def format_function(fn: Function, title: str) -> list[str]:
    ins = ", ".join(f"{v}: {fn.types[v]}" for v in fn.inputs)
    lines = [f"{title} {fn.name}({ins}):"]
    if fn.doc:
        lines.append(f"  # {fn.doc}")
    for op in fn.ops:
        outs = ", ".join(f"{o}: {fn.types[o]}" for o in op.outputs)
        args = ", ".join(v if v is not None else "_" for v in op.inputs)
        lines.append(f"  {outs} = {op.op}({args}){_fmt_attrs(op.attrs)}")
    lines.append(f"  return {', '.join(fn.outputs)}")
    return lines


def format_program(prog: Program) -> str:
    mb = prog.param_bytes() / 2**20
    lines = [f"program {prog.name}: {prog.param_count():,} params, {mb:,.1f} MiB"]
    for h in prog.history:
        lines.append(f"  pass {h['name']}: {h.get('summary', '')}")
    for blk in prog.blocks.values():
        lines.append("")
        lines.extend(format_function(blk.body, f"block[{len(blk.layers)}x {blk.param_prefix}]"))
        if blk.fast_path is not None:
            fp = blk.fast_path
            args = ", ".join(v if v is not None else "_" for v in fp.inputs)
            lines.append(f"  fast path (the body runs when it returns None): {fp.op}({args}){_fmt_attrs(fp.attrs)}")
        varying = sorted({k for layer in blk.layers for k in layer if k != "index"})
        for key in varying:
            vals = [_fmt_value(layer.get(key)) for layer in blk.layers]
            runs: list[list] = []
            for v in vals:
                if runs and runs[-1][1] == v:
                    runs[-1][0] += 1
                else:
                    runs.append([1, v])
            lines.append(f"  per-layer {key}: {' '.join(v if n == 1 else f'{n}x {v}' for n, v in runs)}")
    for fn in prog.functions.values():
        lines.append("")
        lines.extend(format_function(fn, "entry"))
    return "\n".join(lines)
