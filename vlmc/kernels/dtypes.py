"""Number-format helpers on numpy arrays that the kernels and the artifact writer share
(bfloat16 has no numpy dtype: its values travel as their uint16 bits)."""
from __future__ import annotations

import numpy as np


def bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 values -> their nearest bfloat16 values' bits (uint16, ties to even, as torch
    and MLX round)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
