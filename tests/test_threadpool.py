"""The kernels' thread pool (kernels/cpu/threadpool.c): a job's parts are claimed, so the
calling thread runs the parts of workers that have not started yet. With more threads than
cores and workers that sleep between jobs (no spinning), most parts are taken by whoever
comes first; every part must still run exactly once and be finished when the call
returns, whichever thread ran it."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from vlmc.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the compiled CPU kernels")


def _gate(lib, x: np.ndarray, up: np.ndarray, nth: int) -> np.ndarray:
    """silu(x) * up over rows split statically by part (part i: rows i/nth .. (i+1)/nth)."""
    out = np.full_like(x, np.nan)
    rows, cols = x.shape
    assert lib.vlmc_sigmoid_gate(x.ctypes.data, cols, up.ctypes.data, cols, out.ctypes.data, rows, cols, 1.0, 0.0,
                                 nth) == 0
    return out


@pytest.fixture
def no_spin():
    lib = cpu._get_lib()
    lib.vlmc_set_spin_us(0)  # workers sleep after each job: they wake late, the caller claims
    yield lib
    lib.vlmc_set_spin_us(200)


def test_every_part_runs_once_whoever_takes_it(no_spin):
    """400 jobs of 8 statically split parts on this machine's cores, from two Python
    threads at once: each finishes, and its result is the one-thread result, bit for bit
    (a part nobody ran leaves NaN rows; a part still running after the return, rows that
    change after it)."""
    lib = no_spin
    rng = np.random.default_rng(0)
    x, up = (rng.standard_normal((64, 1024)).astype(np.float32) for _ in range(2))
    want = _gate(lib, x, up, 1)
    bad: list[int] = []

    def run(n: int) -> None:
        for i in range(n):
            got = _gate(lib, x, up, 8)
            again = got.copy()
            if not (np.array_equal(got, want) and np.array_equal(again, got)):
                bad.append(i)
    threads = [threading.Thread(target=run, args=(200,), daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a job never finished (a part left unclaimed)"
    assert not bad, f"{len(bad)} of 400 jobs differ from the one-thread result"
