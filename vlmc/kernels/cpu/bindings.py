"""The ctypes signatures of every function the C kernels export (prototypes in ``vlmc.h``).

``declare`` gives a loaded library these return and argument types, so that a call with
the wrong number of arguments fails in Python instead of reading garbage in C, and float
arguments are passed as C floats. Pointers travel as integer addresses (``c_void_p``).
"""
from __future__ import annotations

import ctypes

# The version of the interface below. Change it with any signature or shared struct
# (vlmc_layer, ...): build.py compiles it into the library (-DVLMC_ABI) and load refuses a
# library that reports another.
ABI_VERSION = 28

P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float

# name: (return type, argument types), in the order of vlmc.h
SIGNATURES: dict[str, tuple] = {
    # probe.c
    "vlmc_abi_version": (I, []),
    "vlmc_simd": (I, []),
    "vlmc_stream_read": (F, [P, L, I]),
    # threadpool.c
    "vlmc_set_spin_us": (None, [I]),
    # gemv.c
    "vlmc_gemv_f32": (I, [P, I, I, P, I, P, P, I]),
    "vlmc_gemv_bf16": (I, [P, I, I, P, I, P, P, I]),
    "vlmc_gemv_q": (I, [P, I, I, P, P, P, I, I, I, I, P, P, I]),
    "vlmc_set_int8_x": (None, [I]),
    "vlmc_set_x8_residual": (None, [I]),
    "vlmc_int8_x_available": (I, []),
    "vlmc_packed_direct": (I, []),
    # dequant.c
    "vlmc_dequantize": (I, [P, P, P, I, I, I, I, I, P, I]),
    "vlmc_bf16_to_f32": (None, [P, L, P, I]),
    # kv_attention.c
    "vlmc_kv_dense_decode": (I, [P, P, P, P, P, P, I, I, I, I, I, I, F, I, F, P, I]),
    "vlmc_kv_affine_decode": (I, [P, P, P, P, P, P, P, P, I, I, I, I, I, I, I, I, F, I, F, P, I]),
    "vlmc_kv_turbo_decode": (I, [P, P, P, P, P, P, P, P, I, I, I, I, I, I, I, I, F, P, I]),
    "vlmc_kv_affine_encode": (I, [P, L, I, I, I, P, P, P]),
    "vlmc_kv_dense_decode_n": (I, [P, P, P, P, P, P, I, I, I, I, I, I, I, F, I, F, P, I]),
    "vlmc_kv_affine_decode_n": (I, [P, P, P, P, P, P, P, P, I, I, I, I, I, I, I, I, I, F, I, F, P, I]),
    "vlmc_kv_turbo_decode_n": (I, [P, P, P, P, P, P, P, P, I, I, I, I, I, I, I, I, I, F, P, I]),
    # kv_turbo.c
    "vlmc_kv_turbo_encode": (I, [P, L, I, I, P, P, P, P]),
    "vlmc_kv_rotate": (I, [P, L, I, P, P]),
    # gemm_i8.c
    "vlmc_gemm_q_i8_available": (I, []),
    "vlmc_gemm_q_i8": (I, [P, I, I, P, P, P, I, I, I, I, P, P, I]),
    # elementwise.c
    "vlmc_softmax_rows": (I, [P, L, L, F, P, L, I]),
    "vlmc_attention_rows_available": (I, []),
    "vlmc_attention_rows": (I, [P, L, L, P, L, L, P, L, L, P, L, L, L, L, L, L, L, L, F, P, L, I]),
    "vlmc_attention_lanes": (I, [P, L, L, P, L, L, P, L, L, P, L, L, L, L, L, L, L, L, F, I, I]),
    "vlmc_sigmoid_gate": (I, [P, L, P, L, P, L, L, F, F, I]),
    "vlmc_norm": (I, [P, L, L, P, P, F, I, P, I]),
    "vlmc_rope": (I, [P, L, L, L, L, L, L, L, P, P, L, L, P, I]),
    # decode_layer.c
    "vlmc_decode_layers": (I, [P, P, I, P, P, I, I, P, P, L, L, P, L, P, I]),
    # affine_search.c
    "vlmc_affine_search": (I, [P, I, I, I, I, P, P, P, I, I, P, P, I]),
    "vlmc_affine_codes": (I, [P, I, I, I, I, P, P, P, I]),
    # moe.c
    "vlmc_moe_experts": (I, [P, P, I, I, P, P, P, I]),
    # deltanet.c
    "vlmc_deltanet_layers": (I, [P, P, I, P, P, I, P, I]),
    # deltanet_prompt.c
    "vlmc_deltanet_prompt": (I, [P, P, I, I, P, P, P, P, P, I]),
    # moe.c: the whole block
    "vlmc_moe_block": (I, [P, P, I, P, P, P, I]),
    # moe.c: the block with its router's own input and per-expert scales
    "vlmc_moe_block_ex": (I, [P, P, P, P, I, P, P, P, I]),
    # amx.c
    "vlmc_amx": (I, []),
    "vlmc_set_amx": (I, [I]),
}


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with every exported function's return and argument types set."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib
