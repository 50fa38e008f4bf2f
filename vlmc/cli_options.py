"""Command-line options shared by several commands (``vlmc compile/run/eval/bench``)."""
from __future__ import annotations

import click

from .errors import VlmcError
from .options import KVOptions


def _parse_bytes(text: str | None) -> int | None:
    """'1500000', '512M', '2G', '1.5GiB' -> bytes (K/M/G/T are powers of 1024)."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if t and t[-1] in "KMGT":
        scale, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise VlmcError(f"--kv-memory-budget must be a byte count such as 2000000000, 512M or 2G, got {text!r}")
    if value < 1:
        raise VlmcError(f"--kv-memory-budget must be positive, got {text!r}")
    return int(value)


KV_FLAGS = [
    click.option("--kv-bits", type=float, default=None,
                 help="Quantize the KV cache: 2, 3, 4 or 8 bits (uniform), or 2-4 in steps of 0.5 "
                      "(turboquant; 3.5 = 3-bit keys, 4-bit values)."),
    click.option("--kv-quant-scheme", type=click.Choice(["uniform", "turboquant"]), default="uniform",
                 show_default=True, help="uniform: affine codes per group; turboquant: rotation + codebook."),
    click.option("--kv-group-size", type=int, default=None,
                 help="Values per scale for uniform KV codes: 16, 32, 64, 128 (default: 64 if it divides the head dim)."),
    click.option("--max-kv-size", type=click.IntRange(min=1), default=None,
                 help="Cap every layer's KV cache to a window of this many tokens (older ones are forgotten)."),
    click.option("--kv-memory-budget", default=None,
                 help="Bytes the KV cache may take at --kv-context tokens (e.g. 2G): picks the least compression that fits."),
    click.option("--kv-context", type=click.IntRange(min=1), default=None,
                 help="Context length the KV plan and budget are for (default: the model's maximum)."),
    click.option("--kv-quantize-last", is_flag=True,
                 help="Quantize the last full-attention layer like the others (by default it is spared: "
                      "dense next to 8-bit codes, 8-bit codes next to fewer bits)."),
]


KV_NAMES = ("kv_bits", "kv_quant_scheme", "kv_group_size", "max_kv_size", "kv_memory_budget", "kv_context",
            "kv_quantize_last")  # the flags above, as KVOptions fields


def kv_flags(fn):
    for option in reversed(KV_FLAGS):
        fn = option(fn)
    return fn


def pop_kv(kwargs: dict) -> dict:
    """The KV flags of a command as ``vlmc.load`` / ``vlmc.compile`` keyword options (the
    ``KVOptions`` fields that differ from the defaults; a bad value is an error here)."""
    given = {name: kwargs.pop(name) for name in KV_NAMES}
    given["kv_memory_budget"] = _parse_bytes(given["kv_memory_budget"])
    return KVOptions.from_kwargs("the KV flags", **given).changed()
