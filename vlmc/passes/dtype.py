"""Storage/compute dtype of the artifact's weights.

``float32`` is the parity build; ``bfloat16``/``float16`` halve the bytes. Integer
and index tensors are never cast. The choice is recorded in ``meta["dtype"]``.
"""
from __future__ import annotations

from ..ir.core import Program
from ..ir.infer import infer_types
from ..options import FLOAT_DTYPES
from .manager import register


@register("storage_dtype")
def storage_dtype(prog: Program, dtype: str = "float32") -> tuple[Program, str]:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    n = 0
    for p in prog.params.values():
        if p.dtype in FLOAT_DTYPES and p.dtype != dtype:
            p.dtype = dtype
            n += 1
    prog.meta["dtype"] = dtype
    infer_types(prog)
    return prog, f"{n} params stored as {dtype}"
