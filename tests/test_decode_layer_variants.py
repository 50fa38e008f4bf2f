"""The cpu decode_layer fast path over the decoder-layer options of the Gemma and Qwen3
families, one test per option: QK-norm, sandwich norms, the GELU-tanh MLP, soft-capped
attention scores, a query scale other than head_dim ** -0.5, a hidden size other than
heads x head_dim, sliding-window layers on rotating caches (a decode that drops the oldest
tokens on the way) and per-layer rotary tables, then all of Gemma 3's at once; Gemma 4's: a
value norm (weighted or not), a per-layer input branch after the MLP with an output scalar,
layers that read caches other layers wrote this step (KV sharing), then all of them at once.

Each runs a stack of layers through ``decode_layers`` (one C call per step) and through
the layer's ops one by one (``cpu_ops``, what the generated body runs), from the same
caches, step after step (one token per sequence, and a verify step of several): the
outputs and the caches must agree to the last bit, for float32, bfloat16 and 4/8-bit
weights, one sequence and a left-padded batch. The ops themselves are checked against
MLX's reference ops (``vlmc.kernels.reference``) for float and bf16 weights. The compiled
families (Gemma 3, PaliGemma 2, Qwen3-VL) are checked end to end in their parity tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops, reference
from vlmc.kernels.cpu import kv_decode
from vlmc.kernels.quant import QuantWeight
from vlmc.runtime.kv_cache import attention_mask, make_caches

EPS = 1e-6


@dataclass
class Variant:
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    inter: int = 192
    qk_norm: bool = False
    sandwich: bool = False
    act: str = "silu"
    softcap: float | None = None
    scale: float | None = None
    windows: list = field(default_factory=lambda: [None, None, None])  # per layer
    tables: list = field(default_factory=lambda: [0, 0, 0])            # each layer's rotary table
    v_norm: str | None = None        # "plain" (no weight) or "weighted": RMSNorm of each value head
    ple: int = 0                     # > 0: the per-layer input branch's width
    out_scale: bool = False          # the layer's output times a per-layer scalar
    shared_reads: list = field(default_factory=list)  # a second stack of layers reading these caches


VARIANTS = {
    "qk_norm": Variant(qk_norm=True),
    "sandwich_norms": Variant(sandwich=True),
    "gelu_tanh": Variant(act="gelu_tanh"),
    "softcap": Variant(softcap=2.0, scale=0.5),
    "query_scale": Variant(scale=256 ** -0.5),
    "hidden_not_heads_x_dim": Variant(hidden=96, heads=4, head_dim=64, inter=160),
    "sliding_window": Variant(windows=[5, None, 9]),
    "rope_tables": Variant(tables=[0, 1, 0]),
    "gemma3": Variant(qk_norm=True, sandwich=True, act="gelu_tanh", scale=256 ** -0.5, hidden=96,
                      windows=[5, 5, None], tables=[1, 1, 0]),
    "value_norm": Variant(v_norm="plain"),
    "value_norm_weighted": Variant(v_norm="weighted", hidden=96, heads=4, kv_heads=1, head_dim=40, inter=160),
    "per_layer_input": Variant(ple=64, out_scale=True, act="gelu_tanh", hidden=96),
    "kv_shared": Variant(windows=[5, None, 9], shared_reads=[0, 2, 0, 1]),
    "gemma4": Variant(qk_norm=True, sandwich=True, act="gelu_tanh", scale=1.0, hidden=96, head_dim=40, inter=160,
                      windows=[5, 5, None], tables=[1, 1, 0], v_norm="plain", ple=64, out_scale=True,
                      shared_reads=[1, 2, 2, 0]),
}
PLE_SLOTS = 5                # per-layer input slots; layer i of a stack takes slot PLE_SLOT[i]
PLE_SLOT = [3, 0, 4, 1]
PROMPT = 30        # cached tokens before the first step
STEPS = [1] * 6 + [3] + [1] * 6  # tokens per sequence per step: past window - 1 + slack (32) on the way


def _weights(rng, v: Variant, fmt: str, shared: bool = False):
    """(named weights, the fast path's weights tuple); ``shared``: a layer that projects
    queries only and reads another layer's cache."""
    def norm(n):
        return mx.array((1 + 0.2 * rng.standard_normal(n)).astype(np.float32))

    def proj(n, k):
        w = mx.array((rng.standard_normal((n, k)) * 1.5 / np.sqrt(k)).astype(np.float32))
        if fmt == "f32":
            return w
        w = w.astype(mx.bfloat16)
        if fmt == "bf16":
            return w
        bits = int(fmt[1:])
        return QuantWeight(*mx.quantize(w, group_size=32, bits=bits), bits, 32, "affine")
    H, HKV, D, hid, inter = v.heads, v.kv_heads, v.head_dim, v.hidden, v.inter
    w = {"norm1": norm(hid), "qkv": proj((H + (0 if shared else 2 * HKV)) * D, hid), "o": proj(hid, H * D),
         "norm2": norm(hid), "gu": proj(2 * inter, hid), "down": proj(hid, inter)}
    if v.qk_norm:
        w.update(q_norm=norm(D), k_norm=None if shared else norm(D))
    if v.sandwich:
        w.update(post_attn=norm(hid), post_ff=norm(hid))
    if v.v_norm == "weighted" and not shared:
        w["v_norm"] = norm(D)
    if v.ple:
        w.update(ple_gate=proj(v.ple, hid), ple_proj=proj(hid, v.ple), ple_norm=norm(hid))
    if v.out_scale:
        w["out_scale"] = mx.array(np.array([0.5 + rng.random()], np.float32))
    weights = (w["norm1"], w["qkv"], None, w["o"], None, w["norm2"], w["gu"], None, w["down"], None,
               *(w.get(k) for k in ("q_norm", "k_norm", "post_attn", "post_ff", "v_norm", "ple_gate", "ple_proj",
                                    "ple_norm", "out_scale")))
    return w, weights


def _attrs(v: Variant, shared: bool = False, n_layers: int = 3) -> dict:
    attrs = dict(eps1=EPS, eps2=EPS, heads=v.heads, kv_heads=v.kv_heads, head_dim=v.head_dim, inter=v.inter,
                 scale=v.scale or v.head_dim ** -0.5, act=v.act)
    if v.qk_norm:
        attrs.update(eps_q=EPS) if shared else attrs.update(eps_q=EPS, eps_k=EPS)
    if v.v_norm and not shared:
        attrs["eps_v"] = EPS
    if shared:
        attrs["shared"] = True
    if v.ple:
        attrs.update(ple_act=v.act, eps_ple=EPS, ple_layer=PLE_SLOT[:n_layers])
    if v.sandwich:
        attrs.update(eps_pa=EPS, eps_pf=EPS)
    if v.softcap:
        attrs["softcap"] = v.softcap
    return attrs


def _ops_layer(ops, v: Variant, w: dict, x, cos, sin, mask, cache, ple=None, slot: int = 0, shared: bool = False):
    """The generated body's ops (``layers.decoder_layer`` after fusion, with Gemma 4's
    options), through ``ops``; ple: the per-layer inputs [B, T, PLE_SLOTS, P]."""
    H, HKV, D = v.heads, v.kv_heads, v.head_dim

    def lin(a, p):
        return ops.qlinear(a, p) if isinstance(p, QuantWeight) else ops.linear(a, p)
    qkv = lin(ops.rms_norm(x, w["norm1"], eps=EPS), w["qkv"])
    parts = [qkv] if shared else ops.split(qkv, sizes=[H * D, HKV * D, HKV * D], axis=-1)
    heads = []
    for t, n, name in zip(parts, (H, HKV, HKV), ("q_norm", "k_norm", "v_norm")):
        t = ops.reshape(t, shape=[0, 0, n, D])
        if name != "v_norm" and v.qk_norm:
            t = ops.rms_norm(t, w[name], eps=EPS)
        if name == "v_norm" and v.v_norm:
            t = ops.rms_norm(t, w.get("v_norm"), eps=EPS)
        heads.append(ops.transpose(t, axes=[0, 2, 1, 3]))
    capped = {"softcap": v.softcap} if v.softcap else {}
    scale = v.scale or D ** -0.5
    if shared:
        a = ops.shared_attention(ops.rope(heads[0], cos, sin), cache, mask, scale=scale)
    else:
        a = ops.cached_attention(ops.rope(heads[0], cos, sin), ops.rope(heads[1], cos, sin), heads[2], cache, mask,
                                 scale=scale, **capped)
    a = lin(ops.reshape(ops.transpose(a, axes=[0, 2, 1, 3]), shape=[0, 0, H * D]), w["o"])
    if v.sandwich:
        a = ops.rms_norm(a, w["post_attn"], eps=EPS)
    h = ops.add(x, a)
    gate, up = ops.split(lin(ops.rms_norm(h, w["norm2"], eps=EPS), w["gu"]), sizes=[v.inter, v.inter], axis=-1)
    m = lin(ops.glu(gate, up, kind=v.act), w["down"])
    if v.sandwich:
        m = ops.rms_norm(m, w["post_ff"], eps=EPS)
    out = ops.add(h, m)
    if v.ple:
        g = ops.mul(ops.act(lin(out, w["ple_gate"]), kind=v.act), ops.select_layer(ple, index=slot))
        out = ops.add(out, ops.rms_norm(lin(g, w["ple_proj"]), w["ple_norm"], eps=EPS))
    if v.out_scale:
        out = ops.mul(out, w["out_scale"])
    return out


def _caches(v: Variant, batch: int, rng_seed: int):
    plan = [{"index": i, "kv": {"layout": "rotating", "window": wnd} if wnd else {"layout": "dense"}}
            for i, wnd in enumerate(v.windows)]
    caches = make_caches(plan, batch, v.kv_heads, v.head_dim)
    rng = np.random.default_rng(rng_seed)
    for c in caches:
        k = rng.standard_normal((batch, v.kv_heads, PROMPT, v.head_dim)).astype(np.float32)
        c.append(mx.array(k), mx.array(k * 0.5 + 0.1))
    return caches


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", ["f32", "bf16", "q4", "q8"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_layers_variant_equals_the_ops(name, batch, fmt):
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    v = VARIANTS[name]
    rng = np.random.default_rng(len(name) * 7 + batch)
    layers = [_weights(rng, v, fmt) for _ in v.windows]
    readers = [_weights(rng, v, fmt, shared=True) for _ in v.shared_reads]
    attrs, r_attrs = _attrs(v), _attrs(v, shared=True, n_layers=len(readers))
    fast, ops_c, ref_c = (_caches(v, batch, 5) for _ in range(3))
    starts = mx.array([0, 4, 9][:batch], mx.int32)
    check_ref = fmt in ("f32", "bf16")
    fast_steps = 0
    for T in STEPS:
        held = fast[0].offset
        x = (rng.standard_normal((batch, T, v.hidden)) * 2).astype(np.float32)
        tables = []
        for theta in (10000.0, 1e6):  # two rotary tables (Gemma 3: local and global layers)
            pos = np.arange(held, held + T, dtype=np.float32)
            inv = theta ** (-np.arange(0, v.head_dim, 2, dtype=np.float32) / v.head_dim)
            ang = np.concatenate([pos[:, None] * inv] * 2, axis=-1)[None, None]
            tables.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
        cos = [tables[t][0] for t in v.tables]
        sin = [tables[t][1] for t in v.tables]
        mask = attention_mask(starts, held, T, batch > 1)
        ple = (rng.standard_normal((batch, T, PLE_SLOTS, v.ple)) * 2).astype(np.float32) if v.ple else None
        first = (ple,) if v.ple else ()
        out = cpu_ops.decode_layers(x, cos, sin, mask, fast, *first, [w for _, w in layers], **attrs)
        assert out is not None, T
        if readers:  # then layers reading the caches just written (twice some: readers share)
            out = cpu_ops.decode_layers(out, [cos[i] for i in v.shared_reads], [sin[i] for i in v.shared_reads], mask,
                                        [fast[i] for i in v.shared_reads], *first, [w for _, w in readers],
                                        **r_attrs)
            assert out is not None, T
        fast_steps += 1
        h, r = x, mx.array(x)
        ple_r = None if ple is None else mx.array(ple)
        stack = [(w, i, slot, False) for (w, _), i, slot in zip(layers, range(len(layers)), PLE_SLOT)]
        stack += [(w, i, slot, True) for (w, _), i, slot in zip(readers, v.shared_reads, PLE_SLOT)]
        for w, i, slot, shared in stack:
            h = _ops_layer(cpu_ops, v, w, h, cos[i], sin[i], mask, ops_c[i], ple, slot, shared)
            if check_ref:
                r = _ops_layer(reference, v, w, r, mx.array(cos[i]), mx.array(sin[i]), mask, ref_c[i], ple_r, slot,
                               shared)
        assert np.array_equal(_bits(out), _bits(h)), (name, T)
        if check_ref:
            rm = np.asarray(r)
            assert np.abs(rm - out).max() <= 2e-4 * np.abs(rm).max(), (name, T)
    kv_decode.settle()
    for a, b in zip(fast, ops_c):
        assert (a.start, a.held) == (b.start, b.held)
        for which in ("k", "v"):
            assert np.array_equal(_bits(a.parts(which)["x"]), _bits(b.parts(which)["x"]))
    if any(v.windows):  # the decode went past window - 1 + slack: the oldest tokens were dropped
        assert any(c.start > 0 for c in fast)
    assert fast_steps == len(STEPS)


def assert_fast_path_is_the_ops(fast_model, plain_model, prompts: list, steps: int, monkeypatch,
                                stacks: int = 1) -> None:
    """A compiled model's greedy decode through the fast path (``fast_model``, the stack calls
    counted: each of the ``stacks`` per step must run in every decode step) and op by op
    (``plain_model``, compiled with ``--no-fuse decode_layer``): the same tokens and the same
    logits to the last bit. The parity tests of the families with the options above call this."""
    from vlmc.runtime.sampling import Sampler, SamplingParams
    ran, real = [], cpu_ops._decode_layers

    def counted(*a, **k):
        out = real(*a, **k)
        ran.append(out is not None)
        return out
    monkeypatch.setattr(cpu_ops, "_decode_layers", counted)
    outs = []
    for m in (fast_model, plain_model):
        ran.clear()
        outs.append(np.stack([np.array(lg) for _, lg in m.generate_steps(prompts, Sampler(SamplingParams()), steps)]))
        if m is fast_model:
            assert ran.count(True) == (steps - 1) * stacks, ran  # every decode step (the first is the prompt's)
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
