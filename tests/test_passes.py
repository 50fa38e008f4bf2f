"""Optimization passes: each one must visibly change the artifact and keep what it computes."""
from __future__ import annotations

import json

import numpy as np
import pytest

import vlmc
from fixtures.checkpoints import build_checkpoint, make_test_image
from vlmc.compiler import compile
from vlmc.errors import VlmcError
from vlmc.quality import compare
from vlmc.runtime.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for fam, variant in (("qwen2_vl", "default"), ("qwen2_5_vl", "default"), ("llava", "clip")):
        out[fam] = root / fam
        build_checkpoint(out[fam], fam, variant=variant)
    return out


def _manifest(art):
    return json.loads((art / "manifest.json").read_text())


def _trace(model, steps=12, image=True):
    images = [make_test_image(90, 70, 5)] if image else []
    p = model.build_prompt("Describe this.", images=images)
    toks, logits = [], []
    for t, l in model.generate_steps([p], Sampler(SamplingParams()), steps):
        toks.append(int(t[0].item()))
        logits.append(np.array(l[0]))
    return toks, np.stack(logits)


def _text_block(art) -> str:
    src = (art / "model.py").read_text()
    body = src[src.index("def text_layer"):]
    return body[:body.index("\n    def ", 10)]


def _text_block_linears(art) -> list[str]:
    return [line for line in _text_block(art).splitlines() if "ops.linear(" in line or "ops.qlinear(" in line]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_fusion_really_fuses_and_keeps_the_tokens(ckpts, tmp_path, family):
    fused = compile(ckpts[family], tmp_path / "fused", fuse=["add_norm"])
    plain = compile(ckpts[family], tmp_path / "plain", no_fuse=["qkv", "gate_up", "add_norm"])
    # one qkv matmul and one gate/up matmul per layer instead of five separate ones
    assert len(_text_block_linears(fused)) == 4
    assert len(_text_block_linears(plain)) == 7
    assert "q_proj+k_proj+v_proj" in (fused / "model.py").read_text()
    assert _manifest(fused)["meta"]["fusions"]["qkv"] >= 2
    # the residual add and post-attention norm of every text layer: one op, no separate norm
    text_layer = _text_block(fused)
    assert text_layer.count("ops.add_rms_norm(") == 1 and text_layer.count("ops.rms_norm(") == 1
    assert _text_block(plain).count("ops.add_rms_norm(") == 0
    # 2 text layers; Qwen2.5-VL's 4 vision layers use RMSNorm too (the others LayerNorm)
    assert _manifest(fused)["meta"]["fusions"]["add_norm"] == {"qwen2_5_vl": 6}.get(family, 2)
    t1, l1 = _trace(vlmc.load(fused))
    t2, l2 = _trace(vlmc.load(plain))
    assert t1 == t2
    assert np.abs(l1 - l2).max() < 1e-4


def test_each_fusion_switches_off_alone(ckpts, tmp_path):
    only_qkv = compile(ckpts["qwen2_vl"], tmp_path / "a", no_fuse=["gate_up", "add_norm"])
    src = (only_qkv / "model.py").read_text()
    assert "q_proj+k_proj+v_proj" in src and "gate_proj+up_proj" not in src and "add_rms_norm" not in src
    assert len(_text_block_linears(only_qkv)) == 5
    only_norm = compile(ckpts["qwen2_vl"], tmp_path / "b", no_fuse=["gate_up", "qkv"], fuse=["add_norm"])
    assert "add_rms_norm" not in (compile(ckpts["qwen2_vl"], tmp_path / "c") / "model.py").read_text()  # opt-in
    src = (only_norm / "model.py").read_text()
    assert "add_rms_norm" in src and "+" not in "".join(_text_block_linears(only_norm))
    # the decode_layer fast path needs the plain fused layer: none for these bodies
    assert not any("decode_layer" in (a / "model.py").read_text() for a in (only_qkv, only_norm))
    # and lower says why, naming the block and where its data flow leaves the pattern
    notes = {a: next(p["summary"] for p in _manifest(a)["passes"] if p["name"] == "lower") for a in (only_qkv, only_norm)}
    assert "no decode_layer fast path for text_layer: " in notes[only_qkv] and "where the pattern has" in notes[only_qkv]
    assert "no decode_layer fast path for text_layer: " in notes[only_norm]
    assert "vision_layer" not in notes[only_qkv]  # blocks without a KV cache are not decoder layers


@pytest.mark.parametrize("family,quantize", [("qwen2_vl", "q4"), ("qwen2_5_vl", None), ("llava", "q8"),
                                             ("qwen2_vl", "q6")])
def test_decode_layer_fast_path(ckpts, tmp_path, family, quantize, monkeypatch):
    """The cpu target's decode_layer lowering: every text layer gets one guarded fast-path
    call and the loop over the text layers one guarded call for the whole stack
    (decode_layers; no vision layer, no GPU target, off with --no-fuse decode_layer). The
    stack call really runs in every decode step, and where it declines the per-layer call
    runs in every layer (the first layer's input is the embedding: a host array from a
    quantized table, else an mx.array); both give
    the op-by-op logits to the last bit, for one sequence with an image and for a
    left-padded batch of two (a mask, starts > 0)."""
    from vlmc.kernels import cpu, cpu_ops
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    kw = {"quantize": quantize} if quantize else {}
    fast = compile(ckpts[family], tmp_path / "fast", target="cpu", **kw)
    plain = compile(ckpts[family], tmp_path / "plain", target="cpu", no_fuse=["decode_layer"], **kw)
    src = (fast / "model.py").read_text()
    assert _text_block(fast).count("fast = ops.decode_layer(") == 1 and src.count("ops.decode_layer(") == 1
    assert src.count("= ops.decode_layers(") == 3  # before the loops of prefill, decode and verify
    assert "decode_layer" not in (plain / "model.py").read_text()
    layers = len(vlmc.load(fast).model.text_layer_params)
    assert _manifest(fast)["meta"]["fusions"]["decode_layer"] == layers  # every text layer
    assert "decode_layer" not in (compile(ckpts[family], tmp_path / "metal", target="metal") / "model.py").read_text()
    per_layer, stack = [], []
    real, real_stack = cpu_ops._decode_layer, cpu_ops._decode_layers
    monkeypatch.setattr(cpu_ops, "_decode_layer", lambda *a, **k: _count(per_layer, real, *a, **k))
    monkeypatch.setattr(cpu_ops, "_decode_layers", lambda *a, **k: _count(stack, real_stack, *a, **k))
    t_fast, l_fast = _trace(vlmc.load(fast), steps=8)
    assert stack.count(True) == 7 and per_layer.count(True) == 0  # 7 decode steps, all in the stack call
    t_plain, l_plain = _trace(vlmc.load(plain), steps=8)
    assert t_fast == t_plain and np.array_equal(l_fast, l_plain)
    monkeypatch.setattr(cpu_ops, "_decode_layers", lambda *a, **k: None)  # the stack call declines
    t_layer, l_layer = _trace(vlmc.load(fast), steps=8)
    assert per_layer.count(True) == 7 * layers  # 7 decode steps x every layer
    assert t_layer == t_plain and np.array_equal(l_layer, l_plain)
    monkeypatch.setattr(cpu_ops, "_decode_layers", lambda *a, **k: _count(stack, real_stack, *a, **k))
    outs = []
    for art in (fast, plain):
        m = vlmc.load(art)
        prompts = [m.build_prompt("Describe a cat."), m.build_prompt("A much longer question about shapes and colors?")]
        outs.append(np.stack([np.array(lg) for _, lg in m.generate_steps(prompts, Sampler(SamplingParams()), 6)]))
    assert stack.count(True) > 7  # the batched steps took the fast path too
    assert np.array_equal(outs[0], outs[1])


def _count(ran, real, *a, **k):
    out = real(*a, **k)
    ran.append(out is not None)
    return out


def test_decode_layer_falls_back_to_the_ops(ckpts, tmp_path):
    """Where the one-call path does not apply it returns None and the layer's ops run:
    several tokens in one layer's call (the stack call takes them), a 3-bit KV cache (it reads
    dense caches, sliding windows too, 4-bit and 8-bit ones and TurboQuant codes), more rows
    than the GEMV kernels take, one cache given for two layers. (An mx.array input applies: its norm
    is then MLX's, as in the ops.)"""
    import mlx.core as mx
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.runtime import kv_codecs
    from vlmc.runtime.kv_cache import KVCache, RotatingKVCache
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    art = compile(ckpts["qwen2_vl"], tmp_path / "a", target="cpu")
    m = vlmc.load(art).model
    src = (art / "model.py").read_text()
    line = next(ln for ln in src.splitlines() if "fast = ops.decode_layer(" in ln)
    p = m.text_layer_params[1]
    call = eval("lambda ops, p, x, cos, sin, mask, cache: " + line.split("=", 1)[1].strip())  # the generated call
    hkv, d = [int(line.split(f"{k}=")[1].split(",")[0]) for k in ("kv_heads", "head_dim")]
    hidden = m.params["text.norm.weight"].shape[0]
    cos = mx.ones((1, 1, 1, d))

    def cache_with(c):
        c.append(mx.zeros((c.batch, hkv, 3, d)), mx.zeros((c.batch, hkv, 3, d)))
        return c

    x = np.random.default_rng(0).normal(size=(1, 1, hidden)).astype(np.float32)
    assert call(cpu_ops, p, x, cos, cos, None, cache_with(KVCache(1, hkv, d))) is not None
    host = call(cpu_ops, p, x, cos, cos, None, cache_with(KVCache(1, hkv, d)))
    from_mx = call(cpu_ops, p, mx.array(x), cos, cos, None, cache_with(KVCache(1, hkv, d)))
    assert from_mx is not None and np.allclose(from_mx, host, rtol=1e-5, atol=1e-5)
    x3 = np.ones((1, 3, hidden), np.float32)
    assert call(cpu_ops, p, x3, mx.ones((1, 1, 3, d)), mx.ones((1, 1, 3, d)), None,
                cache_with(KVCache(1, hkv, d))) is None
    assert call(cpu_ops, p, x, cos, cos, None, cache_with(RotatingKVCache(1, hkv, d, window=8))) is not None
    kv3 = KVCache(1, hkv, d, k_codec=kv_codecs.Affine(3, d), v_codec=kv_codecs.Affine(3, d))
    assert call(cpu_ops, p, x, cos, cos, None, cache_with(kv3)) is None
    turbo = KVCache(1, hkv, d, k_codec=kv_codecs.Turbo(3, d), v_codec=kv_codecs.Turbo(4, d))
    assert call(cpu_ops, p, x, cos, cos, None, cache_with(turbo)) is not None
    kv4 = KVCache(1, hkv, d, k_codec=kv_codecs.Affine(4, d), v_codec=kv_codecs.Affine(4, d))
    assert call(cpu_ops, p, x, cos, cos, None, cache_with(kv4)) is not None
    x17 = np.ones((17, 1, hidden), np.float32)
    assert call(cpu_ops, p, x17, cos, cos, None, cache_with(KVCache(17, hkv, d))) is None
    # the stack call is all or nothing: one cache it cannot use and no layer runs or stores
    line = [ln for ln in src.splitlines() if "= ops.decode_layers(" in ln][-1]  # decode's
    call_src = line.split("=", 1)[1].strip()
    names = ", ".join(a.strip() for a in call_src.split("(", 1)[1].split(",")[:4])  # x, cos, sin, mask
    stack = eval(f"lambda ops, self, {names}, caches: " + call_src)
    layers = len(m.text_layer_params)
    caches = [cache_with(KVCache(1, hkv, d)) for _ in range(layers)]
    out = stack(cpu_ops, m, x, cos, cos, None, caches)
    assert out is not None and [c.held for c in caches] == [4] * layers
    # keys/values written in place by the kernel equal the lazy MLX writes where that is not safe
    lazy = [cache_with(KVCache(1, hkv, d)) for _ in range(layers)]
    for c in lazy[1:]:
        c.exported = c.held + 1  # as if its next column had been exported: no in-place write
    assert np.array_equal(stack(cpu_ops, m, x, cos, cos, None, lazy), out)
    for a, b in zip(caches, lazy):
        assert np.array_equal(np.asarray(a.buffers["k"]["x"][:, :, :4]), np.asarray(b.buffers["k"]["x"][:, :, :4]))
        assert np.array_equal(np.asarray(a.buffers["v"]["x"][:, :, :4]), np.asarray(b.buffers["v"]["x"][:, :, :4]))
        assert np.abs(np.asarray(a.buffers["v"]["x"][:, :, 3])).max() > 0
    caches[-1] = cache_with(KVCache(1, hkv, d, k_codec=kv_codecs.Affine(3, d), v_codec=kv_codecs.Affine(3, d)))
    assert stack(cpu_ops, m, x, cos, cos, None, caches) is None
    assert [c.held for c in caches] == [4] * (layers - 1) + [3]
    # several tokens per sequence take the stack call (verify steps) up to 16 rows in all; more decline
    x17 = np.ones((1, 17, hidden), np.float32)
    fresh = [cache_with(KVCache(1, hkv, d)) for _ in range(layers)]
    assert stack(cpu_ops, m, x17, mx.ones((1, 1, 17, d)), mx.ones((1, 1, 17, d)), None, fresh) is None
    assert [c.held for c in fresh] == [3] * layers
    assert stack(cpu_ops, m, x3, mx.ones((1, 1, 3, d)), mx.ones((1, 1, 3, d)), None, caches[:-1] + [caches[0]]) is None


@pytest.mark.parametrize("scheme,bits", [("q4", 4), ("q8", 8), ("q3", 3)])
def test_quantized_artifact_stores_packed_codes(ckpts, tmp_path, scheme, bits):
    art = compile(ckpts["qwen2_vl"], tmp_path / scheme, quantize=scheme, head="none")
    m = _manifest(art)
    q = m["quantized"]
    name = "text.layers.0.mlp.down_proj.weight"
    assert q[name]["bits"] == bits and q[name]["mode"] == "affine"
    n, k = (64, 128)
    assert m["tensors"][name] == {**m["tensors"][name], "dtype": "uint32", "shape": [n, k * bits // 32]}
    assert m["tensors"][name + ".scales"]["shape"] == [n, k // 64]
    assert "text.embed_tokens.weight" not in q  # head="none"
    assert q[name]["rel_error"] < {8: 0.01, 4: 0.15, 3: 0.3}[bits]
    # a weight whose input dim does not split into groups stays float and is reported
    assert any("patch_embed" in k for k in m["meta"]["quantization"]["kept_float"])
    tokens, logits = _trace(vlmc.load(art), steps=4)
    assert np.isfinite(logits).all()


def test_cpu_artifacts_store_affine_parameters_as_bfloat16(ckpts, tmp_path):
    """On the cpu target the scales and biases of affine codes of up to 4 bits default to
    bfloat16 (the kernels read them natively; a tenth fewer bytes at 4 bits), except an
    embedding table's; --quant-params float32 keeps them float32, and other targets keep the weights'
    dtype."""
    auto = compile(ckpts["qwen2_5_vl"], tmp_path / "auto", quantize="q4", target="cpu")
    f32 = compile(ckpts["qwen2_5_vl"], tmp_path / "f32", quantize="q4", target="cpu", quant_params="float32")
    metal = _manifest(compile(ckpts["qwen2_5_vl"], tmp_path / "metal", quantize="q4", target="metal"))
    ma, mf = _manifest(auto), _manifest(f32)
    name = "text.layers.0.mlp.down_proj.weight"
    for suffix in (".scales", ".biases"):
        assert ma["tensors"][name + suffix]["dtype"] == "bfloat16"
        assert mf["tensors"][name + suffix]["dtype"] == metal["tensors"][name + suffix]["dtype"] == "float32"
        assert ma["tensors"]["text.embed_tokens.weight" + suffix]["dtype"] == "float32"
    assert ma["quantized"][name]["param_dtype"] == "bfloat16" and mf["quantized"][name]["param_dtype"] == "float32"
    assert ma["param_bytes"] < mf["param_bytes"]
    for k, q in mf["quantized"].items():  # the codes are re-chosen for the rounded parameters
        assert ma["quantized"][k]["rel_error"] <= q["rel_error"] * 1.02 + 1e-6, k
    # against float32 weights the bfloat16 parameters add little to what 4-bit codes cost
    ref = vlmc.load(compile(ckpts["qwen2_5_vl"], tmp_path / "float", target="cpu"))
    kl_f32, kl_auto = (compare(ref, vlmc.load(a), steps=16).mean_kl for a in (f32, auto))
    assert kl_auto <= 1.1 * kl_f32
    # auto rounds them only under codes of up to 4 bits (8-bit codes lose +1.3%); asked, any
    q8_auto = _manifest(compile(ckpts["qwen2_5_vl"], tmp_path / "q8", quantize="q8", target="cpu"))
    q8_bf16 = _manifest(compile(ckpts["qwen2_5_vl"], tmp_path / "q8b", quantize="q8", target="cpu",
                                quant_params="bfloat16"))
    assert q8_auto["tensors"][name + ".scales"]["dtype"] == "float32"
    assert q8_bf16["tensors"][name + ".scales"]["dtype"] == "bfloat16"
    with pytest.raises(VlmcError, match="--quant-params"):
        compile(ckpts["qwen2_5_vl"], tmp_path / "bad", quantize="q4", quant_params="int8")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_codes_are_nearest_for_the_stored_parameters(bits):
    """With scales and biases stored in bf16, every code is re-chosen as the nearest for the
    rounded parameters (pack_codes writes MLX's bit stream: it repacks mx.quantize's own
    codes to the same words), which beats rounding only the parameters, by 46% of the error
    at 8 bits."""
    import mlx.core as mx
    from vlmc.backends import quantize as quant
    rng = np.random.default_rng(bits)
    w = mx.array((rng.standard_normal((130, 256)) * 0.02).astype(np.float32))
    codes, s, b = mx.quantize(w, group_size=64, bits=bits)
    unit = mx.ones_like(s)
    raw = np.asarray(mx.dequantize(codes, unit, mx.zeros_like(s), group_size=64, bits=bits)).astype(np.uint32)
    assert np.array_equal(quant.pack_codes(raw, bits), np.asarray(codes))
    q = quant.quantize_array(w, bits=bits, group_size=64, mode="affine", param_dtype=mx.bfloat16)
    assert q.scales.dtype == mx.bfloat16 and q.biases.dtype == mx.bfloat16
    f32 = mx.float32  # the CPU kernels compute s * q + b in float32 from the stored bf16 parameters
    deq = np.asarray(mx.dequantize(q.weight, q.scales.astype(f32), q.biases.astype(f32), group_size=64, bits=bits))
    S = np.repeat(np.asarray(q.scales.astype(mx.float32)), 64, axis=1)
    B = np.repeat(np.asarray(q.biases.astype(mx.float32)), 64, axis=1)
    code = np.rint((deq - B) / S)
    for step in (-1, 1):  # no neighbouring code (inside the range) is nearer
        inside = (code + step >= 0) & (code + step <= 2 ** bits - 1)
        alt = (code + step) * S + B
        worse = np.abs(deq - np.asarray(w)) - np.abs(alt - np.asarray(w))
        assert np.all(worse[inside] <= 1e-6 * np.abs(S[inside])), (bits, step, worse[inside].max())
    from vlmc.kernels import cpu
    if cpu.available():  # the C codes (used here) and the MLX fallback's, bit for bit
        assert mx.array_equal(q.weight, quant._nearest_codes_mlx(w, q.scales, q.biases, bits, 64))
    naive = np.asarray(mx.dequantize(codes, s.astype(mx.bfloat16).astype(f32), b.astype(mx.bfloat16).astype(f32),
                                     group_size=64, bits=bits))
    err = lambda d: float(np.linalg.norm(d - np.asarray(w)))
    assert err(deq) <= err(naive)
    if bits == 8:
        assert err(deq) < 0.8 * err(naive)


@pytest.mark.parametrize("bits,gain", [(2, 0.15), (3, 0.1), (4, 0.06)])
def test_searched_ranges_beat_min_max(bits, gain):
    """Affine widths up to 4 bits search each group's range: no group's squared error above
    its min/max quantization's (min/max is the first candidate), the whole weight's relative
    error lower by ``gain`` on Student-t rows (heavy tails, as trained weights have), and the
    C kernels and the MLX fallback equally good."""
    import mlx.core as mx
    from vlmc.backends import quantize as quant
    from vlmc.kernels import cpu
    rng = np.random.default_rng(bits)
    w = mx.array((rng.standard_t(4, (300, 512)) * 0.02).astype(np.float32))
    g = np.asarray(w).reshape(300, 8, 64)

    def group_sse(q):
        d = np.asarray(mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=bits)).reshape(300, 8, 64)
        return ((d - g) ** 2).sum(-1)
    codes, s, b = mx.quantize(w, group_size=64, bits=bits)
    minmax = quant.QuantWeight(codes, s, b, bits, 64, "affine")
    searched = quant.quantize_array(w, bits=bits, group_size=64, mode="affine")
    e0, e1 = group_sse(minmax), group_sse(searched)
    assert np.all(e1 <= e0 * (1 + 1e-5) + 1e-12)
    assert np.sqrt(e1.sum() / e0.sum()) < 1 - gain
    if cpu.available():
        s_mlx, b_mlx = quant._searched_params_mlx(w, bits, 64, s, b)
        fallback = quant.QuantWeight(quant.nearest_codes(w, s_mlx, b_mlx, bits, 64), s_mlx, b_mlx, bits, 64, "affine")
        assert abs(group_sse(fallback).sum() / e1.sum() - 1) < 1e-3


def test_microscaling_schemes_run(ckpts, tmp_path):
    for scheme in ("mxfp4", "mxfp8", "nvfp4"):
        art = compile(ckpts["qwen2_vl"], tmp_path / scheme, quantize=scheme, head="none", target="metal")
        m = _manifest(art)
        assert {q["mode"] for q in m["quantized"].values()} == {scheme}
        assert m["tensors"]["text.layers.0.mlp.down_proj.weight"]["dtype"] == "uint32"
        assert np.isfinite(_trace(vlmc.load(art), steps=3, image=False)[1]).all()


def test_microscaling_on_the_cpu_target_warns_that_it_is_slow(ckpts, tmp_path):
    """mxfp4/mxfp8/nvfp4 weights (or head) compiled for the cpu target run on MLX's own
    quantized matmul there: the compile says so and still writes a working artifact."""
    import warnings
    from vlmc.errors import PerformanceWarning
    with pytest.warns(PerformanceWarning, match="mxfp4/mxfp8 weights on the cpu target.*-q q4 or q8"):
        art = compile(ckpts["qwen2_vl"], tmp_path / "mx", quantize="mxfp4", target="cpu")  # head: mxfp8 (auto)
    assert np.isfinite(_trace(vlmc.load(art), steps=2, image=False)[1]).all()
    with pytest.warns(PerformanceWarning, match="nvfp4 weights"):
        compile(ckpts["qwen2_vl"], tmp_path / "h", quantize="q4", head="nvfp4", target="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerformanceWarning)
        compile(ckpts["qwen2_vl"], tmp_path / "q4", quantize="q4", target="cpu")
        compile(ckpts["qwen2_vl"], tmp_path / "gpu", quantize="mxfp4", target="metal")
    import subprocess
    import sys
    cli = subprocess.run([sys.executable, "-m", "vlmc.cli", "compile", str(ckpts["qwen2_vl"]), "-o",
                          str(tmp_path / "cli"), "-q", "nvfp4", "--target", "cpu"], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "warning: mxfp8/nvfp4 weights on the cpu target" in cli.stderr and "cli.py" not in cli.stderr


def test_quantized_activations_reach_every_quantized_linear_but_the_head(ckpts, tmp_path):
    weights = compile(ckpts["qwen2_vl"], tmp_path / "w", quantize="nvfp4", target="cuda")
    acts = compile(ckpts["qwen2_vl"], tmp_path / "wa", quantize="nvfp4", target="cuda", quantize_activations=True)
    block = _text_block(acts)
    assert block.count("ops.qqlinear(") == 4 and "ops.qlinear(" not in block  # qkv, o, gate_up, down
    assert "ops.qqlinear(" not in (weights / "model.py").read_text()
    m = _manifest(acts)
    assert m["meta"]["quantization"]["activations"] is True
    q = m["quantized"]
    assert q["text.layers.0.mlp.down_proj.weight"]["activations"] == "nvfp4"
    assert "activations" not in q["text.embed_tokens.weight"]  # the head (mxfp8) keeps float inputs
    assert any(k.startswith("vision.") and v.get("activations") for k, v in q.items())
    # the same weights; only the rounding of the inputs differs, and it shows in the logits
    assert {k: v["rel_error"] for k, v in q.items()} == \
        {k: v["rel_error"] for k, v in _manifest(weights)["quantized"].items()}
    _, lw = _trace(vlmc.load(weights), steps=3)
    _, la = _trace(vlmc.load(acts), steps=3)
    assert np.isfinite(la).all() and np.abs(la - lw).max() > 1e-3


def test_quantized_activations_need_a_block_format_and_the_cuda_target(ckpts, tmp_path):
    for kw in ({"quantize": "q4"}, {"quantize": "mxfp4"}, {}, {"quantize": "mxfp8", "target": "cpu"}):
        with pytest.raises(VlmcError, match="--quantize-activations"):
            compile(ckpts["qwen2_vl"], tmp_path / "x", quantize_activations=True, **{"target": "cuda", **kw})


def test_compile_cli_quantizes_activations_and_inspect_shows_it(ckpts, tmp_path):
    from click.testing import CliRunner
    from vlmc.cli import main
    run = CliRunner().invoke
    out = tmp_path / "art"
    res = run(main, ["compile", str(ckpts["llava"]), "-o", str(out), "-q", "mxfp8", "--target", "cuda",
                     "--quantize-activations"])
    assert res.exit_code == 0, res.output
    shown = run(main, ["inspect", str(out), "--layers"]).output
    assert "mxfp8+act" in shown
    bad = run(main, ["compile", str(ckpts["llava"]), "-o", str(tmp_path / "bad"), "-q", "q8", "--target", "cuda",
                     "--quantize-activations"])
    assert bad.exit_code != 0 and "--quantize-activations needs --quantize mxfp8 or nvfp4" in bad.output
    assert not (tmp_path / "bad").exists()


def test_mixed_recipe_raises_sensitive_weights(ckpts, tmp_path):
    q = _manifest(compile(ckpts["qwen2_5_vl"], tmp_path / "mixed", quantize="q4", recipe="mixed"))["quantized"]
    assert q["text.layers.1.mlp.gate_proj+up_proj.weight"]["bits"] == 4      # middle layer: the scheme
    assert q["text.layers.0.mlp.gate_proj+up_proj.weight"]["bits"] == 6      # first layer: raised
    assert q["text.layers.1.mlp.down_proj.weight"]["bits"] == 6              # down_proj: raised
    assert q["text.layers.1.self_attn.q_proj+k_proj+v_proj.weight"]["bits"] == 6  # holds v_proj
    assert q["text.embed_tokens.weight"]["bits"] == 6                        # head default for q4


def test_vision_can_stay_float(ckpts, tmp_path):
    """A float tower keeps float32 attention products; a quantized one allows bfloat16."""
    art = compile(ckpts["llava"], tmp_path / "nv", quantize="q8", quantize_vision=False)
    q = _manifest(art)["quantized"]
    assert not any(k.startswith(("vision.", "projector.")) for k in q)
    assert "dot=" not in (art / "model.py").read_text()
    art = compile(ckpts["llava"], tmp_path / "v", quantize="q8")
    q = _manifest(art)["quantized"]
    assert any(k.startswith("vision.encoder.layers.0.") for k in q)
    calls = [line for line in (art / "model.py").read_text().splitlines() if "ops.attention(" in line]
    assert calls and all("dot='bfloat16'" in line for line in calls)  # the tower's attention only
    assert "bfloat16 attention products in vision_layer" in json.dumps(_manifest(art)["passes"])


def test_quantization_shrinks_the_artifact(ckpts, tmp_path):
    f32 = _manifest(compile(ckpts["qwen2_vl"], tmp_path / "f32"))["param_bytes"]
    bf16 = _manifest(compile(ckpts["qwen2_vl"], tmp_path / "bf16", dtype="bfloat16"))["param_bytes"]
    q4 = _manifest(compile(ckpts["qwen2_vl"], tmp_path / "q4", dtype="bfloat16", quantize="q4", head="q4"))
    assert bf16 * 2 == f32
    assert q4["param_bytes"] < 0.45 * bf16  # tiny dims keep some weights float; real shapes: see README


def test_q8_tracks_float32(ckpts, tmp_path):
    ref = vlmc.load(compile(ckpts["qwen2_5_vl"], tmp_path / "f32"))
    q8 = vlmc.load(compile(ckpts["qwen2_5_vl"], tmp_path / "q8", quantize="q8"))
    report = compare(ref, q8, steps=16)
    # random tiny models have many near-ties; the trained demo model is the strict judge
    assert report.top1_agreement >= 0.9
    assert report.mean_kl < 0.02


def test_lowering_picks_the_op_library_and_compute_dtype(ckpts, tmp_path):
    cpu = compile(ckpts["qwen2_vl"], tmp_path / "cpu", dtype="bfloat16", target="cpu")
    metal = compile(ckpts["qwen2_vl"], tmp_path / "metal", dtype="bfloat16", target="metal")
    assert "from vlmc.kernels import cpu_ops as ops" in (cpu / "model.py").read_text()
    assert "ops.cast(" in (cpu / "model.py").read_text()          # bf16 table -> f32 activations
    assert "from vlmc.kernels import gpu_ops as ops" in (metal / "model.py").read_text()
    assert _manifest(cpu)["meta"]["compute_dtype"] == "float32"
    assert _manifest(metal)["meta"]["compute_dtype"] == "bfloat16"


def test_gpu_artifact_runs_on_a_machine_without_that_gpu(ckpts, tmp_path):
    """The GPU op library falls back to the MLX reference ops (fused ones included)."""
    cuda = compile(ckpts["qwen2_vl"], tmp_path / "cuda", target="cuda", fuse=["add_norm"])
    cpu = compile(ckpts["qwen2_vl"], tmp_path / "cpu", target="cpu")
    assert "ops.add_rms_norm(" in (cuda / "model.py").read_text()
    t1, l1 = _trace(vlmc.load(cuda))
    t2, l2 = _trace(vlmc.load(cpu))
    assert t1 == t2 and np.abs(l1 - l2).max() < 1e-4


def test_bad_pass_options_are_user_errors(ckpts, tmp_path):
    for kw in ({"quantize": "q7"}, {"quantize": "q4", "group_size": 48}, {"no_fuse": ["everything"]},
               {"recipe": "fancy"}, {"head": "q9"}):
        with pytest.raises(VlmcError):
            compile(ckpts["qwen2_vl"], tmp_path / "x", **kw)
