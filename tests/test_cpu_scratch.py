"""The host path's pooled memory (vlmc.kernels.cpu.scratch): a buffer is handed out again
only once no array uses it, large results of host ops come from it, and those results are
the same as without it."""
from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops
from vlmc.kernels.cpu import scratch

BIG = (scratch.MIN_BYTES // 4 // 256 + 1, 256)  # just over MIN_BYTES of float32


def test_a_buffer_is_reused_only_when_nothing_uses_it():
    p = scratch.Pool(1 << 30)
    a = p.empty(BIG)
    a[...] = 1.0
    view = a[::2]          # a view of a view still holds the buffer
    del a
    b = p.empty(BIG)
    assert p.allocated == 2 and p.reused == 0
    b[...] = 2.0
    assert float(view.min()) == 1.0 == float(view.max())
    del view
    gc.collect()
    c = p.empty(BIG)
    assert p.reused == 1 and p.allocated == 2
    c[...] = 3.0
    assert float(b.min()) == 2.0  # b still has its own buffer


def test_small_arrays_limits_and_fill():
    p = scratch.Pool(1 << 30)
    assert p.empty((16, 16)).base is None and p.allocated == 0   # small: plain numpy
    off = scratch.Pool(0)
    assert off.empty(BIG).base is None and off.allocated == 0
    unit = BIG[0] * BIG[1] * 4
    tight = scratch.Pool(unit * 5 // 2)
    keep = [tight.empty(BIG), tight.empty(BIG)]
    assert tight.allocated == 2
    third = tight.empty(BIG)          # over the limit while both are in use: not pooled
    assert third.base is None and tight.allocated == 2
    keep.pop()
    gc.collect()
    wider = (BIG[0] * 3 // 2, BIG[1])  # the free buffer is too small: it is evicted for this one
    again = tight.empty(wider)
    assert again.base is not None and tight.allocated == 3 and tight.held_bytes <= tight.limit
    del again
    gc.collect()
    small = tight.empty((BIG[0] // 2 + 1, BIG[1]))  # well under MIN_FILL of the free buffer: not it
    assert small.base is None or small.base.nbytes * scratch.MIN_FILL <= small.nbytes


def test_mx_array_of_a_pooled_result_is_a_copy():
    p = scratch.Pool(1 << 30)
    a = p.empty(BIG)
    a[...] = 5.0
    m = mx.array(a)
    del a
    b = p.empty(BIG)
    b[...] = -1.0
    assert p.reused == 1
    assert float(m.min()) == 5.0 == float(m.max())


def test_bad_limit_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("VLMC_HOST_POOL_MB", "lots")
    with pytest.raises(ValueError, match="VLMC_HOST_POOL_MB"):
        scratch._default_limit()
    monkeypatch.setenv("VLMC_HOST_POOL_MB", "64")
    assert scratch._default_limit() == 64 << 20


@pytest.mark.skipif(cpu._get_lib() is None, reason="no C compiler: CPU kernels unavailable")
def test_host_ops_write_pooled_results_that_match_plain_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1024, 320), dtype=np.float32)   # 5 MB: pooled
    y = rng.standard_normal((4, 1024, 320), dtype=np.float32)
    w = mx.array(rng.standard_normal(320, dtype=np.float32))
    pool = scratch.pool
    if pool.limit < (64 << 20):
        pytest.skip("the host pool is off or small (VLMC_HOST_POOL_MB)")
    before = pool.reused
    outs = []
    for _ in range(3):  # the later rounds run on reused buffers
        s = cpu_ops.add(x, y)
        g = cpu_ops.act(s, "gelu_tanh")
        n = cpu_ops.layer_norm(g, w, w, eps=1e-6)
        t = cpu_ops.reshape(cpu_ops.transpose(n, axes=[0, 2, 1]), shape=[0, 0, 64, 16])
        outs.append([s.copy(), g.copy(), n.copy(), t.copy()])
        assert all(a.base is not None for a in (s, g, n, t))
        del s, g, n, t
    assert pool.reused > before
    np.testing.assert_array_equal(outs[0][0], x + y)
    ref_t = np.ascontiguousarray(outs[0][2].transpose(0, 2, 1)).reshape(4, 320, 64, 16)
    np.testing.assert_array_equal(outs[0][3], ref_t)
    for later in outs[1:]:
        for a, b in zip(outs[0], later):
            np.testing.assert_array_equal(a, b)
