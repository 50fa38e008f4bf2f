"""Prompts (and prompt chunks) over 4/8-bit affine and TurboQuant KV caches on the cpu
target's C kernels (``kv_decode.host_coded_prompt``): the chunk's keys and values coded in
C and stored, each query row attending over the codes through the decode kernels' several-
token form. Checked against the MLX references over the same codes, and for invariance: a
row's result is the same bits whether the prompt came whole, in chunks, after a prefix-cache
hit, or in a left-padded batch."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops, kv_quant
from vlmc.kernels.cpu import kv_decode
from vlmc.kernels.step_rows import prompt_rows
from vlmc.runtime.kv_cache import attention_mask, make_caches

pytestmark = pytest.mark.skipif(cpu._get_lib() is None, reason="no C compiler")

SPECS = {"affine4": {"layout": "quantized", "bits": 4, "group_size": 64},
         "affine8": {"layout": "quantized", "bits": 8, "group_size": 32},
         "affine4g16": {"layout": "quantized", "bits": 4, "group_size": 16},
         "turbo3.5": {"layout": "turboquant", "k_bits": 3, "v_bits": 4},
         "turbo2": {"layout": "turboquant", "k_bits": 2, "v_bits": 2}}


def _cache(spec, batch, kv_heads, dim):
    return make_caches([{"index": 0, "kv": spec}], batch, kv_heads, dim)[0]


def _qkv(rng, batch, heads, kv_heads, n, dim):
    q = rng.standard_normal((batch, heads, n, dim)).astype(np.float32)
    k = (rng.standard_normal((batch, kv_heads, n, dim)) * (1 + 3 * (np.arange(dim) % 11 == 0))).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, n, dim)).astype(np.float32)
    return q, k, v


def _prompt(cache, q, k, v, starts, *, host=True):
    """One prompt chunk through the op library's cached_attention, as a prefill calls it."""
    mask = attention_mask(mx.array(starts, dtype=mx.int32), cache.offset, q.shape[2], True)
    with prompt_rows():
        args = (q, k, v) if host else tuple(mx.array(a) for a in (q, k, v))
        out = cpu_ops.cached_attention(*args, cache, mask, scale=q.shape[-1] ** -0.5)
    return np.asarray(out)


def _reference(cache, q, starts):
    """The MLX references over the cache's codes (the kernels' own semantics: int8 query
    codes for affine keys, the rotated space for TurboQuant), q the last T held tokens."""
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    st = mx.array(starts, dtype=mx.int32)
    qm = mx.array(q)
    if cache.layout == "turboquant":
        out = kv_quant.kv_turbo_decode(qm @ kc.rotation, kb["codes"], kb["norms"], vb["codes"], vb["norms"],
                                       kc.codebook, vc.codebook, st, cache.held, scale=q.shape[-1] ** -0.5,
                                       k_bits=kc.bits, v_bits=vc.bits) @ vc.rotation.T
    else:
        out = kv_quant.kv_affine_decode(qm, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"],
                                        vb["biases"], st, cache.held, scale=q.shape[-1] ** -0.5, bits=kc.bits,
                                        group_size=kc.group_size, int8_query=True)
    return np.asarray(out)


def _stored(cache) -> dict[str, np.ndarray]:
    return {f"{w}.{name}": np.asarray(buf.view(mx.uint16) if buf.dtype == mx.bfloat16 else buf)
            for w in ("k", "v") for name, buf in cache.parts(w).items()}


def _coded_prompt_calls(monkeypatch) -> list[bool]:
    """Whether each call of the C coded-prompt path took the call (it returns None where it
    declines), recorded in the list returned, from now on."""
    calls: list[bool] = []
    real = kv_decode.host_coded_prompt

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(cpu_ops, "_host_coded_prompt", spy)
    return calls


@pytest.mark.parametrize("layout", list(SPECS))
@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 128), (14, 2, 64), (3, 3, 64)])
@pytest.mark.parametrize("score_floats", [None, 3000])
def test_prompt_chunk_over_codes_equals_the_reference(layout, heads, kv_heads, dim, score_floats, monkeypatch):
    """A prompt of 37 tokens then a chunk of 150 (awkward lengths across the kernels' 16-,
    128- and 1024-row blocks) over a left-padded batch of two: each valid row within
    float32 rounding of the MLX reference over the same codes, and the codes stored are
    the codec's (affine: its bytes; TurboQuant: up to a coordinate on a codebook boundary).
    ``score_floats``: the kernel calls take a few query tokens each (else one call)."""
    if score_floats:
        monkeypatch.setattr(kv_decode, "PROMPT_SCORE_FLOATS", score_floats)
    spec = SPECS[layout]
    if spec.get("group_size", 8) > dim:
        pytest.skip("group wider than the head")
    rng = np.random.default_rng(heads * dim)
    cache, ref_cache = _cache(spec, 2, kv_heads, dim), _cache(spec, 2, kv_heads, dim)
    starts = np.array([0, 9])
    for n in (37, 150):
        q, k, v = _qkv(rng, 2, heads, kv_heads, n, dim)
        before = cache.held
        out = _prompt(cache, q, k, v, starts)
        ref_cache.append(mx.array(k), mx.array(v))
        got, want = _stored(cache), _stored(ref_cache)
        for key in got:
            if layout.startswith("turbo") and key.endswith("codes"):
                assert np.mean(got[key] == want[key]) > 0.999, key
            elif layout.startswith("turbo"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
            else:
                assert np.array_equal(got[key], want[key]), key
        ref = _reference(cache, q, starts)
        for b, s in enumerate(starts):
            rows = slice(max(0, s - before), n)  # left padding's query rows see nothing
            np.testing.assert_allclose(out[b, :, rows], ref[b, :, rows], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout,score_floats", [("affine4", 5000), ("affine8", 5000), ("turbo3.5", 5000),
                                                 ("affine4", None), ("affine8", None)])
def test_prompt_rows_do_not_depend_on_chunks_prefix_hits_or_the_batch(layout, score_floats, monkeypatch):
    """A 203-token prompt whole, in chunks (1, 5, 16, 64, 117 tokens), after a prefix-cache
    hit (whole blocks imported from another cache, the rest prefilled), and left-padded in a
    batch beside another prompt: every row's output and every stored byte are equal, bit for
    bit, and a decode step after each is equal too. ``score_floats`` 5000: the kernel calls
    take a few query tokens each, so the calls' boundaries move with the chunks; None: a
    call takes a whole chunk, so the affine kernel splits its 3 x 203 query rows into groups
    (KVQ_QROWS, 96) that the one-token rows (chunks of 1) must match from any group."""
    if score_floats:
        monkeypatch.setattr(kv_decode, "PROMPT_SCORE_FLOATS", score_floats)
    spec = SPECS[layout]
    H, HKV, D, n = 6, 2, 128, 203
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, H, HKV, n, D)
    step = _qkv(rng, 1, H, HKV, 1, D)

    def run(sizes, cache=None, first=0):
        cache = cache or _cache(spec, 1, HKV, D)
        outs, lo = [], first
        for size in sizes:
            hi = min(n, lo + size)
            outs.append(_prompt(cache, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], np.array([0])))
            lo = hi
        assert lo == n
        after = _decode(cache, *step, np.array([0]))
        return np.concatenate(outs, axis=2), _stored(cache), after

    whole = run([n])
    for sizes in ([1] * 20 + [n], [5, 16, 64, 117, 1], [64] * 4):
        got = run(sizes)
        assert np.array_equal(got[0], whole[0]), sizes
        assert all(np.array_equal(got[1][key], whole[1][key]) for key in got[1]), sizes
        assert np.array_equal(got[2], whole[2]), sizes
    # a prefix-cache hit: the first 192 tokens' blocks (as stored) from the whole run's cache
    donor = _cache(spec, 1, HKV, D)
    _prompt(donor, q, k, v, np.array([0]))
    hit = _cache(spec, 1, HKV, D)
    hit.import_blocks(donor.export_blocks(64)[:3])
    rest, stored, after = run([n - 192], hit, first=192)
    assert np.array_equal(rest, whole[0][:, :, 192:])
    assert all(np.array_equal(stored[key], whole[1][key]) for key in stored)
    assert np.array_equal(after, whole[2])
    # left-padded beside a longer prompt
    pad = 40
    q2, k2, v2 = _qkv(rng, 1, H, HKV, n + pad, D)
    padded = [np.concatenate([np.zeros((1, a.shape[1], pad, D), np.float32), a], axis=2) for a in (q, k, v)]
    batch = _cache(spec, 2, HKV, D)
    out = _prompt(batch, *(np.concatenate([a, b]) for a, b in zip(padded, (q2, k2, v2))), np.array([pad, 0]))
    assert np.array_equal(out[:1, :, pad:], whole[0])
    after = _decode(batch, *(np.concatenate([a, a]) for a in step), np.array([pad, 0]))
    assert np.array_equal(after[:1], whole[2])


def _decode(cache, q, k, v, starts):
    """One decode step of host rows through cached_attention (the kernels' one-token form)."""
    mask = attention_mask(mx.array(starts, dtype=mx.int32), cache.offset, 1, len(starts) > 1)
    return np.asarray(cpu_ops.cached_attention(q, k, v, cache, mask, scale=q.shape[-1] ** -0.5))


def test_prompt_over_codes_takes_the_c_path_for_mlx_inputs_too(monkeypatch):
    """mx.array inputs (a family's first layers) take the same path and give the same bits;
    a prompt with a bidirectional span (not causal) and a sliding-window cache do not."""
    spec = SPECS["turbo3.5"]
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 6, 2, 40, 64)
    host = _prompt(_cache(spec, 1, 2, 64), q, k, v, np.array([0]))
    mlx = _prompt(_cache(spec, 1, 2, 64), q, k, v, np.array([0]), host=False)
    assert np.array_equal(host, mlx)
    calls = _coded_prompt_calls(monkeypatch)
    cache = _cache(spec, 1, 2, 64)
    mask = attention_mask(mx.array([0], dtype=mx.int32), 0, 40, True)
    mask = mask | (mx.arange(40)[None, None, :, None] < 8) & (mx.arange(40)[None, None, None, :] < 8)  # an image span
    with prompt_rows():
        cpu_ops.cached_attention(q, k, v, cache, mask, scale=0.125)
    window = make_caches([{"index": 0, "kv": {**SPECS["affine4"], "window": 16}}], 1, 2, 64)[0]
    _prompt(window, q, k, v, np.array([0]))
    assert calls == [False, False]


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    from vlmc.demo import MODEL_DIR
    import vlmc
    root = tmp_path_factory.mktemp("coded")
    return {name: vlmc.load(vlmc.compile(MODEL_DIR, root / name, quantize="q4", **kv))
            for name, kv in (("dense", {}), ("kv4", {"kv_bits": 4}),
                             ("turbo3.5", {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}))}


@pytest.mark.parametrize("name", ["kv4", "turbo3.5"])
def test_model_prefill_over_codes_in_chunks(tiny_art, name, monkeypatch):
    """The demo model compiled with a coded KV plan: its prefill takes the C path in every
    layer; a prompt in chunks gives the whole prefill's logits bit for bit, after the
    prefill and after each decode step; and its log-probs are as close to the dense cache's
    as the reference path's (codes stored by MLX, float attention over the dequantized
    cache). The trained demo model moves 0.05 nats under 8-bit KV already, so a difference
    of rounding size in each layer's attention (int8 query codes) shows as ~0.05 here: the
    attention itself is checked against its reference above."""
    from parity_kit import chunked_prefill_logits
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.step import Sequences
    m = tiny_art[name]
    rng = np.random.default_rng(5)
    ids = [int(t) for t in rng.integers(10, m.tokenizer.vocab_size - 10, 45)]

    def run(sizes):
        return chunked_prefill_logits(m, ids, sizes)

    calls = _coded_prompt_calls(monkeypatch)
    whole = run([None])
    assert calls and all(calls)
    for chunks in ([7], [30, 3, 4]):
        for step, (a, b) in enumerate(zip(whole, run(chunks))):
            assert np.array_equal(a, b), (chunks, step, float(np.abs(a - b).max()))
    monkeypatch.setattr(cpu_ops, "_host_coded_prompt", lambda *a, **kw: None)
    ref = run([None])
    dense = tiny_art["dense"]
    seqs = Sequences.start(dense.decoder, [dense.prompt_inputs(Prompt(ids=ids))])
    exact = np.array(seqs.prefill())

    def logp(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    err, ref_err = (float(np.abs(logp(a) - logp(exact)).max()) for a in (whole[0], ref[0]))
    assert err <= 1.25 * ref_err + 0.01, (err, ref_err)
    assert np.array_equal(whole[0].argmax(-1), ref[0].argmax(-1))
