"""Host arrays on the cpu target (vlmc.kernels.cpu_ops, vlmc.kernels.cpu.host): between the
kernels, activations stay float32 numpy arrays and the ops between them run in numpy.

Each host op is checked against the reference op (MLX) on the same values, to 2e-6
relative (float32 throughout; only reduction order differs, and rope is exact). An
end-to-end test checks that a compiled artifact's decode step really runs its layers on
host arrays and that entry points still return mx.arrays.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops, reference
from vlmc.runtime.kv_cache import make_caches

pytestmark = pytest.mark.skipif(cpu._get_lib() is None, reason="no C compiler: CPU kernels unavailable")

TOL = 2e-6


def close(got, ref, tol=TOL):
    assert type(got) is np.ndarray, f"expected a host array, got {type(got)}"
    ref = np.asarray(ref.astype(mx.float32))
    assert got.shape == ref.shape and got.dtype == np.float32
    scale = max(float(np.abs(ref).max()), 1e-30)
    assert float(np.abs(got - ref).max()) <= tol * scale


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def arr(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape,eps", [((3, 7, 1), 1e-6), ((2, 5, 40), 1e-6), ((5, 3, 16), 0.5),
                                       ((300, 260), 1e-6), ((7, 1536), 1e-6)])  # 78k values: threads
def test_unweighted_rms_norm_is_mlx_to_the_bit(rng, shape, eps):
    """The unweighted RMSNorm (Gemma 4's value norm) of host rows computes MLX's arithmetic
    (vlmc_norm mode 2): the same float32 as mx.fast.rms_norm, which the op library uses for
    mx.arrays, so its numbers do not depend on where the rows live (the decode_layer fast
    path calls the same kernel)."""
    x = arr(rng, *shape, scale=3.0)
    x[0] *= 0.01  # a row where eps matters
    got = cpu_ops.rms_norm(x, None, eps=eps)
    assert type(got) is np.ndarray
    want = np.asarray(reference.rms_norm(mx.array(x), None, eps))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape,eps", [((2, 5, 96), 1e-6), ((300, 260), 0.5)])  # 78k values: threads
def test_norms_match_reference(rng, shape, eps):
    x = arr(rng, *shape, scale=3.0) + 1.5  # a mean for LayerNorm to remove
    x[0] *= 0.01  # a row where eps matters
    w = mx.array(arr(rng, shape[-1])).astype(mx.bfloat16)  # parameters may be stored in bfloat16
    b = mx.array(arr(rng, shape[-1]))
    close(cpu_ops.rms_norm(x, w, eps=eps), reference.rms_norm(mx.array(x), w, eps))
    close(cpu_ops.layer_norm(x, w, b, eps=eps), reference.layer_norm(mx.array(x), w, b, eps))
    close(cpu_ops.layer_norm(x, w, None, eps=eps), reference.layer_norm(mx.array(x), w, None, eps))
    close(cpu_ops.layer_norm(x.T.copy().T, w, b, eps=eps), reference.layer_norm(mx.array(x), w, b, eps))
    a = arr(rng, *x.shape)
    h, n = cpu_ops.add_rms_norm(x, mx.array(a), w, eps=1e-6)
    rh, rn = reference.add_rms_norm(mx.array(x), mx.array(a), w, 1e-6)
    close(h, rh)
    close(n, rn)


@pytest.mark.parametrize("kind", ["default", "mrope", "axial2d"])
def test_rope_is_exact(rng, kind):
    """Same products and sums as the reference: bit-identical float32."""
    if kind == "axial2d":
        pos, x = mx.array(rng.integers(0, 30, (12, 2)), mx.int32), arr(rng, 12, 3, 16)
        cos, sin = reference.rope_freqs(pos, kind, dim=16, theta=10000.0)
    else:
        shape = (3, 2, 7) if kind == "mrope" else (2, 7)
        pos, x = mx.array(rng.integers(0, 500, shape), mx.int32), arr(rng, 2, 3, 7, 32)
        cos, sin = reference.rope_freqs(pos, kind, dim=32, theta=1e6, sections=[4, 6, 6])
    got = cpu_ops.rope(x, cos, sin)
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, np.asarray(reference.rope(mx.array(x), cos, sin)))


@pytest.mark.parametrize("kind", ["silu", "quick_gelu", "gelu", "gelu_tanh", "relu"])
def test_activations_match_reference(rng, kind):
    x, up = arr(rng, 3, 40, scale=4.0), arr(rng, 3, 40)
    x[0, :3] = [-1e4, 1e4, 0.0]  # exp overflow stays finite and exact
    close(cpu_ops.act(x, kind), reference.act(mx.array(x), kind))
    close(cpu_ops.glu(x, up, kind), reference.glu(mx.array(x), mx.array(up), kind))
    close(cpu_ops.glu(mx.array(x), up, kind), reference.glu(mx.array(x), mx.array(up), kind))


def test_shape_ops_and_mixed_inputs(rng):
    x = arr(rng, 2, 3, 24)
    m = mx.array(x)
    close(cpu_ops.add(x, m), reference.add(m, m))
    close(cpu_ops.mul(m, x), reference.mul(m, m))
    close(cpu_ops.reshape(x, shape=[0, 0, 4, -1]), reference.reshape(m, [0, 0, 4, -1]))
    close(cpu_ops.transpose(x, axes=[2, 0, 1]), reference.transpose(m, [2, 0, 1]))
    for got, ref in zip(cpu_ops.split(x, sizes=[10, 6, 8], axis=-1), reference.split(m, [10, 6, 8], -1)):
        close(got, ref)
    close(cpu_ops.slice_axis(x, axis=1, start=-1), reference.slice_axis(m, 1, -1))
    close(cpu_ops.concat(x, x, axis=1), reference.concat(m, m, axis=1))
    close(cpu_ops.cast(x, dtype="float32"), m)
    as_bf16 = cpu_ops.cast(x, dtype="bfloat16")  # not a host dtype: back to MLX
    assert isinstance(as_bf16, mx.array) and as_bf16.dtype == mx.bfloat16
    mixed = cpu_ops.concat(x, m, axis=0)  # one mx.array among them: MLX's concat
    assert isinstance(mixed, mx.array) and mx.array_equal(mixed, reference.concat(m, m, axis=0))


def test_ops_without_a_host_version_take_host_inputs(rng):
    embeds = mx.array(arr(rng, 1, 6, 8))
    ids = mx.array([[1, 9, 9, 2, 9, 3]])
    feats = arr(rng, 3, 8)
    got = cpu_ops.merge_features(embeds, ids, feats, token_id=9)
    assert isinstance(got, mx.array)
    assert mx.array_equal(got, reference.merge_features(embeds, ids, mx.array(feats), 9))


def test_matmuls_and_attention_return_host_arrays(rng):
    w = mx.array(arr(rng, 48, 64))
    x = arr(rng, 1, 3, 64)
    close(cpu_ops.linear(x, w), cpu.linear(mx.array(x), w), 1e-5)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    close(cpu_ops.qlinear(mx.array(x), wq, s, b, bits=4, group_size=32),
          cpu.qlinear(mx.array(x), wq, s, b, bits=4, group_size=32), 1e-5)
    q, k, v = arr(rng, 1, 4, 20, 16), arr(rng, 1, 2, 20, 16), arr(rng, 1, 2, 20, 16)
    mask = mx.array(np.tril(np.ones((20, 20), bool)))[None, None]
    close(cpu_ops.attention(q, k, v, mask, scale=0.25),
          reference.attention(mx.array(q), mx.array(np.repeat(k, 2, 1)), mx.array(np.repeat(v, 2, 1)), mask,
                              scale=0.25), 1e-5)


@pytest.mark.parametrize("spec", ["dense", {"layout": "quantized", "bits": 4, "group_size": 32},
                                  {"layout": "turboquant", "k_bits": 3, "v_bits": 4}])
def test_cached_attention_on_host_arrays(rng, spec):
    """A prefill then decode steps with host q/k/v give what the mx.array path gives, for
    each cache layout (the decode kernels read q from the host array)."""
    host_cache, mx_cache = (make_caches([{"index": 0, "kv": spec}], 1, 2, 64)[0] for _ in range(2))
    for L in (20, 1, 1):
        q, k, v = arr(rng, 1, 4, L, 64), arr(rng, 1, 2, L, 64), arr(rng, 1, 2, L, 64)
        mask = mx.array(np.tril(np.ones((L, L), bool)))[None, None] if L > 1 else None
        got = cpu_ops.cached_attention(q, k, v, host_cache, mask, scale=0.125)
        ref = cpu_ops.cached_attention(mx.array(q), mx.array(k), mx.array(v), mx_cache, mask, scale=0.125)
        assert isinstance(ref, mx.array)
        close(got, ref, 1e-5)
    assert host_cache.held == mx_cache.held == 22


def test_decode_step_runs_on_host_arrays(tmp_path, monkeypatch):
    """In a compiled artifact's decode step every layer after the first works on host
    arrays: MLX's rms_norm runs once (the first norm reads the mx.array embeddings) where
    MLX alone would run it for every norm; the entry point returns an mx.array equal to the
    one the MLX ops give."""
    import vlmc
    from fixtures.checkpoints import build_checkpoint
    ck = tmp_path / "ck"
    build_checkpoint(ck, "qwen2_vl")
    art = vlmc.compile(ck, tmp_path / "f32")
    loaded = vlmc.load(art)
    model, meta = loaded.model, loaded.meta["text"]
    layers = len(model.text_layer_params)
    calls = []
    real = reference.rms_norm
    monkeypatch.setattr(reference, "rms_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def step():
        caches = make_caches([{"index": i, "kv": "dense"} for i in range(layers)], 1, meta["num_kv_heads"],
                             meta["head_dim"])
        out = None
        for t, tok in enumerate([3, 17, 5]):
            pos = mx.full((3, 1, 1), t, mx.int32)
            out = model.decode(ids=mx.array([[tok]]), positions=pos, mask=None, caches=caches)
        return out

    got = step()
    assert isinstance(got, mx.array) and got.dtype == mx.float32
    assert len(calls) == 3  # one per step: the first layer's input norm
    monkeypatch.setenv("VLMC_CPU_KERNELS", "0")
    cpu.refresh()
    try:
        calls.clear()
        ref = step()
        assert len(calls) == 3 * (2 * layers + 1)
    finally:
        monkeypatch.delenv("VLMC_CPU_KERNELS")
        cpu.refresh()
    assert float(mx.abs(got - ref).max()) <= 1e-4 * float(mx.abs(ref).max())


@pytest.mark.parametrize("kind", ["silu", "quick_gelu", "gelu_tanh"])
def test_sigmoid_gate_kernel_on_column_slices(rng, kind):
    """The C gate (vectorized exp, rows split across threads) on the column halves of a
    fused gate_up output, without copying them, against float64 numpy (GELU-tanh: its
    tanh form, which the kernel computes as x sigmoid(2u)); extreme inputs give what numpy
    gives (0 * inf never appears: x / (1 + inf) = -0)."""
    gate_up = arr(rng, 300, 2 * 520, scale=5.0)  # 156k elements per half: the threaded path
    gate_up[0, :5] = [-1e4, 1e4, 0.0, -95.0, 95.0]
    gate, up = cpu_ops.split(gate_up, sizes=[520, 520], axis=-1)
    assert not gate.flags.c_contiguous
    g64 = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        if kind == "gelu_tanh":
            ref = 0.5 * g64 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
        else:
            ref = g64 / (1.0 + np.exp(-{"silu": 1.0, "quick_gelu": 1.702}[kind] * g64))
    got = cpu_ops.glu(gate, up, kind)
    assert type(got) is np.ndarray and got.shape == gate.shape
    np.testing.assert_allclose(got, ref * up, rtol=5e-6, atol=1e-6 * np.abs(ref * up).max())
    alone = cpu_ops.act(gate, kind)
    np.testing.assert_allclose(alone, ref, rtol=5e-6, atol=1e-6 * np.abs(ref).max())
    assert alone[0, 1] == 1e4 and alone[0, 0] == 0.0 and alone[0, 2] == 0.0


def test_masked_softmax_kernel_matches_numpy(rng):
    """The C softmax (scale folded in, mask shared by blocks of rows, threads) against the
    numpy path; a row with nothing visible gives zeros."""
    from vlmc.kernels.cpu import attention
    s = arr(rng, 4 * 70, 301, scale=8.0)
    keep = rng.random((70, 301)) > 0.4
    keep[3] = False
    got, ref = s.copy(), s.copy()
    attention._masked_softmax(got, 0.3, keep)
    ref *= np.float32(0.3)
    ref.reshape(4, 70, 301)[...] += np.where(keep, np.float32(0), np.float32(-np.inf))
    attention._softmax_rows(ref)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert not got.reshape(4, 70, 301)[:, 3].any()
    assert not got.reshape(4, 70, 301)[:, ~keep].any()  # masked keys get exactly 0
    np.testing.assert_allclose(got.sum(-1)[np.tile(keep.any(-1), 4)], 1.0, rtol=1e-5)


def test_sigmoid_gate_reads_broadcasts_and_transposes(rng):
    """Inputs the kernel cannot read as strided rows (a broadcast up, a transposed gate)
    are copied first, not misread."""
    gate = arr(rng, 40, 24)
    up = np.broadcast_to(arr(rng, 24), (40, 24))
    ref = reference.glu(mx.array(gate), mx.array(np.ascontiguousarray(up)), "silu")
    close(cpu_ops.glu(gate, up, "silu"), ref, 5e-6)
    close(cpu_ops.glu(gate.T.copy().T, up, "silu"), ref, 5e-6)
    close(cpu_ops.act(np.ascontiguousarray(gate.T).T, "quick_gelu"), reference.act(mx.array(gate), "quick_gelu"), 5e-6)
