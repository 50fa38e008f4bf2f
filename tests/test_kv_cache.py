"""KV-cache layouts (vlmc.runtime.kv_codecs / kv_cache) and the plan (the kv_layout pass).

Tolerances for the attention output against dense float32 attention over the same
random keys (with outlier channels, as real models have) and values, as relative RMS
over the output; measured over 5 seeds (max) and given about 25% headroom:
  affine 8-bit 2% (measured 1.4%), affine 4-bit/g32 25% (20%), TurboQuant k4/v4 22%
  (19%), k3/v4 = 3.5 bits 45% (36%), k3/v3 50% (39%), k2/v2 75% (61%).
Attention sharpens score errors, so these are well above the codecs' own errors; what
they do to a model's answers is measured by the quality tests (teacher-forced top-1).
The codecs' own reconstruction errors on Gaussian vectors are bounded separately; the
TurboQuant ones sit at the Lloyd-Max distortion of the standard normal (e.g. 3 bits:
sqrt(0.0345) = 18.6%), which the test checks to within a tenth.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.options import KVLayoutError, KVOptions
from vlmc.passes import kv_layout
from vlmc.kernels import reference
from vlmc.runtime import kv_codecs as C
from vlmc.runtime.kv_cache import KVCache, RotatingKVCache, attention_mask, make_caches

B, HKV, H, D = 2, 2, 4, 64
LAYOUTS = {
    "affine8": ({"layout": "quantized", "bits": 8, "group_size": 32}, 0.02),
    "affine4": ({"layout": "quantized", "bits": 4, "group_size": 32}, 0.25),
    "turbo4": ({"layout": "turboquant", "k_bits": 4, "v_bits": 4}, 0.22),
    "turbo3.5": ({"layout": "turboquant", "k_bits": 3, "v_bits": 4}, 0.45),
    "turbo3": ({"layout": "turboquant", "k_bits": 3, "v_bits": 3}, 0.50),
    "turbo2": ({"layout": "turboquant", "k_bits": 2, "v_bits": 2}, 0.75),
}


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def cache_for(spec, batch=B, dim=D):
    return make_caches([{"index": 0, "kv": spec}], batch, HKV, dim)[0]


def kv(n, seed, batch=B, dim=D):
    mx.random.seed(seed)
    # keys with a few outlier channels, as real models have
    k = mx.random.normal((batch, HKV, n, dim)) * (1 + 4 * (mx.arange(dim) % 17 == 0))
    return k, mx.random.normal((batch, HKV, n, dim))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = mx.random.randint(0, 1 << bits, (3, 5, 48)).astype(mx.uint32)
    packed = C.pack(codes, bits)
    assert packed.dtype == mx.uint8 and packed.shape == (3, 5, 48 * bits // 8)
    assert mx.array_equal(C.unpack(packed, bits, 48), codes)


@pytest.mark.parametrize("codec", [C.Affine(4, 64), C.Affine(8, 32), C.Affine(2, 16), C.Turbo(3, 128),
                                   C.Turbo(4, 64)], ids=lambda c: f"{c.kind}{c.bits}")
def test_compiled_one_token_encode_is_bit_identical(codec):
    """Decode steps encode through mx.compile (fused ops); the codes, scales and norms must be
    exactly those of the eager encode, at every batch size the batcher may use."""
    dim = getattr(codec, "dim", 128)
    for batch in (1, 3, 16):
        x = (mx.random.normal((batch, 2, 1, dim)) * 4).astype(mx.bfloat16)
        eager, compiled = codec._encode(x), codec.encode(x)
        assert codec._compiled is not None and eager.keys() == compiled.keys()
        assert all(mx.array_equal(eager[k], compiled[k]).item() for k in eager)


@pytest.mark.parametrize("bits,bound", [(2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_turbo_codec_error_is_the_lloyd_max_distortion(bits, bound):
    codec = C.Turbo(bits, 128, seed=1)
    x = mx.random.normal((4096, 128)) * mx.random.uniform(0.1, 10, (4096, 1))
    err = rel_rms(codec.decode(codec.encode(x), mx.float32), x) ** 2
    assert abs(err - bound) < 0.1 * bound


def test_affine_codec_error_and_storage():
    codec = C.Affine(8, 32)
    x = mx.random.normal((64, 2, 7, 64)) * 5
    parts = codec.encode(x)
    assert {k: v.shape[-1] for k, v in parts.items()} == {"codes": 64, "scales": 2, "biases": 2}
    assert rel_rms(codec.decode(parts, mx.float32), x) < 0.005
    four = C.Affine(4, 16)
    assert rel_rms(four.decode(four.encode(x), mx.float32), x) < 0.08


@pytest.mark.parametrize("name", LAYOUTS)
def test_attention_over_each_layout_matches_dense(name):
    spec, tol = LAYOUTS[name]
    dense, packed = cache_for("dense"), cache_for(spec)
    k, v = kv(96, 3)
    q = mx.random.normal((B, H, 8, D))
    mask = attention_mask(mx.array([0, 0]), 88, 8, False)
    # prefill 88 tokens then 8 more, as a prompt and a chunk would
    for cache in (dense, packed):
        cache.update(k[:, :, :88], v[:, :, :88])
    ref = reference.cached_attention(q, k[:, :, 88:], v[:, :, 88:], dense, mask, scale=D ** -0.5)
    out = reference.cached_attention(q, k[:, :, 88:], v[:, :, 88:], packed, mask, scale=D ** -0.5)
    assert rel_rms(out, ref) < tol
    if name != "affine8":
        assert rel_rms(out, ref) > 1e-4  # it really stores fewer bits


@pytest.mark.parametrize("name", ["dense", "affine4", "turbo3.5"])
def test_trim_then_append_equals_never_appending(name):
    spec = "dense" if name == "dense" else LAYOUTS[name][0]
    a, b = cache_for(spec), cache_for(spec)
    k, v = kv(40, 5)
    a.append(k[:, :, :30], v[:, :, :30])
    a.append(k[:, :, 30:37], v[:, :, 30:37])   # 7 speculative tokens, then rejected
    assert a.trim(7) == 7 and a.offset == 30
    a.append(k[:, :, 30:], v[:, :, 30:])
    b.append(k, v)
    for w in ("k", "v"):
        for name_, arr in a.parts(w).items():
            assert mx.array_equal(arr, b.parts(w)[name_])


@pytest.mark.parametrize("name", ["dense", "affine8", "turbo3"])
def test_blocks_export_and_import_exactly(name):
    spec = "dense" if name == "dense" else LAYOUTS[name][0]
    a = cache_for(spec)
    k, v = kv(70, 7)
    a.append(k, v)
    blocks = a.export_blocks(16)
    assert len(blocks) == 4                      # whole blocks only: 64 of 70 tokens
    b = cache_for(spec)
    b.import_blocks(blocks)
    assert b.offset == 64
    for w in ("k", "v"):
        for key, arr in b.parts(w).items():
            assert mx.array_equal(arr, a.parts(w)[key][:, :, :64])
    assert len(a.export_blocks(16, first=3)) == 1
    with pytest.raises(ValueError):
        cache_for("dense").import_blocks(blocks) if name != "dense" else cache_for(LAYOUTS["affine8"][0]).import_blocks(blocks)


@pytest.mark.parametrize("spec", [{"layout": "rotating"}, {"layout": "quantized", "bits": 4, "group_size": 32}],
                         ids=["dense", "affine4"])
def test_rotating_blocks_export_after_each_chunk_and_import_as_a_prefill_leaves_them(spec):
    """A sliding window exports, right after each prefill chunk, exactly the blocks that
    chunk completed (every one, though the window forgets old tokens between chunks), for a
    left-padded row; a block it forgot is refused, not exported short. Importing all of
    them (far more tokens than the window) holds what a prefill holds for every later query
    (the last window - 1 positions, same stored values) at the same offset."""
    W, bs, pad = 12, 4, 3
    spec = {**spec, "window": W}
    src, twin = cache_for(spec), cache_for(spec)
    src.slack = twin.slack = 2
    k, v = kv(pad + 70, 5)
    blocks, pos = [], 0
    for chunk in (9, 16, 5, 21, 13, 9):   # chunk ends off block boundaries
        sl = slice(pos, pos + chunk)
        src.append(k[:, :, sl], v[:, :, sl])
        twin.append(k[:, :, sl], v[:, :, sl])
        blocks += src.export_blocks(bs, len(blocks), row=1, start=pad)
        pos += chunk
    assert src.start > 0 and len(blocks) == 70 // bs
    for b, block in enumerate(blocks):   # each block is its own tokens' stored form
        lo = pad + b * bs
        want = {f"{w}.{n}": a[1:2] for w, x in (("k", k), ("v", v))
                for n, a in src.codecs[w].encode(x[:, :, lo:lo + bs]).items()}
        assert set(block) == set(want) and all(mx.array_equal(block[n], want[n]) for n in want)
    with pytest.raises(ValueError, match="no longer holds block 0"):
        src.export_blocks(bs, 0, row=1, start=pad)

    into = cache_for(spec, batch=1)
    into.import_blocks(blocks)
    twin.select([1])
    twin.drop_left(pad)
    assert into.offset == twin.offset - 70 % bs == 68 and into.start <= into.offset - (W - 1) < into.start + bs
    seen = W - 1 - 70 % bs   # the positions both hold that a later query can see
    for w in ("k", "v"):
        for name, arr in into.parts(w).items():
            theirs = twin.parts(w)[name][:, :, twin.held - 70 % bs - seen:twin.held - 70 % bs]
            assert mx.array_equal(arr[:, :, into.held - seen:], theirs)
    rest = slice(pad + 68, pad + 70)   # then both go on alike: the same keys over the window
    got = into.update(k[1:2, :, rest], v[1:2, :, rest])[0][:, :, -(W - 1):]
    twin.trim(70 % bs)
    want = twin.update(k[1:2, :, rest], v[1:2, :, rest])[0][:, :, -(W - 1):]
    assert mx.array_equal(got, want)


def test_rotating_cache_keeps_positions_from_keep_from():
    """``keep_from`` holds back make_room's drop (a block the prefix cache has yet to store)
    and nothing else: the window's attention over the held keys is unchanged."""
    W = 6
    held, plain = RotatingKVCache(1, HKV, D, window=W), RotatingKVCache(1, HKV, D, window=W)
    held.slack = plain.slack = 2
    k, v = kv(40, 4, batch=1)
    held.keep_from = 16
    for lo in range(0, 40, 8):
        q = mx.random.normal((1, H, 8, D))
        mask = attention_mask(mx.array([0]), lo, 8, False)
        outs = [reference.cached_attention(q, k[:, :, lo:lo + 8], v[:, :, lo:lo + 8], c, mask, scale=0.125)
                for c in (held, plain)]
        assert rel_rms(outs[0], outs[1]) < 1e-6
    assert held.start == 16 and plain.start == 27   # plain kept window - 1 = 5 before its last 8
    assert mx.array_equal(held.export_blocks(8, 2)[0]["k.x"], k[:, :, 16:24])
    held.keep_from = None
    held.append(*kv(1, 6, batch=1))
    assert held.start == 35 and held.held == W   # the drop it held back, then the new token


def test_rotating_cache_writes_in_place_again_after_dropping_exported_columns():
    """Exported columns move left when the window drops its oldest tokens, so the in-place
    decode store (``host_writable``) resumes once past them instead of stopping for good."""
    window = RotatingKVCache(B, HKV, D, window=8)
    window.append(*kv(40, 1))
    window.export_blocks(8)
    assert window.exported == 40
    window.append(*kv(1, 2))   # drops 33 columns first
    assert window.start == 33 and window.exported == 7 and window.host_writable()


def test_batch_rows_are_independent():
    spec = LAYOUTS["turbo3.5"][0]
    both, one = cache_for(spec), cache_for(spec, batch=1)
    k, v = kv(20, 9)
    kb, vb = both.update(k, v)
    k1, v1 = one.update(k[1:], v[1:])
    assert mx.array_equal(kb[1:], k1) and mx.array_equal(vb[1:], v1)


def test_rotating_window_equals_dense_attention_restricted_to_the_window():
    W, n = 12, 50
    rot = RotatingKVCache(1, HKV, D, window=W)
    rot.slack = 4
    dense = KVCache(1, HKV, D)
    k, v = kv(n, 11, batch=1)
    q = mx.random.normal((1, H, n, D))
    outs, refs = [], []
    pos = 0
    for chunk in (20, 1, 1, 9, 1, 1, 1, 16):     # a chunked prompt, then decode steps
        sl = slice(pos, pos + chunk)
        mask = attention_mask(mx.array([0]), pos, chunk, False)
        outs.append(reference.cached_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], rot, mask, scale=0.125))
        # dense reference: causal and at most W keys back
        dense.update(k[:, :, sl], v[:, :, sl])
        qp = mx.arange(pos, pos + chunk)[:, None]
        kp = mx.arange(pos + chunk)[None, :]
        window = ((kp <= qp) & (kp > qp - W))[None, None]
        refs.append(reference.attention(q[:, :, sl], dense.update(k[:, :, :0], v[:, :, :0])[0],
                                        dense.update(k[:, :, :0], v[:, :, :0])[1], window, scale=0.125))
        pos += chunk
    assert rel_rms(mx.concatenate(outs, 2), mx.concatenate(refs, 2)) < 1e-6
    assert rot.held <= W - 1 + rot.slack + 16 and rot.start > 0     # it really forgot old tokens
    with pytest.raises(ValueError):
        rot.trim(rot.held)


# ---------------------------------------------------------------- the plan

QWEN2_VL_2B = dict(kv_heads=2, head_dim=128, compute="bfloat16", max_context=32768)


def plan_kv(layers, *, kv_heads, head_dim, compute, max_context, context=None, quantize_last=False, **kv):
    """The kv_layout pass's planning, its options typed as the CLI and API type them."""
    options = KVOptions(kv_context=context, kv_quantize_last=quantize_last, **kv)
    return kv_layout.plan(layers, kv_heads=kv_heads, head_dim=head_dim, compute=compute, max_context=max_context,
                          options=options)


def layers(n=28, window_from=None, window=4096):
    return [{"index": i, **({"window": window} if window_from is not None and i >= window_from else {})}
            for i in range(n)]


@pytest.mark.parametrize("opts,ratio", [
    ({"kv_bits": 8}, 0.55), ({"kv_bits": 4}, 0.30), ({"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}, 0.25)])
def test_plan_bytes_per_token_for_qwen2_vl_2b_shapes(opts, ratio):
    """The whole default plan within the issue's bar: the last layer is spared (dense next
    to 8-bit codes, 8-bit codes next to fewer bits) and still fits; with it quantized too
    the plan is smaller still."""
    dense_layer = kv_layout.bytes_per_token({"layout": "dense"}, 2, 128, "bfloat16")
    specs, meta, summary = plan_kv(layers(), **QWEN2_VL_2B, **opts)
    spared = {"layout": "dense"} if opts["kv_bits"] == 8 else {"layout": "quantized", "bits": 8, "group_size": 64}
    assert {k: v for k, v in specs[-1].items() if k != "bytes_per_token"} == spared
    assert all(s["layout"] != "dense" for s in specs[:-1])
    assert specs[0]["bytes_per_token"] / dense_layer <= ratio
    assert meta["ratio_to_dense_bfloat16"] <= ratio
    assert meta["bytes_at_context"] == meta["bytes_per_token"] * 32768
    _, meta_all, _ = plan_kv(layers(), **QWEN2_VL_2B, **opts, quantize_last=True)
    assert meta_all["ratio_to_dense_bfloat16"] <= ratio
    assert plan_kv(layers(), **QWEN2_VL_2B)[1]["ratio_to_dense_bfloat16"] == 1.0


def test_plan_keeps_sliding_layers_rotating_and_reports_it():
    specs, meta, summary = plan_kv(layers(window_from=20), **QWEN2_VL_2B, kv_bits=4)
    assert all(s["layout"] == "rotating" and s["window"] == 4096 for s in specs[20:])
    assert specs[19]["layout"] == "quantized" and specs[19]["bits"] == 8   # the last full-attention layer, spared
    assert any("sliding-window" in n for n in meta["notes"]) and "sliding-window" in summary


def test_budget_picks_the_least_compression_that_fits():
    dense_total = plan_kv(layers(), **QWEN2_VL_2B, context=16384)[1]["bytes_at_context"]
    for budget, layout in ((dense_total, "dense"), (dense_total // 1.5, "quantized"),
                           (dense_total // 3.6, "turboquant")):
        specs, meta, _ = plan_kv(layers(), **QWEN2_VL_2B, context=16384, kv_memory_budget=int(budget))
        assert specs[0]["layout"] == layout and meta["bytes_at_context"] <= budget
    with pytest.raises(KVLayoutError, match="no KV layout fits"):
        plan_kv(layers(), **QWEN2_VL_2B, context=16384, kv_memory_budget=1000)


@pytest.mark.parametrize("opts,match", [
    ({"kv_bits": 5}, "2, 3, 4 or 8"), ({"kv_bits": 3.5}, "fractional"),
    ({"kv_bits": 3.5, "kv_quant_scheme": "turboquant", "kv_group_size": 64}, None),
    ({"kv_bits": 1.5, "kv_quant_scheme": "turboquant"}, "2 to 4 bits"),
    ({"kv_bits": 4, "kv_quant_scheme": "nf4"}, "uniform, turboquant"),
    ({"kv_bits": 4, "max_kv_size": 512}, "cannot be combined"), ({"max_kv_size": 0}, "at least 1"),
    ({"kv_bits": 4, "kv_memory_budget": 10**9}, "not both"), ({"kv_bits": 4, "kv_group_size": 48}, "16, 32, 64 or 128")])
def test_bad_kv_options_are_clear_errors(opts, match):
    if match is None:
        plan_kv(layers(), **QWEN2_VL_2B, **opts)
        return
    with pytest.raises(KVLayoutError, match=match):
        plan_kv(layers(), **QWEN2_VL_2B, **opts)


def test_group_size_that_does_not_divide_the_head_dim_is_refused():
    with pytest.raises(KVLayoutError, match="not a multiple of the group size 64"):
        plan_kv(layers(4), kv_heads=2, head_dim=48, compute="float32", max_context=1024, kv_bits=4,
                    kv_group_size=64)
    specs, _, _ = plan_kv(layers(4), kv_heads=2, head_dim=48, compute="float32", max_context=1024, kv_bits=4)
    assert specs[0]["group_size"] == 16  # the automatic choice divides 48


# ---------------------------------------------------------------- end to end, through the CLI

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fixtures.checkpoints import build_checkpoint
    folder = tmp_path_factory.mktemp("kvck") / "qwen2_vl"
    build_checkpoint(folder, "qwen2_vl")
    return folder


def _cli(*args, env=None):
    from click.testing import CliRunner
    from vlmc.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_records_the_plan_and_inspect_shows_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    res = _cli("compile", tiny_checkpoint, "-o", out, "--kv-bits", "3.5", "--kv-quant-scheme", "turboquant")
    assert res.exit_code == 0, res.output
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    layers = manifest["kv_plan"]["text_layer"]
    assert layers[0]["kv"]["layout"] == "turboquant"
    assert layers[-1]["kv"]["layout"] == "quantized" and layers[-1]["kv"]["bits"] == 8   # the last layer, spared
    assert manifest["meta"]["kv_plan"]["bytes_per_token"] == sum(L["kv"]["bytes_per_token"] for L in layers)
    shown = _cli("inspect", out).output
    assert "kv cache (batch 1)" in shown and "turboquant k3/v4" in shown


def test_run_and_bench_take_kv_options_and_the_cache_is_smaller(tiny_checkpoint, tmp_path):
    import vlmc
    art = vlmc.compile(tiny_checkpoint, tmp_path / "art")
    res = _cli("run", art, "-p", "Hello", "--max-tokens", "4", "--kv-bits", "8")
    assert res.exit_code == 0, res.output
    from vlmc.bench import bench
    dense = bench(str(art), contexts=[200], decode_tokens=2)["contexts"][0]
    q4 = bench(str(art), kv={"kv_bits": 4, "kv_quantize_last": True}, contexts=[200],
                          decode_tokens=2)["contexts"][0]
    assert q4["kv_bytes"] < 0.5 * dense["kv_bytes"] and q4["decode_tps"] > 0


@pytest.mark.parametrize("args,message", [
    (["--kv-bits", "5"], "2, 3, 4 or 8 bits"),
    (["--kv-memory-budget", "lots"], "byte count"),
    (["--kv-memory-budget", "1K"], "no KV layout fits"),
])
def test_kv_flag_mistakes_are_one_clear_error(tiny_checkpoint, tmp_path, args, message):
    res = _cli("compile", tiny_checkpoint, "-o", tmp_path / "x", *args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def degenerate(tokens: list[int], tail: int = 96, max_period: int = 8) -> bool:
    """True when the last ``tail`` tokens repeat one pattern of at most ``max_period`` tokens."""
    end = tokens[-tail:]
    return any(all(end[i] == end[i - p] for i in range(p, len(end))) for p in range(1, max_period + 1))


def test_degenerate_detector():
    assert degenerate([5, 6, 7] * 40) and degenerate([1] * 100) and not degenerate(list(range(200)))


@pytest.mark.parametrize("kv", [{"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}],
                         ids=["kv8", "kv4", "turbo3.5"])
def test_no_degenerate_repetition_in_long_greedy_runs(tiny_checkpoint, tmp_path_factory, kv):
    """256 greedy tokens (EOS ignored) from fixed prompts: a coded cache must not fall into a
    repetition loop where the dense cache does not."""
    import vlmc
    from vlmc.quality import FIXED_PROMPTS
    from vlmc.runtime.sampling import Sampler, SamplingParams
    art = vlmc.compile(tiny_checkpoint, tmp_path_factory.mktemp("rep") / "art")
    dense, coded = vlmc.load(art), vlmc.load(art, **kv)
    checked = 0
    for text in FIXED_PROMPTS:
        runs = []
        for model in (dense, coded):
            steps = model.generate_steps([model.build_prompt(text)], Sampler(SamplingParams()), 256)
            runs.append([int(t[0].item()) for t, _ in steps])
        if not degenerate(runs[0]):
            checked += 1
            assert not degenerate(runs[1]), (text, runs[1][-24:])
    assert checked >= 1  # the comparison happened for at least one prompt


@pytest.mark.parametrize("dim", [128, 48, 20])
def test_cpu_kernel_reads_dense_buffers_like_the_reference(dim, monkeypatch):
    """The C decode kernel over a dense float32 cache (read in place, no slice copy) against
    the MLX reference, with left padding and spare capacity; the cpu op library routes
    dense decode steps to it, sliding windows too (the kernel's window bound, after the
    rotating cache dropped what its append drops), each step as the masked reference."""
    from vlmc.kernels import cpu, cpu_ops, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_dense_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    cache = cache_for("dense", dim=dim)
    k, v = kv(300, 13, dim=dim)
    cache.append(k, v)
    q = mx.random.normal((B, H, dim))
    args = (q, cache.buffers["k"]["x"], cache.buffers["v"]["x"], mx.array([0, 11], mx.int32), cache.held)
    out, ref = kv_dense_decode(*args, scale=dim ** -0.5), kv_quant.kv_dense_decode(*args, scale=dim ** -0.5)
    assert cache.capacity > cache.held
    assert float(mx.abs(out - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
    calls = []
    monkeypatch.setattr(cpu_ops, "_kv_dense_decode", lambda *a, **kw: calls.append(1) or kv_dense_decode(*a, **kw))
    twin = cache_for("dense", dim=dim)
    twin.append(k, v)
    step = cpu_ops.cached_attention(q[:, :, None], k[:, :, :1], v[:, :, :1], cache, None, scale=0.125)
    whole = reference.cached_attention(q[:, :, None], k[:, :, :1], v[:, :, :1], twin, None, scale=0.125)
    assert calls == [1] and float(mx.abs(step - whole).max()) <= 1e-5 * float(mx.abs(whole).max())
    window, twin = RotatingKVCache(B, HKV, dim, window=16), RotatingKVCache(B, HKV, dim, window=16)
    for c in (window, twin):
        c.append(k[:, :, :40], v[:, :, :40])  # start 0, but its mask_for still hides tokens
    for i in range(20):  # 40 + 20 tokens: past window - 1 + slack, the oldest get dropped
        kk, vv = k[:, :, 40 + i:41 + i], v[:, :, 40 + i:41 + i]
        step = cpu_ops.cached_attention(q[:, :, None], kk, vv, window, None, scale=0.125)
        whole = reference.cached_attention(q[:, :, None], kk, vv, twin, None, scale=0.125)
        assert float(mx.abs(mx.array(step) - whole).max()) <= 1e-5 * float(mx.abs(whole).max()), i
    assert calls == [1] * 21 and window.start == twin.start > 0 and window.held == twin.held


@pytest.mark.parametrize("heads,dim", [(16, 64), (14, 48), (2, 16)])
def test_cpu_dense_kernel_head_groups_and_blocks(heads, dim):
    """The AVX-512 dense path (D % 16 == 0) takes query heads in passes of up to 6 and
    values in blocks of 128 rows: 8 and 7 heads per KV head (two passes), one head, 300
    held tokens (three blocks, the last partial) with one sequence starting at 299 and one
    that sees no token at all (zeros)."""
    from vlmc.kernels import cpu, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_dense_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    mx.random.seed(5)
    keys = mx.random.normal((3, HKV, 320, dim))
    values = mx.random.normal((3, HKV, 320, dim))
    q = mx.random.normal((3, heads, dim))
    starts = mx.array([0, 299, 300], mx.int32)
    out = kv_dense_decode(q, keys, values, starts, 300, scale=dim ** -0.5)
    ref = kv_quant.kv_dense_decode(q, keys, values, starts, 300, scale=dim ** -0.5)
    assert float(mx.abs(out[:2] - ref[:2]).max()) <= 1e-5 * float(mx.abs(ref[:2]).max())
    assert not bool(mx.any(out[2] != 0))


@pytest.mark.parametrize("dim", [64, 24])
@pytest.mark.parametrize("before", [1, 127, 128, 256])
def test_cpu_dense_kernel_extra_row(dim, before):
    """This step's keys/values as the kernel's extra last row ([B, HKV, D], not in the
    cache): the same attention as a cache holding them, when the row ends a 128-row block,
    starts one, or lies past a full buffer (before == capacity); D = 24 takes the
    row-at-a-time driver."""
    from vlmc.kernels import cpu, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_dense_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    mx.random.seed(before)
    cap = 256
    keys, values = mx.random.normal((B, HKV, cap, dim)), mx.random.normal((B, HKV, cap, dim))
    nk, nv = mx.random.normal((B, HKV, dim)), mx.random.normal((B, HKV, dim))
    q = mx.random.normal((B, H, dim))
    starts = mx.array([0, min(5, before - 1)], mx.int32)
    whole_k = mx.concatenate([keys[:, :, :before], nk[:, :, None]], axis=2)
    whole_v = mx.concatenate([values[:, :, :before], nv[:, :, None]], axis=2)
    ref = kv_quant.kv_dense_decode(q, whole_k, whole_v, starts, before + 1, scale=dim ** -0.5)
    out = kv_dense_decode(np.asarray(q), keys, values, starts, before + 1, scale=dim ** -0.5,
                          new_k=np.asarray(nk), new_v=np.asarray(nv))
    assert isinstance(out, np.ndarray)
    assert float(np.abs(out - np.asarray(ref)).max()) <= 1e-5 * float(mx.abs(ref).max())
    plain = kv_dense_decode(q, keys, values, starts, before, scale=dim ** -0.5)  # no extra row: unchanged
    ref0 = kv_quant.kv_dense_decode(q, keys, values, starts, before, scale=dim ** -0.5)
    assert float(mx.abs(plain - ref0).max()) <= 1e-5 * float(mx.abs(ref0).max())


def test_cpu_host_decode_stores_in_place_or_defers(monkeypatch):
    """Decode steps on host arrays over a dense cache: each layer attends over its cache plus
    the step's k/v (the kernel's extra row), then stores them in the buffer's memory in
    place while there is room (KVCache.write_host), else as a lazy write that the next read
    of any deferred cache evaluates for all of them at once. Outputs and stored tokens match
    the MLX reference path step by step, across two caches (two layers) and a buffer that
    grows (254 -> 258 tokens, capacity 256 -> 512)."""
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.kernels.cpu import kv_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    dim = 64
    caches = [cache_for("dense", dim=dim) for _ in range(2)]
    twins = [cache_for("dense", dim=dim) for _ in range(2)]
    k, v = kv(254, 0, dim=dim)
    for c in caches + twins:
        c.append(k, v)
    deferred = []
    for step in range(4):
        nk, nv = kv(1, 0, dim=dim)
        q = mx.random.normal((B, H, 1, dim))
        for c, t in zip(caches, twins):
            out = cpu_ops.cached_attention(np.asarray(q), np.asarray(nk), np.asarray(nv), c, None, scale=0.125)
            ref = reference.cached_attention(q, nk, nv, t, None, scale=0.125)
            assert isinstance(out, np.ndarray) and out.shape == (B, H, 1, dim)
            assert float(np.abs(out - np.asarray(ref)).max()) <= 1e-5 * float(mx.abs(ref).max())
        deferred.append([id(c) in kv_decode._unsettled for c in caches])
    # in place at 254 and 255; the 257th token needs a bigger buffer (deferred); then in place
    assert deferred == [[False, False], [False, False], [True, True], [False, False]]
    kv_decode.settle()
    for c, t in zip(caches, twins):
        assert c.held == t.held == 258 and c.capacity >= 258
        assert mx.array_equal(c.buffers["k"]["x"][:, :, :258], t.buffers["k"]["x"][:, :, :258])
        assert mx.array_equal(c.buffers["v"]["x"][:, :, :258], t.buffers["v"]["x"][:, :, :258])


def test_write_host_never_writes_where_an_array_can_see():
    """In-place stores only past the held tokens, within the capacity, and past every
    exported block; a view taken before a store keeps its values."""
    cache = cache_for("dense")
    assert not cache.write_host(np.ones((B, HKV, 1, D), np.float32), np.ones((B, HKV, 1, D), np.float32))  # no buffer
    k, v = kv(16, 0)
    cache.append(k, v)
    seen = cache.buffers["k"]["x"][:, :, :16]
    before = np.array(seen)
    assert cache.write_host(np.full((B, HKV, 1, D), 7, np.float32), np.full((B, HKV, 1, D), 8, np.float32))
    assert cache.held == 17 and np.array_equal(np.array(seen), before)
    assert np.all(np.asarray(cache.buffers["k"]["x"])[:, :, 16] == 7)
    blocks = cache.export_blocks(8)
    assert len(blocks) == 2 and cache.exported == 16
    cache.trim(2)  # back to 15 held: column 15 was exported, so no in-place store there
    assert not cache.write_host(np.zeros((B, HKV, 1, D), np.float32), np.zeros((B, HKV, 1, D), np.float32))
    assert cache.held == 15 and float(mx.abs(blocks[1]["k.x"] - k[:, :, 8:16]).max()) == 0
    window = RotatingKVCache(B, HKV, D, window=8)
    window.append(k, v)  # in place while its next append would drop nothing (16 <= 7 + slack)
    assert window.write_host(np.ones((B, HKV, 1, D), np.float32), np.ones((B, HKV, 1, D), np.float32))
    window.append(*kv(32, 3))
    assert window.held == 49  # its next append drops old tokens first: not in place
    assert not window.write_host(np.ones((B, HKV, 1, D), np.float32), np.ones((B, HKV, 1, D), np.float32))


@pytest.mark.parametrize("k_bits,v_bits,dim", [(3, 4, 128), (2, 2, 64), (4, 4, 48), (4, 3, 16), (3, 3, 24)])
def test_cpu_kernel_reads_turboquant_codes_like_the_reference(k_bits, v_bits, dim, monkeypatch):
    """The C decode kernel over TurboQuant codes (rotated space) against the MLX reference,
    with a left-padded sequence and a buffer larger than the held tokens; and the cpu op
    library routes TurboQuant decode steps to it, rotating in and out."""
    from vlmc.kernels import cpu, cpu_ops, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_turbo_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    cache = cache_for({"layout": "turboquant", "k_bits": k_bits, "v_bits": v_bits}, dim=dim)
    k, v = kv(300, 13, dim=dim)
    cache.append(k, v)
    kc, vc = cache.codecs["k"], cache.codecs["v"]
    q_rot = mx.random.normal((B, H, dim)) @ kc.rotation
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    args = (q_rot, kb["codes"], kb["norms"], vb["codes"], vb["norms"], kc.codebook, vc.codebook,
            mx.array([0, 11], mx.int32), cache.held)
    kw = dict(scale=dim ** -0.5, k_bits=k_bits, v_bits=v_bits)
    out, ref = kv_turbo_decode(*args, **kw), kv_quant.kv_turbo_decode(*args, **kw)
    assert cache.capacity > cache.held
    assert float(mx.abs(out - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
    calls = []
    monkeypatch.setattr(cpu_ops, "_kv_turbo_decode", lambda *a, **kw: calls.append(1) or kv_turbo_decode(*a, **kw))
    twin = cache_for({"layout": "turboquant", "k_bits": k_bits, "v_bits": v_bits}, dim=dim)
    twin.append(k, v)
    q = mx.random.normal((B, H, 1, dim))
    step = cpu_ops.cached_attention(q, k[:, :, :1], v[:, :, :1], cache, None, scale=0.125)
    whole = reference.cached_attention(q, k[:, :, :1], v[:, :, :1], twin, None, scale=0.125)
    assert calls == [1] and step.shape == (B, H, 1, dim)
    assert float(mx.abs(step - whole).max()) <= 1e-4 * float(mx.abs(whole).max())


@pytest.mark.parametrize("bits,gs,dim", [(4, 64, 128), (8, 32, 64), (4, 16, 48)])
def test_cpu_kernel_reads_affine_codes_like_the_reference(bits, gs, dim, monkeypatch):
    """The C decode kernel over packed codes (the cpu target's decode path) against the MLX
    reference, with a left-padded sequence and a buffer larger than the held tokens; and the
    cpu op library really routes affine decode steps to it."""
    from vlmc.kernels import cpu, cpu_ops, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_affine_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    cache = cache_for({"layout": "quantized", "bits": bits, "group_size": gs}, dim=dim)
    k, v = kv(300, 13, dim=dim)
    cache.append(k, v)
    q = mx.random.normal((B, H, dim))
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    args = (q, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"], vb["biases"],
            mx.array([0, 11], mx.int32), cache.held)
    kw = dict(scale=dim ** -0.5, bits=bits, group_size=gs)
    out, ref = kv_affine_decode(*args, **kw), kv_quant.kv_affine_decode(*args, **kw, int8_query=True)
    assert cache.capacity > cache.held
    assert float(mx.abs(out - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
    calls = []
    monkeypatch.setattr(cpu_ops, "_kv_affine_decode", lambda *a, **kw: calls.append(1) or kv_affine_decode(*a, **kw))
    step = cpu_ops.cached_attention(q[:, :, None], k[:, :, :1], v[:, :, :1], cache, None, scale=0.125)
    assert calls == [1] and step.shape == (B, H, 1, dim)


def _affine_attention_np(q, cache, starts, held, T, scale, window, softcap, gs):
    """float64 numpy attention of the int8-coded queries (kv_quant.query_int8) over an affine
    cache's decoded keys and values: query t of a step of T sees keys starts[b] <= i < held -
    T + 1 + t, and with a window none before its end - window; soft-capped scores."""
    from vlmc.kernels import kv_quant
    c = cache.codecs["k"]
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    keys = np.asarray(kv_quant.affine_decode(kb["codes"], kb["scales"], kb["biases"], c.bits, gs), np.float64)
    vals = np.asarray(kv_quant.affine_decode(vb["codes"], vb["scales"], vb["biases"], c.bits, gs), np.float64)
    qt = np.asarray(kv_quant.query_int8(q, gs), np.float64)  # [B, H, T, D]
    Bn, Hn = qt.shape[:2]
    R = Hn // keys.shape[1]
    out = np.zeros(qt.shape)
    for b in range(Bn):
        for h in range(Hn):
            for t in range(T):
                end = held - T + 1 + t
                beg = max(int(starts[b]), end - window if window else 0)
                if beg >= end:
                    continue
                s = keys[b, h // R, beg:end] @ qt[b, h, t] * scale
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[b, h, t] = p @ vals[b, h // R, beg:end] / p.sum()
    return out


@pytest.mark.parametrize("bits,gs,dim", [(4, 32, 64), (4, 64, 128), (8, 16, 64), (8, 64, 128), (4, 16, 64),
                                         (4, 128, 128)])
def test_cpu_affine_kernel_scores_int8_queries_like_the_reference(bits, gs, dim, monkeypatch):
    """The affine decode kernel (where the CPU has VNNI and the groups fit: keys scored in the
    integer domain, values widened in registers; else the float driver) against float64
    attention of the int8-coded queries over the decoded codes: a ragged batch (one sequence
    sees nothing), one and several query tokens, sliding windows and soft-capped scores,
    rows that cross the 16- and 64-row blocks; the float driver (VLMC_KV_FLOAT=1) agrees.
    And the coded query (int8 codes and residuals) changes the result by far less than the
    codes themselves do against dense attention."""
    from vlmc.kernels import cpu
    from vlmc.kernels.cpu.kv_decode import kv_affine_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    batch, heads, held = 3, 6, 203
    spec = {"layout": "quantized", "bits": bits, "group_size": gs}
    cache = make_caches([{"index": 0, "kv": spec}], batch, HKV, dim)[0]
    k, v = kv(held, 5, batch=batch, dim=dim)
    cache.append(k, v)
    kb, vb = cache.buffers["k"], cache.buffers["v"]
    starts = np.array([0, 37, held], np.int32)
    rng = np.random.default_rng(bits * gs + dim)
    for T, window, softcap in [(1, 0, 0.0), (3, 0, 0.0), (1, 50, 0.0), (4, 70, 5.0), (1, 0, 3.0)]:
        q = mx.array((rng.standard_normal((batch, heads, T, dim)) * 2).astype(np.float32))
        args = (q if T > 1 else q[:, :, 0], kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"],
                vb["biases"], mx.array(starts), held)
        kw = dict(scale=dim ** -0.5, bits=bits, group_size=gs, window=window, softcap=softcap)
        out = np.asarray(kv_affine_decode(*args, **kw)).reshape(batch, heads, T, dim)
        ref = _affine_attention_np(q, cache, starts, held, T, dim ** -0.5, window, softcap, gs)
        err = np.abs(out - ref).max()
        assert err <= 1e-5 * np.abs(ref).max(), (T, window, softcap, err)
        assert not np.any(out[2])  # a sequence that sees no key: zeros
        monkeypatch.setenv("VLMC_KV_FLOAT", "1")
        flt = np.asarray(kv_affine_decode(*args, **kw)).reshape(batch, heads, T, dim)
        monkeypatch.delenv("VLMC_KV_FLOAT")
        assert np.abs(flt - out).max() <= 1e-5 * np.abs(ref).max()
    dense = make_caches([{"index": 0, "kv": "dense"}], batch, HKV, dim)[0]
    dense.append(k, v)
    q = mx.array(rng.standard_normal((batch, heads, dim)).astype(np.float32))
    st = mx.array(starts[:2])
    out = kv_affine_decode(q[:2], kb["codes"][:2], kb["scales"][:2], kb["biases"][:2], vb["codes"][:2],
                           vb["scales"][:2], vb["biases"][:2], st, held, scale=dim ** -0.5, bits=bits, group_size=gs)
    from vlmc.kernels import kv_quant
    ref = kv_quant.kv_dense_decode(q[:2], dense.buffers["k"]["x"][:2], dense.buffers["v"]["x"][:2], st, held,
                                   scale=dim ** -0.5)
    flt = kv_quant.kv_affine_decode(q[:2], kb["codes"][:2], kb["scales"][:2], kb["biases"][:2], vb["codes"][:2],
                                    vb["scales"][:2], vb["biases"][:2], st, held, scale=dim ** -0.5, bits=bits,
                                    group_size=gs)  # float queries
    assert rel_rms(out, flt) < 2e-4 < rel_rms(flt, ref)  # far below what the codes themselves cost


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, 64)])
def test_cpu_prompt_over_affine_codes_dequantizes_in_c(bits, gs, monkeypatch):
    """A prompt chunk over a 4/8-bit cache on the cpu target (more query tokens than the decode
    kernels take) reads the held codes dequantized by the C kernel, then BLAS attention: the
    MLX reference's result (codes decoded by MLX), for a left-padded batch and a host q."""
    from vlmc.kernels import cpu, cpu_ops
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    spec = {"layout": "quantized", "bits": bits, "group_size": gs}
    fast, ref_cache = cache_for(spec), cache_for(spec)
    k, v = kv(300, 9)
    for c in (fast, ref_cache):
        c.append(k[:, :, :260], v[:, :, :260])
    q = mx.random.normal((B, H, 40, D))
    mask = attention_mask(mx.array([0, 23]), 260, 40, True)
    calls = []
    real = cpu_ops._affine_values
    monkeypatch.setattr(cpu_ops, "_affine_values", lambda c: calls.append(1) or real(c))
    out = cpu_ops.cached_attention(np.asarray(q), np.asarray(k[:, :, 260:]), np.asarray(v[:, :, 260:]), fast, mask,
                                   scale=D ** -0.5)
    ref = reference.cached_attention(q, k[:, :, 260:], v[:, :, 260:], ref_cache, mask, scale=D ** -0.5)
    assert calls == [1] and isinstance(out, np.ndarray) and fast.held == 300
    assert float(np.abs(out - np.asarray(ref)).max()) <= 1e-5 * float(mx.abs(ref).max())


# ---------------------------------------------------------------- the cpu decode_layer fast path over quantized caches

def _encode_inputs(rng, batch, heads, dim, gs, bits):
    """Vectors [batch, heads, 1, dim] that probe every rounding of Affine's encode: Gaussian
    rows of very different magnitudes, exact ties (values at half steps of a power-of-two
    scale), constant and almost constant groups, signed zeros, all zeros."""
    shape, groups = (batch, heads, 1, dim), (batch, heads, 1, dim // gs, gs)
    top = (1 << bits) - 1
    scale = 2.0 ** rng.integers(-8, 4, (*groups[:-1], 1))
    steps = rng.integers(0, top, groups) + 0.5 * rng.integers(0, 2, groups)
    steps[..., 0], steps[..., 1] = 0, top  # the group's range is exactly top steps
    const = np.repeat(rng.standard_normal((*groups[:-1], 1)), gs, -1)
    nudged = const.copy()
    nudged[..., 0] = np.nextafter(nudged[..., 0].astype(np.float32), np.float32(np.inf))
    zeros = rng.standard_normal(shape)
    zeros[rng.random(shape) < 0.4] = 0.0
    zeros[rng.random(shape) < 0.4] = -0.0
    xs = [rng.standard_normal(shape) * 10.0 ** rng.integers(-20, 20, (batch, heads, 1, 1)),
          (steps * scale).reshape(shape), const.reshape(shape), nudged.reshape(shape), zeros, np.zeros(shape),
          1000 + rng.standard_normal(shape)]
    return [x.astype(np.float32) for x in xs]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs,dim", [(16, 16), (16, 48), (32, 64), (64, 128), (128, 128)])
def test_c_encode_is_the_affine_codecs_byte_for_byte(bits, gs, dim):
    """The decode_layer path encodes a step's keys and values in C (vlmc_kv_affine_encode):
    codes, bf16 scales and bf16 minimums equal to kv_codecs.Affine's, compiled (decode
    steps) and eager, byte for byte, on inputs with ties, constant groups and signed zeros."""
    from vlmc.kernels import cpu
    from vlmc.kernels.cpu.kv_decode import kv_affine_encode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    codec = C.Affine(bits, gs)
    rng = np.random.default_rng(bits * 1000 + gs + dim)
    for batch in (1, 3):
        for x in _encode_inputs(rng, batch, 2, dim, gs, bits):
            got = kv_affine_encode(x, bits, gs)
            for ref in (codec.encode(mx.array(x)), codec._encode(mx.array(x))):
                assert np.array_equal(got["codes"], np.asarray(ref["codes"]))
                for name in ("scales", "biases"):
                    assert np.array_equal(got[name], np.asarray(ref[name].view(mx.uint16))), name


def _layer_weights(rng, hidden, heads, kv_heads, dim, inter):
    """One pre-norm layer's weights as the generated code passes them (q4 projections with
    bf16 scales, a qkv bias), and the op-by-op layer they make (the generated body's ops)."""
    from vlmc.kernels import cpu_ops
    from vlmc.kernels.quant import QuantWeight

    def q4(n, k):
        w = mx.array((rng.standard_normal((n, k)) * 0.5 / np.sqrt(k)).astype(np.float32)).astype(mx.bfloat16)
        return QuantWeight(*mx.quantize(w, group_size=64, bits=4), 4, 64, "affine")
    norm1, norm2 = (mx.array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)) for _ in range(2))
    qkv_w, o_w = q4((heads + 2 * kv_heads) * dim, hidden), q4(hidden, heads * dim)
    gu_w, d_w = q4(2 * inter, hidden), q4(hidden, inter)
    qkv_b = mx.array((0.1 * rng.standard_normal((heads + 2 * kv_heads) * dim)).astype(np.float32))
    weights = (norm1, qkv_w, qkv_b, o_w, None, norm2, gu_w, None, d_w, None)
    scale = dim ** -0.5

    def ops_layer(x, cos, sin, mask, cache):
        ops = cpu_ops
        n1 = ops.rms_norm(x, norm1, eps=1e-6)
        q, k, v = ops.split(ops.qlinear(n1, qkv_w, qkv_b), sizes=[heads * dim, kv_heads * dim, kv_heads * dim],
                            axis=-1)
        q = ops.transpose(ops.reshape(q, shape=[0, 0, heads, dim]), axes=[0, 2, 1, 3])
        k = ops.transpose(ops.reshape(k, shape=[0, 0, kv_heads, dim]), axes=[0, 2, 1, 3])
        v = ops.transpose(ops.reshape(v, shape=[0, 0, kv_heads, dim]), axes=[0, 2, 1, 3])
        attn = ops.cached_attention(ops.rope(q, cos, sin), ops.rope(k, cos, sin), v, cache, mask, scale=scale)
        attn = ops.reshape(ops.transpose(attn, axes=[0, 2, 1, 3]), shape=[0, 0, heads * dim])
        h = ops.add(x, ops.qlinear(attn, o_w))
        gate, up = ops.split(ops.qlinear(ops.rms_norm(h, norm2, eps=1e-6), gu_w), sizes=[inter, inter], axis=-1)
        return ops.add(h, ops.qlinear(ops.glu(gate, up, kind="silu"), d_w))
    attrs = dict(eps1=1e-6, eps2=1e-6, heads=heads, kv_heads=kv_heads, head_dim=dim, inter=inter, scale=scale,
                 act="silu")
    return weights, ops_layer, attrs


STACK = [{"layout": "dense"}, {"layout": "quantized", "bits": 4, "group_size": 32},
         {"layout": "quantized", "bits": 8, "group_size": 64}, {"layout": "quantized", "bits": 4, "group_size": 16},
         {"layout": "turboquant", "k_bits": 3, "v_bits": 4}, {"layout": "turboquant", "k_bits": 2, "v_bits": 2},
         {"layout": "dense"}]


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_layers_over_mixed_caches_equal_the_ops(batch):
    """decode_layers over a stack mixing dense, 4-bit and 8-bit caches (groups of 16, 32, 64)
    and TurboQuant ones (3/4 and 2/2 bits: coded and rotated in C on both paths) gives the
    op-by-op layers' outputs and leaves the same cache bytes, to the last bit,
    step after step: in place while there is room, appended lazily where the step crosses
    the capacity (256 -> 512 columns) and where its column was exported; a pinned export
    makes those lazy writes move the buffer, and the next in-place writes must follow it.
    batch 3 is left-padded (starts 0, 5, 17)."""
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.kernels.cpu import kv_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(batch)
    hidden, heads, kv_heads, dim, inter = 256, 4, 2, 64, 384
    layers = [_layer_weights(rng, hidden, heads, kv_heads, dim, inter) for _ in STACK]
    attrs = layers[0][2]
    plan = [{"index": i, "kv": spec} for i, spec in enumerate(STACK)]
    fast, ops = make_caches(plan, batch, kv_heads, dim), make_caches(plan, batch, kv_heads, dim)
    starts = np.array([0, 5, 17][:batch])
    prompt = 252
    for i in range(len(STACK)):
        k = mx.array(rng.standard_normal((batch, kv_heads, prompt, dim)).astype(np.float32))
        v = mx.array(rng.standard_normal((batch, kv_heads, prompt, dim)).astype(np.float32))
        fast[i].append(k, v)
        ops[i].append(k, v)
    pinned = []
    lazy_steps = []
    for step in range(10):
        if step == 6:  # export the first whole blocks and keep them (a prefix cache would), then rewind
            for caches in (fast, ops):
                for c in caches:
                    pinned.append(c.export_blocks(16))
                    c.trim(4)
        held = fast[0].held
        x = (rng.standard_normal((batch, 1, hidden)) * 3).astype(np.float32)
        ang = rng.uniform(0, 6.3, (batch, 1, 1, dim)).astype(np.float32)
        cos, sin = np.cos(ang), np.sin(ang)
        mask = attention_mask(mx.array(starts, dtype=mx.int32), held, 1, batch > 1)
        lazy_steps.append([not c.host_writable() for c in fast])
        out = cpu_ops.decode_layers(x, cos, sin, mask, fast, [w for w, _, _ in layers], **attrs)
        assert out is not None, step
        ref = x
        for (_, ops_layer, _), c in zip(layers, ops):
            ref = ops_layer(ref, cos, sin, mask, c)
        assert np.array_equal(out, np.asarray(ref)), step
        kv_decode.settle()
        for a, b in zip(fast, ops):
            assert a.held == b.held == held + 1
            for w in ("k", "v"):
                for name, buf in a.parts(w).items():
                    assert np.array_equal(np.asarray(buf.view(mx.uint16) if buf.dtype == mx.bfloat16 else buf),
                                          np.asarray(b.parts(w)[name].view(mx.uint16) if buf.dtype == mx.bfloat16
                                                     else b.parts(w)[name])), (step, w, name)
    # lazily where the 257th token needs a bigger buffer and while rewound below the export
    assert [any(s) for s in lazy_steps] == [False, False, False, False, True, False, True, True, False, False]
    assert all(all(s) == any(s) for s in lazy_steps)  # every layout takes the same decisions


@pytest.mark.parametrize("kv_bits", [4, 8])
def test_quantized_kv_artifact_decodes_through_the_one_call_path(tiny_checkpoint, tmp_path, kv_bits, monkeypatch):
    """A compiled model with a quantized KV plan (--kv-bits 4: 4-bit layers and an 8-bit last
    layer; --kv-bits 8: 8-bit layers and a dense last layer) decodes through decode_layers
    in every step, with the op-by-op logits to the last bit, for one sequence and for a
    left-padded batch of three."""
    import vlmc
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.kernels.cpu import decode_layer
    from vlmc.runtime.sampling import Sampler, SamplingParams
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    art = vlmc.compile(tiny_checkpoint, tmp_path / "a", target="cpu", quantize="q4", kv_bits=kv_bits)
    import json
    plan = json.loads((art / "manifest.json").read_text())["kv_plan"]["text_layer"]
    assert all(decode_layer.supports_kv(layer["kv"]) for layer in plan)
    kinds = [layer["kv"]["layout"] + str(layer["kv"].get("bits", "")) for layer in plan]
    assert kinds == (["quantized4", "quantized8"] if kv_bits == 4 else ["quantized8", "dense"])
    ran, real = [], cpu_ops._decode_layers

    def counted(*a, **k):
        out = real(*a, **k)
        ran.append(out is not None)
        return out
    prompts = ["Describe a cat.", "A much longer question about shapes and colors?", "Hi"]
    for batch in (1, 3):
        outs = []
        for fast in (True, False):
            monkeypatch.setattr(cpu_ops, "_decode_layers", counted if fast else (lambda *a, **k: None))
            monkeypatch.setattr(cpu_ops, "_decode_layer", decode_layer.decode_layer if fast else (lambda *a, **k: None))
            m = vlmc.load(art)
            ps = [m.build_prompt(p) for p in prompts[:batch]]
            outs.append(np.stack([np.array(lg) for _, lg in m.generate_steps(ps, Sampler(SamplingParams()), 6)]))
        assert ran.count(True) == 5, ran  # every decode step (the first call is the prompt)
        ran.clear()
        assert np.array_equal(outs[0], outs[1])


def test_supported_kv_layouts_for_the_compiler():
    """What the lower pass reads to attach the fast path: dense layouts (sliding windows
    too), 4/8-bit affine ones and TurboQuant ones of 2-4 bits (head dims divisible by 8)."""
    from vlmc.ir.ops import fast_path_reads
    from vlmc.kernels.cpu.decode_layer import SUPPORTED_KV, supports_kv
    assert SUPPORTED_KV == {"dense": None, "rotating": None, "quantized": (4, 8), "turboquant": (2, 3, 4)}
    assert fast_path_reads("decode_layer", {"layout": "turboquant", "k_bits": 3, "v_bits": 4})
    assert supports_kv("dense") and supports_kv({"layout": "dense"})
    assert supports_kv({"layout": "quantized", "bits": 4, "group_size": 32}, head_dim=128)
    assert supports_kv({"layout": "quantized", "bits": 8, "group_size": 64})
    assert not supports_kv({"layout": "quantized", "bits": 4, "group_size": 64}, head_dim=48)
    assert not supports_kv({"layout": "quantized", "bits": 2, "group_size": 32})
    assert supports_kv({"layout": "turboquant", "k_bits": 3, "v_bits": 4}, head_dim=128)
    assert not supports_kv({"layout": "turboquant", "k_bits": 3, "v_bits": 4}, head_dim=36)
    assert not supports_kv({"layout": "turboquant", "k_bits": 5, "v_bits": 4})
    assert supports_kv({"layout": "rotating", "window": 4096}) and not supports_kv("paged")


def test_host_writable_covers_affine_layouts_with_the_dense_conditions():
    """Affine caches may be written in place under the same conditions as dense ones (room
    left, past every export); write_host itself stores dense floats only. A sliding window
    may be written so while its next append would drop nothing (make_room drops first)."""
    spec = {"layout": "quantized", "bits": 4, "group_size": 32}
    cache = cache_for(spec)
    assert not cache.host_writable()  # no buffer yet
    k, v = kv(16, 0)
    cache.append(k, v)
    assert cache.host_writable()
    assert not cache.write_host(np.ones((B, HKV, 1, D), np.float32), np.ones((B, HKV, 1, D), np.float32))
    cache.advance_host()
    assert cache.held == 17
    cache.export_blocks(8)
    cache.trim(2)
    assert not cache.host_writable()
    full = cache_for(spec)
    full.append(*kv(256, 1))
    assert full.capacity == 256 and not full.host_writable()
    window = make_caches([{"index": 0, "kv": {**spec, "window": 8}}], B, HKV, D)[0]
    window.append(k, v)
    assert window.host_writable()  # 16 held: within window - 1 + slack
    window.append(*kv(32, 2))
    assert window.held == 48 and not window.host_writable()  # the next append drops 41 first
    window.make_room()
    assert window.held == 7 and window.start == 41 and window.host_writable()


# ---------------------------------------------------------------- several tokens per sequence (verify)

def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("layout", ["dense", "dense_rows", "affine4", "affine8", "affine4g32", "turbo3.5"])
@pytest.mark.parametrize("heads,dim", [(4, 64), (14, 48), (4, 24)])
def test_kv_kernels_take_several_query_tokens_exactly(layout, heads, dim):
    """T query tokens per sequence through one call of the KV decode kernels (q [B, H, T,
    D]): token t sees the held keys and this step's tokens 0..t, and its row is, bit for
    bit, what the one-token kernel gives at its place (the cache holding the tokens before
    it). Rows cross the drivers' 128-row blocks, sequences are left-padded (one sees only
    this step's tokens, one from its last token on), 7 heads per KV head take two passes,
    D = 24 (affine: 48) takes the row-at-a-time driver; "dense_rows" passes this step's keys and values
    apart ([B, HKV, T, D], as decode_layer does). Against the MLX reference too."""
    from vlmc.kernels import cpu, kv_quant
    from vlmc.kernels.cpu.kv_decode import kv_affine_decode, kv_dense_decode, kv_turbo_decode
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    if layout.startswith("affine") and dim % 16:
        pytest.skip("affine KV groups are 16-128 wide (D = 48 takes the row-at-a-time driver for them)")
    gs = 32 if layout == "affine4g32" else 16  # 4-bit groups of 32 take the VNNI driver, of 16 the float one
    if dim % gs:
        pytest.skip("the group size does not divide the head dim")
    spec = {"dense": "dense", "dense_rows": "dense", "affine4": {"layout": "quantized", "bits": 4, "group_size": gs},
            "affine4g32": {"layout": "quantized", "bits": 4, "group_size": gs},
            "affine8": {"layout": "quantized", "bits": 8, "group_size": gs}, "turbo3.5": LAYOUTS["turbo3.5"][0]}[layout]
    rng = np.random.default_rng(heads * dim)
    batch = 3
    for before, T in [(120, 13), (1, 16), (250, 5), (128, 1)]:
        cache = cache_for(spec, batch=batch, dim=dim)
        k, v = kv(before + T, before + T, batch=batch, dim=dim)
        cache.append(k, v)
        q = mx.array(rng.standard_normal((batch, heads, T, dim)).astype(np.float32))
        starts = mx.array([0, before, before + T - 1], mx.int32)
        held, scale = before + T, dim ** -0.5
        bufs = cache.buffers

        def run(qq, n, extra=None):
            if layout.startswith("dense"):
                return kv_dense_decode(qq, bufs["k"]["x"], bufs["v"]["x"], starts, n, scale=scale,
                                       **({} if extra is None else dict(new_k=extra[0], new_v=extra[1])))
            if layout.startswith("affine"):
                kb, vb, c = bufs["k"], bufs["v"], cache.codecs["k"]
                return kv_affine_decode(qq, kb["codes"], kb["scales"], kb["biases"], vb["codes"], vb["scales"],
                                        vb["biases"], starts, n, scale=scale, bits=c.bits, group_size=c.group_size)
            kc, vc, kb, vb = cache.codecs["k"], cache.codecs["v"], bufs["k"], bufs["v"]
            return kv_turbo_decode(qq, kb["codes"], kb["norms"], vb["codes"], vb["norms"], kc.codebook, vc.codebook,
                                   starts, n, scale=scale, k_bits=kc.bits, v_bits=vc.bits)
        rows = layout == "dense_rows"
        new = (np.asarray(k[:, :, before:]), np.asarray(v[:, :, before:])) if rows else None
        out = run(q, held, new)
        assert out.shape == (batch, heads, T, dim)
        for t in range(T):
            one = run(q[:, :, t], before + t + 1, None if not rows else (new[0][:, :, t], new[1][:, :, t]))
            assert np.array_equal(_bits(out[:, :, t]), _bits(one)), (before, T, t)
        assert not np.any(np.asarray(out)[2, :, :T - 1])  # tokens before a sequence's start see nothing
        if layout == "dense":  # (the reference's rows that see nothing are not zeros)
            r = kv_quant.kv_dense_decode(q, bufs["k"]["x"], bufs["v"]["x"], starts, held, scale=scale)
            assert float(mx.abs(mx.array(out)[:2] - r[:2]).max()) <= 1e-5 * float(mx.abs(r[:2]).max())


def _verify_round(rng, batch, T, hidden, starts, held, fast, seq, layers, attrs):
    """T tokens per sequence through decode_layers in one call (caches ``fast``) and through
    T one-token calls (``seq``): the outputs row for row and the caches, bit for bit."""
    from vlmc.kernels import cpu_ops
    from vlmc.kernels.cpu import kv_decode
    x = (rng.standard_normal((batch, T, hidden)) * 3).astype(np.float32)
    ang = rng.uniform(0, 6.3, (batch, 1, T, attrs["head_dim"])).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    mask = attention_mask(mx.array(starts, dtype=mx.int32), held, T, batch > 1)
    weights = [w for w, _, _ in layers]
    out = cpu_ops.decode_layers(x, cos, sin, mask, fast, weights, **attrs)
    assert out is not None and out.shape == (batch, T, hidden)
    for t in range(T):
        m1 = attention_mask(mx.array(starts, dtype=mx.int32), held + t, 1, batch > 1)
        one = cpu_ops.decode_layers(np.ascontiguousarray(x[:, t:t + 1]), np.ascontiguousarray(cos[:, :, t:t + 1]),
                                    np.ascontiguousarray(sin[:, :, t:t + 1]), m1, seq, weights, **attrs)
        assert one is not None
        assert np.array_equal(_bits(out[:, t]), _bits(one[:, 0])), (T, t)
    kv_decode.settle()
    for a, b in zip(fast, seq):
        assert a.held == b.held == held + T
        for w in ("k", "v"):
            for name, buf in a.parts(w).items():
                other = b.parts(w)[name]
                if buf.dtype == mx.bfloat16:
                    buf, other = buf.view(mx.uint16), other.view(mx.uint16)
                assert np.array_equal(np.asarray(buf), np.asarray(other)), (T, w, name)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_layers_with_several_tokens_equal_one_token_steps(batch):
    """decode_layers with T tokens per sequence (x [B, T, hidden], B T <= 16: the verify
    step of speculative decoding) over a stack mixing dense, 4-bit and 8-bit caches: each
    layer's output row t and every cache byte equal T one-token calls one after another, to
    the last bit, round after round: in place while T columns are free, appended lazily
    where the tokens cross the capacity (256 columns) or an exported block; batch 3 is
    left-padded (starts 0, 5, 17). That equality is what makes speculation lossless."""
    from vlmc.kernels import cpu
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(10 + batch)
    hidden, heads, kv_heads, dim, inter = 256, 4, 2, 64, 384
    layers = [_layer_weights(rng, hidden, heads, kv_heads, dim, inter) for _ in STACK]
    attrs = layers[0][2]
    plan = [{"index": i, "kv": spec} for i, spec in enumerate(STACK)]
    fast, seq = make_caches(plan, batch, kv_heads, dim), make_caches(plan, batch, kv_heads, dim)
    starts = np.array([0, 5, 17][:batch])
    for caches in (fast, seq):
        for c in caches:
            k = mx.array(rng.standard_normal((batch, kv_heads, 240, dim)).astype(np.float32))
            c.append(k, k * 0.5)
    for c, d in zip(fast, seq):  # the same prompt in both
        for w in ("k", "v"):
            for name in c.buffers[w]:
                d.buffers[w][name] = mx.array(c.buffers[w][name])
    pinned, lazy_rounds = [], []
    tokens = [4, 16 // batch, 1, 5, 3, 16 // batch, 2, 16 // batch]  # crosses 256 columns on the way
    for r, T in enumerate(tokens):
        if r == 5:  # export whole blocks (as a prefix cache does) and rewind below them
            for caches in (fast, seq):
                for c in caches:
                    pinned.append(c.export_blocks(16))
                    c.trim(c.held % 16 + 3)
        lazy = [not (c.host_writable() and c.held + T <= c.capacity) for c in fast]
        assert len(set(lazy)) == 1  # every layout decides alike
        lazy_rounds.append(lazy[0] and r < 5)
        if r == 5:
            assert lazy[0]  # below the exported columns
        _verify_round(rng, batch, T, hidden, starts, fast[0].held, fast, seq, layers, attrs)
    assert any(lazy_rounds)  # the round that needed a bigger buffer


@pytest.mark.parametrize("path", ["one_call", "ops"])
@pytest.mark.parametrize("kv", [{}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}],
                         ids=["dense", "kv4", "turbo3.5"])
def test_verify_entry_point_equals_decode_steps(tiny_checkpoint, tmp_path, kv, path, monkeypatch):
    """A compiled q4 model's ``verify`` entry point (ids [B, n] -> logits [B, n, V], as
    speculative decoding calls it) gives, bit for bit, the logits of n ``decode`` steps one
    after another, and leaves the same caches (the next decode step's logits agree): through
    decode_layers in one call (dense, 4/8-bit and TurboQuant caches), and op by op (the
    GEMVs' rows and the KV kernels' query tokens are exact). One sequence and a left-padded
    batch of three."""
    import vlmc
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.runtime.step import Sequences
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    art = vlmc.compile(tiny_checkpoint, tmp_path / "a", target="cpu", quantize="q4", **kv)
    m = vlmc.load(art)
    ran, real = [], cpu_ops._decode_layers

    def counted(x, *a, **k):
        out = real(x, *a, **k) if path == "one_call" else None
        ran.append((x.shape[1], out is not None))
        return out
    monkeypatch.setattr(cpu_ops, "_decode_layers", counted)
    if path == "ops":
        monkeypatch.setattr(cpu_ops, "_decode_layer", lambda *a, **k: None)
    prompts = ["Describe a cat.", "A much longer question about shapes and colors?", "Hi"]
    rng = np.random.default_rng(0)
    for batch, n in ((1, 6), (3, 4)):
        ps = [m.prompt_inputs(m.build_prompt(p)) for p in prompts[:batch]]
        draft = mx.array(rng.integers(0, 200, (batch, n)), mx.int32)
        one = Sequences.start(m.decoder, ps)
        one.prefill()
        steps = [np.array(one.decode(draft[:, i])) for i in range(n)]
        after = np.array(one.decode(draft[:, 0]))
        ran.clear()
        many = Sequences.start(m.decoder, ps)
        many.prefill()
        out = np.array(many.verify(draft))
        assert ((n, True) in ran) == (path == "one_call"), ran
        for i in range(n):
            assert np.array_equal(out[:, i].view(np.uint32), steps[i].view(np.uint32)), (batch, i)
        assert np.array_equal(np.array(many.decode(draft[:, 0])).view(np.uint32), after.view(np.uint32))


def test_decode_layers_refuses_a_cache_given_for_two_layers():
    """The one-call path writes each layer's keys at its cache's end before any cache
    advances, so one cache object passed for two layers would get both layers' keys in one
    column (the ops append them one after the other): it returns None and stores nothing."""
    from vlmc.kernels import cpu, cpu_ops
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(3)
    hidden, heads, kv_heads, dim, inter = 128, 2, 1, 64, 192
    layers = [_layer_weights(rng, hidden, heads, kv_heads, dim, inter) for _ in range(2)]
    cache = make_caches([{"index": 0, "kv": "dense"}], 1, kv_heads, dim)[0]
    cache.append(mx.zeros((1, kv_heads, 3, dim)), mx.zeros((1, kv_heads, 3, dim)))
    x = rng.standard_normal((1, 2, hidden)).astype(np.float32)
    cos = np.ones((1, 1, 2, dim), np.float32)
    assert cpu_ops.decode_layers(x, cos, cos, None, [cache, cache], [w for w, _, _ in layers], **layers[0][2]) is None
    assert cache.held == 3
    other = make_caches([{"index": 0, "kv": "dense"}], 1, kv_heads, dim)[0]
    other.append(mx.zeros((1, kv_heads, 3, dim)), mx.zeros((1, kv_heads, 3, dim)))
    assert cpu_ops.decode_layers(x, cos, cos, None, [cache, other], [w for w, _, _ in layers], **layers[0][2]) is not None
    assert cache.held == other.held == 5
