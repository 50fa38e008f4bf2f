"""Number-format helpers on numpy arrays that the kernels and the artifact writer share
(bfloat16 has no numpy dtype: its values travel as their uint16 bits)."""
from __future__ import annotations

import numpy as np


def bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 values -> their nearest bfloat16 values' bits (uint16, ties to even, as torch
    and MLX round)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    r = u >> np.uint32(16)   # (in place from here: one uint32 temporary, not four)
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u
    r >>= np.uint32(16)
    return r.astype(np.uint16)
