"""Which rows the running entry point computes: a prompt's (a prefill, a prefill chunk, the
rest of a prompt after a prefix-cache hit) or new tokens' (decode, verify).

On the cpu target a prompt's rows take the prompt kernels at any row count (the matmuls'
GEMM arithmetic, the one-pass attention kernel), so a prompt gives the same bits however it
is chunked, batched or cut by a prefix-cache hit; new tokens take the decode kernels (one C
call per layer stack, attention reading the cache in place), for which T tokens give what T
one-token steps give. Without the mark a short prompt chunk over a filled cache would take
the decode kernels, whose summation order differs. ``Sequences.prefill`` marks its calls."""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_PROMPT = contextvars.ContextVar("vlmc_prompt_rows", default=False)


@contextmanager
def prompt_rows() -> Iterator[None]:
    """Within this block the entry points compute prompt rows."""
    token = _PROMPT.set(True)
    try:
        yield
    finally:
        _PROMPT.reset(token)


def in_prompt() -> bool:
    """Whether the running call computes prompt rows (see the module docstring)."""
    return _PROMPT.get()
