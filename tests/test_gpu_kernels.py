"""vlmc's GPU kernels (vlmc.kernels.gpu) against their pure-MLX references.

On a machine without MLX's CUDA or Metal backend only the fallbacks and the source
files are checked; with one (run on a GPU machine: ``pytest tests/test_gpu_kernels.py``)
every kernel is compared with the reference. Tolerances: float32 1e-5 relative (1e-3 where
a TurboQuant rotation, a float32 matmul, runs at TF32 precision on an NVIDIA GPU);
bfloat16/float16 outputs within 2 units in the last place of the output type (the
kernel and MLX round the same float32 value, possibly after different summation orders).
"""
from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import gpu, gpu_ops, kv_quant, reference
from vlmc.runtime.kv_cache import attention_mask, make_caches

GPU = gpu.backend()
needs_gpu = pytest.mark.skipif(GPU is None, reason="no MLX GPU backend (CUDA or Metal) on this machine")
KERNELS = {
    "add_rms_norm": (("a", "b", "w", "eps"), ("h", "y"), ("T", "N", "BLOCK", "PER")),
    "kv_affine_decode": (("q", "k_codes", "k_scales", "k_biases", "v_codes", "v_scales", "v_biases", "starts",
                          "held", "scale"), ("partial", "stats"), ("H", "HKV", "D", "BITS", "GROUP", "CHUNK", "BLOCK")),
    "kv_turbo_decode": (("q_rot", "k_codes", "k_norms", "v_codes", "v_norms", "k_codebook", "v_codebook",
                         "starts", "held", "scale"), ("partial", "stats"),
                        ("H", "HKV", "D", "KBITS", "VBITS", "CHUNK", "BLOCK")),
}
KV_LAYOUTS = [{"layout": "quantized", "bits": b, "group_size": g} for b, g in ((8, 64), (4, 32), (3, 16), (2, 64))] + \
    [{"layout": "turboquant", "k_bits": k, "v_bits": v} for k, v in ((3, 4), (2, 2), (4, 4))]


def _close(out, ref, dtype):
    out = np.asarray(out.astype(mx.float32))
    ref = np.asarray(ref.astype(mx.float32))
    if dtype == mx.float32:
        assert np.abs(out - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)
    else:
        ulp = {mx.bfloat16: 2.0 ** -7, mx.float16: 2.0 ** -10}[dtype]
        assert (np.abs(out - ref) <= 2 * ulp * np.maximum(np.abs(ref), 1e-3)).all()


@pytest.mark.parametrize("name", KERNELS)
def test_both_sources_exist_and_use_the_same_names(name):
    inputs, outputs, template = KERNELS[name]
    for be in ("cuda", "metal"):
        src = gpu.source(name, be)
        for ident in (*inputs, *outputs, *template):
            assert re.search(rf"\b{ident}\b", src), f"{name}.{be} does not use {ident}"
    ref = getattr(reference, name, None) or getattr(kv_quant, name)
    assert callable(ref) and callable(getattr(gpu, name))
    assert gpu_ops.add_rms_norm is gpu.add_rms_norm and gpu_ops.cached_attention is gpu.cached_attention


def test_reference_add_rms_norm_is_add_then_norm():
    a, b = mx.random.normal((3, 5, 64)), mx.random.normal((3, 5, 64))
    w = mx.random.normal((64,))
    h, y = reference.add_rms_norm(a, b, w, 1e-6)
    assert mx.array_equal(h, a + b)
    assert mx.allclose(y, mx.fast.rms_norm(a + b, w, 1e-6), atol=1e-6)


def test_without_a_gpu_the_reference_runs(monkeypatch):
    monkeypatch.setattr(gpu, "backend", lambda: None)
    a, b, w = mx.ones((2, 8)), mx.ones((2, 8)), mx.ones((8,))
    h, y = gpu.add_rms_norm(a, b, w, 1e-6)
    assert mx.array_equal(h, a + b) and mx.allclose(y, mx.ones((2, 8)), atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1536), (4, 37, 1536), (2, 3, 64), (1, 7, 3584), (5, 8960)])
def test_add_rms_norm_kernel_matches_reference(dtype, shape):
    mx.random.seed(sum(shape))
    a, b = (mx.random.normal(shape).astype(dtype) for _ in range(2))
    w = (1 + 0.1 * mx.random.normal((shape[-1],))).astype(dtype)
    h, y = gpu.add_rms_norm(a, b, w, 1e-6)
    rh, ry = reference.add_rms_norm(a, b, w, 1e-6)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == a.shape
    assert mx.array_equal(h, rh)  # the same rounded sum
    _close(y, ry, dtype)


def _filled_caches(spec, B=2, HKV=2, D=64, n=75, starts=(0, 9), seed=0):
    """Two identical caches of ``spec`` holding n tokens (capacity above n), sequence 1
    left-padded by starts[1]; and the decode step's q, k, v and mask."""
    mx.random.seed(seed)
    caches = [make_caches([{"index": 0, "kv": spec}], B, HKV, D)[0] for _ in range(2)]
    k = mx.random.normal((B, HKV, n, D)) * (1 + 3 * (mx.arange(D) % 13 == 0))
    v = mx.random.normal((B, HKV, n, D))
    for c in caches:
        c.update(k, v)
    q = mx.random.normal((B, 2 * HKV, 1, D))
    k1, v1 = mx.random.normal((B, HKV, 1, D)), mx.random.normal((B, HKV, 1, D))
    mask = attention_mask(mx.array(list(starts)), n, 1, True)
    return caches, q, k1, v1, mask


@pytest.mark.parametrize("spec", KV_LAYOUTS, ids=str)
def test_kv_decode_path_matches_the_reference_attention(spec):
    """gpu.cached_attention (the codes read in place: the kernel on a GPU, its kv_quant
    reference here) against reference.cached_attention (decode the cache, then SDPA)."""
    (a, b), q, k, v, mask = _filled_caches(spec)
    out = gpu.cached_attention(q, k, v, a, mask, scale=0.125)
    ref = reference.cached_attention(q, k, v, b, mask, scale=0.125)
    assert out.shape == ref.shape == q.shape
    # on an NVIDIA GPU MLX runs float32 matmuls (TurboQuant's rotations) at TF32 precision
    tol = 1e-3 if GPU == "cuda" and spec["layout"] == "turboquant" else 2e-5
    assert float(mx.abs(out - ref).max()) <= tol * max(float(mx.abs(ref).max()), 1.0)
    assert a.offset == b.offset == 76


def test_kv_decode_leaves_prefill_and_dense_caches_to_the_reference(monkeypatch):
    called = []
    monkeypatch.setattr(gpu, "kv_affine_decode", lambda *a, **k: called.append(1))
    (a, _), q, k, v, mask = _filled_caches("dense")
    gpu.cached_attention(q, k, v, a, mask, scale=0.125)
    (a, _), q, k, v, _ = _filled_caches({"layout": "quantized", "bits": 4, "group_size": 32})
    gpu.cached_attention(mx.concatenate([q, q], 2), mx.concatenate([k, k], 2), mx.concatenate([v, v], 2), a,
                         attention_mask(mx.array([0, 9]), 75, 2, True), scale=0.125)
    assert called == []


def _kernel_args(cache, q, starts):
    """The decode kernels' arguments over a filled cache, and the kernel name."""
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    if cache.layout == "affine":
        codec = cache.codecs["k"]
        return "kv_affine_decode", (q[:, :, 0], kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"],
                                    vb["biases"], starts, cache.held), \
            dict(scale=0.125, bits=codec.bits, group_size=codec.group_size)
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    return "kv_turbo_decode", (q[:, :, 0] @ kc.rotation, kb["codes"], kb["norms"], vb["codes"], vb["norms"],
                               kc.codebook, vc.codebook, starts, cache.held), \
        dict(scale=0.125, k_bits=kc.bits, v_bits=vc.bits)


@needs_gpu
@pytest.mark.parametrize("n, starts", [(300, (0, 9)), (300, (0, 130)), (4100, (7, 2050))], ids=str)
@pytest.mark.parametrize("spec", KV_LAYOUTS, ids=str)
def test_kv_decode_kernel_matches_its_reference(spec, n, starts):
    """Chunked kernels against the whole-cache reference: one chunk or many, and sequences
    whose left padding empties whole chunks."""
    (cache, _), q, k, v, _ = _filled_caches(spec, n=n)
    cache.append(k, v)
    name, args, kw = _kernel_args(cache, q, mx.array(starts, mx.int32))
    out, ref = getattr(gpu, name)(*args, **kw), getattr(kv_quant, name)(*args, **kw)
    assert cache.capacity > cache.held  # the kernel reads only the held tokens of a larger buffer
    assert float(mx.abs(out - ref).max()) <= 1e-4 * max(float(mx.abs(ref).max()), 1.0)


def _chunk_partials(q, keys, values, starts, held, scale, chunk):
    """What the kernels write per chunk of ``chunk`` cached tokens, computed plainly:
    partial [B, H, C, D] = sum of exp(s - m) * v over the chunk's visible keys, stats
    [B, H, C, 2] = (m, sum of exp(s - m)), (-1e30, 0) for a chunk with no visible key."""
    B, H, D = q.shape
    rep = H // keys.shape[1]
    keys, values = mx.repeat(keys[:, :, :held], rep, axis=1), mx.repeat(values[:, :, :held], rep, axis=1)
    s = (q[:, :, None] * scale * keys).sum(-1)                               # [B, H, held]
    visible = mx.arange(held)[None, None] >= mx.array(starts).reshape(-1, 1, 1)
    parts, stats = [], []
    for lo in range(0, held, chunk):
        sc = mx.where(visible[..., lo:lo + chunk], s[..., lo:lo + chunk], -mx.inf)
        m = sc.max(-1)
        e = mx.where(visible[..., lo:lo + chunk], mx.exp(sc - m[..., None]), 0.0)
        parts.append((e[..., None] * values[:, :, lo:lo + chunk]).sum(-2))
        stats.append(mx.stack([mx.where(mx.isinf(m), -1e30, m), e.sum(-1)], -1))
    return mx.stack(parts, 2), mx.stack(stats, 2)


@pytest.mark.parametrize("starts", [(0, 9), (0, 70), (3, 75)], ids=str)
def test_merging_chunk_partials_is_exact_softmax_attention(starts):
    """The kernels' contract, checked without a GPU: merging per-chunk partial outputs
    and statistics (kv_quant.merge_chunks) equals attention over the whole cache, also
    when left padding empties chunks and when a sequence sees no key (zeros)."""
    mx.random.seed(3)
    B, H, HKV, D, held = 2, 6, 2, 32, 75
    q = mx.random.normal((B, H, D))
    keys, values = mx.random.normal((B, HKV, 96, D)) * 3, mx.random.normal((B, HKV, 96, D))
    merged = kv_quant.merge_chunks(*_chunk_partials(q, keys, values, starts, held, 0.3, 16))
    ref = kv_quant._attend(q, keys, values, mx.array(starts), held, 0.3)
    for b, start in enumerate(starts):
        if start < held:
            assert float(mx.abs(merged[b] - ref[b]).max()) <= 1e-5
        else:
            assert float(mx.abs(merged[b]).max()) == 0.0


@pytest.mark.parametrize("spec", [KV_LAYOUTS[1], KV_LAYOUTS[4]], ids=str)
def test_kv_kernel_launch_wiring(spec, monkeypatch):
    """Without a GPU: the loader hands MLX the shared helpers as header, the body, the inputs
    in the kernel's declared order and the template names the source uses."""
    seen = {}

    def fake_make(name, input_names, output_names, source, header):
        seen.update(name=name, inputs=input_names, outputs=output_names, source=source, header=header)

        def run(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            seen.update(template=dict(template), grid=grid, threadgroup=threadgroup, shapes=output_shapes)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run

    gpu._kernel.cache_clear()
    monkeypatch.setattr(gpu, "backend", lambda: "cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_make)
    try:
        (cache, _), q, k, v, mask = _filled_caches(spec)
        out = gpu.cached_attention(q, k, v, cache, mask, scale=0.125)
    finally:
        gpu._kernel.cache_clear()
    name = "kv_affine_decode" if spec["layout"] == "quantized" else "kv_turbo_decode"
    inputs, outputs, template = KERNELS[name]
    assert seen["name"] == name and tuple(seen["inputs"]) == inputs and tuple(seen["outputs"]) == outputs
    assert "kv_code" in seen["header"]
    assert set(seen["template"]) == set(template) and seen["threadgroup"] == (gpu.KV_BLOCK, 1, 1)
    assert "kv_chunk_softmax" in seen["header"] and seen["template"]["CHUNK"] == gpu.KV_CHUNK
    chunks = -(-cache.held // gpu.KV_CHUNK)  # 76 held tokens: 2 chunks
    assert seen["grid"] == (2 * 2 * chunks * gpu.KV_BLOCK, 1, 1) and chunks == 2
    assert seen["shapes"] == [(2, 4, chunks, 64), (2, 4, chunks, 2)] and out.shape == q.shape



@pytest.mark.parametrize("mode", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 128), (1, 1, 1536)])
def test_qqlinear_rounds_activations_to_the_weight_format(mode, dtype, shape):
    """gpu_ops.qqlinear (qqmm on a GPU with block-scaled tensor cores, else the reference's
    emulation): x is rounded block by block as numpy's oracle rounds it
    (fixtures.block_formats), then multiplied by the weight as reference.qlinear does."""
    from fixtures.block_formats import is_rounded
    from vlmc.backends.quantize import quantize_array
    mx.random.seed(sum(shape))
    # rows of very different magnitudes, so that blocks get different scales
    x = (mx.random.normal(shape) * mx.exp(2 * mx.random.normal((*shape[:-1], 1)))).astype(dtype)
    w = quantize_array(mx.random.normal((96, shape[-1])) / 8, bits={"mxfp8": 8, "nvfp4": 4}[mode],
                       group_size={"mxfp8": 32, "nvfp4": 16}[mode], mode=mode)
    b = mx.random.normal((96,)).astype(dtype)
    rounded = reference.quantize_activations(x, w)
    assert rounded.dtype == dtype
    assert is_rounded(np.asarray(rounded.astype(mx.float32), np.float64),
                      np.asarray(x.astype(mx.float32), np.float64), mode)
    expect = reference.qlinear(rounded, w, b)
    out = gpu_ops.qqlinear(x, w, b)
    assert out.shape == expect.shape and out.dtype == dtype
    if gpu_ops.block_scaled_matmul(mode):  # tensor-core sums: another order, float32 accumulation
        _close(out, expect, dtype) if dtype != mx.float32 else \
            np.testing.assert_allclose(np.asarray(out), np.asarray(expect), atol=1e-4 * float(mx.abs(expect).max()))
    else:
        assert mx.array_equal(out, expect)
    # and the activations really were rounded: the unrounded product is measurably elsewhere
    plain = reference.qlinear(x, w, b).astype(mx.float32)
    assert float(mx.abs(plain - expect.astype(mx.float32)).max()) > 1e-3 * float(mx.abs(expect).max())


def test_block_format_oracle_tells_the_tie_rules_apart():
    """The oracle's tie rules differ where they must (and so can catch a wrong rounding)."""
    from fixtures.block_formats import round_to_format
    x = np.zeros((1, 16))
    x[0, :8] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    assert round_to_format(x, "nvfp4")[0, :8].tolist() == [6, 0, 1, 1, 2, 2, 4, 4]
    assert round_to_format(x, "nvfp4", value_ties="zero")[0, :8].tolist() == [6, 0, 0.5, 1, 1.5, 2, 3, 4]
    assert round_to_format(x, "nvfp4", value_ties="away")[0, :8].tolist() == [6, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_block_scaled_matmul_needs_a_cuda_gpu(monkeypatch):
    gpu_ops.block_scaled_matmul.cache_clear()
    monkeypatch.setattr(gpu_ops, "backend", lambda: None)
    try:
        assert gpu_ops.block_scaled_matmul("mxfp8") is False
    finally:
        gpu_ops.block_scaled_matmul.cache_clear()
