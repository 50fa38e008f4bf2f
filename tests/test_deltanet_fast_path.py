"""The cpu ``deltanet_layer`` fast path (``kernels/cpu/deltanet.py``, one C call for a
stack of Gated DeltaNet layers' decode step) against the layer's ops one by one
(``cpu_ops``, what the generated body runs), from the same recurrent caches.

Shapes are awkward on purpose: key head dims, hidden sizes and an MLP width that are no
multiples of the SIMD widths (4-bit weights need inputs in groups of 32), two value heads
per key head, conv kernels of 4 and 3. A
left-padded batch's prompt goes through the ops (chunked); then decode steps through both
paths: outputs, the conv inputs kept and the states within float32 rounding, step after
step, for float32, bfloat16 and 4-bit weights. A row's output and state do not depend on
the batch (each row alone gives the same bits). Rewinding a cache that the fast path
advanced (``trim``, what a rejected draft needs) gives the ops' states, and a step the
fast path cannot take (a prompt, a fresh cache) returns None. The compiled Qwen3.5 is
checked end to end in ``test_parity_qwen3_5.py`` (its decode steps take this path).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops
from vlmc.kernels.quant import QuantWeight
from vlmc.kernels.step_rows import prompt_rows
from vlmc.runtime.kv_cache import attention_mask as _mask
from vlmc.runtime.state_cache import StateCache

EPS = 1e-6
SHAPES = {"conv4": dict(hidden=96, hk=3, hv=6, dk=20, dv=16, kern=4, inter=160),  # 4-bit: K % 32 == 0
          "conv3": dict(hidden=40, hk=2, hv=2, dk=9, dv=17, kern=3, inter=56)}
# every matmul's K a multiple of 64 and groups of 64 (the int8 blocks, as the compiled q4
# models have them): what bit-exact rows need of 4-bit weights
EXACT = dict(hidden=128, hk=2, hv=4, dk=24, dv=32, kern=4, inter=192, gs=64)
CASES = [(shape, fmt) for shape in SHAPES for fmt in ("f32", "bf16", "q4") if fmt != "q4" or shape == "conv4"]
PROMPT = 11
STEPS = 6

pytestmark = pytest.mark.skipif(cpu._get_lib() is None, reason="the CPU kernels do not build here")


def attention_mask(batch: int, length: int, offset: int, pad: list[int]):
    """A step's mask: rows left-padded by ``pad`` columns, ``length`` new tokens after ``offset``."""
    assert len(pad) == batch
    return _mask(mx.array(pad, dtype=mx.int32), offset, length, any(pad))


def _weights(rng, s: dict, fmt: str) -> tuple:
    """One layer's weights in ``deltanet.WEIGHTS`` order."""
    def vec(n, scale=0.2, mean=1.0):
        return mx.array((mean + scale * rng.standard_normal(n)).astype(np.float32))

    def proj(n, k):
        w = mx.array((rng.standard_normal((n, k)) * 1.2 / np.sqrt(k)).astype(np.float32))
        if fmt == "f32":
            return w
        w = w.astype(mx.bfloat16)
        if fmt == "bf16":
            return w
        gs = s.get("gs", 32)
        return QuantWeight(*mx.quantize(w, group_size=gs, bits=4), 4, gs, "affine")

    h, hk, hv, dk, dv, kern, inter = (s[k] for k in ("hidden", "hk", "hv", "dk", "dv", "kern", "inter"))
    chans = 2 * hk * dk + hv * dv
    conv = mx.array((0.5 * rng.standard_normal((chans, kern))).astype(np.float32))
    return (vec(h), proj(chans, h), proj(hv * dv, h), proj(hv, h), proj(hv, h), conv,
            vec(hv, 0.5, -0.5), vec(hv, 0.5, 0.0), vec(dv), proj(h, hv * dv), vec(h), proj(2 * inter, h),
            proj(h, inter))


def _attrs(s: dict) -> dict:
    return dict(eps1=EPS, eps2=EPS, eps_o=EPS, key_heads=s["hk"], value_heads=s["hv"], key_dim=s["dk"],
                value_dim=s["dv"], conv_kernel=s["kern"], inter=s["inter"], scale=s["dk"] ** -0.5, act="silu")


def _ops_layer(s: dict, w: tuple, x, mask, cache):
    """The generated body of a Gated DeltaNet layer (``gated_deltanet_layer`` after fusion)."""
    ops = cpu_ops
    norm1, qkv_w, z_w, b_w, a_w, conv_w, a_log, dt_bias, o_norm, out_w, norm2, gu_w, d_w = w
    hk, hv, dk, dv, inter = s["hk"], s["hv"], s["dk"], s["dv"], s["inter"]
    n = ops.zero_padded(ops.rms_norm(x, norm1, eps=EPS), mask)
    qkv, z, b, a = (ops.qlinear(n, p) if isinstance(p, QuantWeight) else ops.linear(n, p)
                    for p in (qkv_w, z_w, b_w, a_w))
    c = ops.causal_conv1d(qkv, conv_w, cache, activation="silu")
    q, k, v = ops.split(c, sizes=[hk * dk, hk * dk, hv * dv], axis=-1)
    q = ops.l2_norm(ops.reshape(q, shape=[0, 0, hk, dk]), eps=1e-6)
    k = ops.l2_norm(ops.reshape(k, shape=[0, 0, hk, dk]), eps=1e-6)
    v = ops.reshape(v, shape=[0, 0, hv, dv])
    g, beta = ops.delta_gates(a, b, a_log, dt_bias)
    o = ops.gated_delta_rule(q, k, v, g, beta, cache, scale=dk ** -0.5)
    o = ops.rms_norm_gated(o, ops.reshape(z, shape=[0, 0, hv, dv]), o_norm, eps=EPS)
    o = ops.reshape(o, shape=[0, 0, hv * dv])
    lin = (lambda t, p: ops.qlinear(t, p) if isinstance(p, QuantWeight) else ops.linear(t, p))
    x = ops.add(x, lin(o, out_w))
    gate, up = ops.split(lin(ops.rms_norm(x, norm2, eps=EPS), gu_w), sizes=[inter, inter], axis=-1)
    return ops.add(x, lin(ops.glu(gate, up, kind="silu"), d_w))


def _ops_stack(s, layers, x, mask, caches):
    for w, c in zip(layers, caches):
        x = _ops_layer(s, w, x, mask, c)
    return mx.array(x) if isinstance(x, np.ndarray) else x


def _prompted(s, layers, xs, pad: list[int]):
    """Caches after the prompt rows xs [B, PROMPT, hidden] (row b left-padded by pad[b])."""
    B = xs.shape[0]
    caches = [StateCache(B) for _ in layers]
    mask = attention_mask(B, PROMPT, 0, pad)
    with prompt_rows():
        mx.eval(_ops_stack(s, layers, xs, mask, caches))
    return caches


def _state(c: StateCache) -> tuple[np.ndarray, np.ndarray]:
    return np.array(c.conv), np.array(c.state)


def _close(a, b, what: str, rtol: float = 2e-5) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert err < rtol, f"{what}: relative error {err:.2e}"


def _setup(shape: str, fmt: str, batch: int, n_layers: int = 3, seed: int = 0):
    s = EXACT if shape == "exact" else SHAPES[shape]
    rng = np.random.default_rng(seed)
    layers = [_weights(rng, s, fmt) for _ in range(n_layers)]
    xs = mx.array(rng.standard_normal((batch, PROMPT + STEPS, s["hidden"])).astype(np.float32))
    pad = [0, 3, 1, 5][:batch]
    return s, layers, xs, pad


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape,fmt", CASES)
def test_decode_steps_equal_the_ops(shape, fmt, batch):
    s, layers, xs, pad = _setup(shape, fmt, batch)
    fast_caches = _prompted(s, layers, xs[:, :PROMPT], pad)
    ops_caches = _prompted(s, layers, xs[:, :PROMPT], pad)
    for t in range(STEPS):
        mask = attention_mask(batch, 1, PROMPT + t, pad)
        x = np.array(xs[:, PROMPT + t:PROMPT + t + 1])
        fast = cpu_ops.deltanet_layers(x, mask, fast_caches, layers, **_attrs(s))
        assert fast is not None, "the fast path declined a decode step"
        ref = _ops_stack(s, layers, x, mask, ops_caches)
        _close(fast, ref, f"step {t} output")
        for i, (fc, oc) in enumerate(zip(fast_caches, ops_caches)):
            for name, a, b in zip(("conv", "state"), _state(fc), _state(oc)):
                _close(a, b, f"step {t} layer {i} {name}")
            assert fc.offset == oc.offset and fc.rewindable() == oc.rewindable()


@pytest.mark.parametrize("fmt", ["f32", "q4"])
def test_a_rows_result_does_not_depend_on_the_batch(fmt):
    s, layers, xs, pad = _setup("conv4", fmt, 3, n_layers=2, seed=1)
    pad = [0, 0, 0]
    together = _prompted(s, layers, xs[:, :PROMPT], pad)
    alone = [_prompted(s, layers, xs[:, :PROMPT], pad) for r in range(3)]
    for r, caches in enumerate(alone):  # the same states (the prompt ran batched), one row each
        for c in caches:
            c.select([r])
    for t in range(3):
        x = np.array(xs[:, PROMPT + t:PROMPT + t + 1])
        out = cpu_ops.deltanet_layers(x, attention_mask(3, 1, PROMPT + t, pad), together, layers, **_attrs(s))
        for r in range(3):
            one = cpu_ops.deltanet_layers(x[r:r + 1], attention_mask(1, 1, PROMPT + t, [0]), alone[r], layers,
                                          **_attrs(s))
            assert np.array_equal(out[r:r + 1], one), f"step {t}: row {r} differs alone"
            for c_all, c_one in zip(together, alone[r]):
                assert np.array_equal(np.array(c_all.state[r:r + 1]), np.array(c_one.state))
                assert np.array_equal(np.array(c_all.conv[r:r + 1]), np.array(c_one.conv))


def test_trim_after_fast_steps_restores_the_ops_states():
    s, layers, xs, pad = _setup("conv4", "f32", 2, n_layers=2, seed=2)
    fast_caches = _prompted(s, layers, xs[:, :PROMPT], pad)
    ops_caches = _prompted(s, layers, xs[:, :PROMPT], pad)
    before = [_state(c) for c in ops_caches]
    for t in range(4):
        mask = attention_mask(2, 1, PROMPT + t, pad)
        x = np.array(xs[:, PROMPT + t:PROMPT + t + 1])
        assert cpu_ops.deltanet_layers(x, mask, fast_caches, layers, **_attrs(s)) is not None
        _ops_stack(s, layers, x, mask, ops_caches)
        if t == 1:
            middle = [_state(c) for c in ops_caches]
    for c in fast_caches:
        assert c.trim(2) == 2
    for c, (conv, state) in zip(fast_caches, middle):
        _close(np.array(c.conv), conv, "conv after trim")
        _close(np.array(c.state), state, "state after trim")
    for c in fast_caches:
        assert c.trim(2) == 2
    for c, (conv, state) in zip(fast_caches, before):
        assert np.array_equal(np.array(c.conv), conv) and np.array_equal(np.array(c.state), state)


def test_declines_what_it_cannot_read():
    s, layers, xs, pad = _setup("conv3", "f32", 1, n_layers=1)
    x = np.array(xs[:, :1])
    mask = attention_mask(1, 1, 0, [0])
    caches = [StateCache(1)]
    assert cpu_ops.deltanet_layers(x.astype(np.float16), mask, caches, layers, **_attrs(s)) is None
    caches[0].conv_step(mx.zeros((1, s["kern"] - 1, 2)), mx.zeros((1, 1, 2)), mx.zeros((1, s["kern"] - 1, 2)))
    assert cpu_ops.deltanet_layers(x, mask, caches, layers, **_attrs(s)) is None  # a step half recorded
    assert caches[0].offset == 0


# ---- prompt chunks (``vlmc_deltanet_prompt``: the recurrence token by token in C) ----------

def _fast_prompt(s, layers, xs, pad: list[int], chunks: list[int], caches=None):
    """The C path over the prompt rows xs [B, L, hidden] in chunks of these sizes: (the
    outputs [B, L, hidden], the caches)."""
    B = xs.shape[0]
    caches = caches if caches is not None else [StateCache(B) for _ in layers]
    outs, at = [], 0
    for n in chunks:
        with prompt_rows():
            out = cpu_ops.deltanet_layers(xs[:, at:at + n], attention_mask(B, n, at, pad), caches, layers,
                                          **_attrs(s))
        assert out is not None, "the fast path declined a prompt chunk"
        outs.append(np.asarray(out))
        at += n
    return np.concatenate(outs, axis=1), caches


def _ops_prompt(s, layers, xs, pad: list[int]):
    B, L = xs.shape[:2]
    caches = [StateCache(B) for _ in layers]
    with prompt_rows():
        out = _ops_stack(s, layers, xs, attention_mask(B, L, 0, pad), caches)
    return np.array(out), caches


def _exact_rows() -> bool:
    """Whether the prompt matmuls give a row the same bits in any batch (the int8 GEMM on
    AVX512-VNNI; BLAS rounds per call shape)."""
    return cpu.int8_activations() and bool(cpu._get_lib().vlmc_gemm_q_i8_available())


@pytest.mark.parametrize("length", [PROMPT, 70])  # 70: past the ops' 64-token chunks
@pytest.mark.parametrize("shape,fmt", CASES)
def test_prompt_equals_the_ops(shape, fmt, length):
    """Outputs, kept conv inputs and states of a left-padded batch's prompt, whole and in
    chunks, against the ops (chunked delta rule); then decode steps from either agree."""
    s, layers, _, pad = _setup(shape, fmt, 3)
    xs = mx.array(np.random.default_rng(7).standard_normal((3, length + 2, s["hidden"])).astype(np.float32))
    ref, ops_caches = _ops_prompt(s, layers, xs[:, :length], pad)
    whole, caches = _fast_prompt(s, layers, xs[:, :length], pad, [length])
    cut = [5, 1, length - 6]
    chunked, chunked_caches = _fast_prompt(s, layers, xs[:, :length], pad, cut)
    for got, cs, what in ((whole, caches, "whole"), (chunked, chunked_caches, "chunked")):
        _close(got, ref, f"{what} prompt output", 5e-5)
        for i, (fc, oc) in enumerate(zip(cs, ops_caches)):
            for name, a, b in zip(("conv", "state"), _state(fc), _state(oc)):
                _close(a, b, f"{what} layer {i} {name}", 5e-5)
            assert fc.offset == oc.offset == length
    for t in range(2):  # decode steps (the decode C path) from the C prompt's and the ops' states
        mask = attention_mask(3, 1, length + t, pad)
        x = np.array(xs[:, length + t:length + t + 1])
        fast = cpu_ops.deltanet_layers(x, mask, caches, layers, **_attrs(s))
        _close(fast, _ops_stack(s, layers, x, mask, ops_caches), f"step {t} after the prompt", 5e-5)


@pytest.mark.skipif(not _exact_rows(), reason="bit-exact rows need the int8 GEMM (AVX512-VNNI)")
def test_a_prompt_cut_anywhere_gives_the_same_bits():
    s, layers, _, pad = _setup("exact", "q4", 2, n_layers=2, seed=6)
    xs = mx.array(np.random.default_rng(8).standard_normal((2, 40, s["hidden"])).astype(np.float32))
    whole, caches = _fast_prompt(s, layers, xs, pad[:2], [40])
    for cut in ([5, 1, 34], [17, 23], [1] * 3 + [37]):
        chunked, chunked_caches = _fast_prompt(s, layers, xs, pad[:2], cut)
        assert np.array_equal(whole, chunked), cut
        for a, b in zip(caches, chunked_caches):
            assert np.array_equal(np.array(a.state), np.array(b.state)), cut
            assert np.array_equal(np.array(a.conv), np.array(b.conv)), cut


@pytest.mark.skipif(not _exact_rows(), reason="bit-exact rows need the int8 GEMM (AVX512-VNNI)")
def test_prompt_rows_do_not_depend_on_the_batch():
    """A row's prompt alone and left-padded in a batch of three: the same bits (q4)."""
    s, layers, _, _ = _setup("exact", "q4", 3, n_layers=2, seed=3)
    rng = np.random.default_rng(4)
    lengths = [9, 14, 5]
    width = max(lengths)
    xs = rng.standard_normal((3, width, s["hidden"])).astype(np.float32)
    pad = [width - n for n in lengths]
    batch, caches = _fast_prompt(s, layers, mx.array(xs), pad, [width])
    for r, n in enumerate(lengths):
        alone, one = _fast_prompt(s, layers, mx.array(xs[r:r + 1, width - n:]), [0], [n])
        assert np.array_equal(batch[r:r + 1, width - n:], alone), f"row {r} differs alone"
        for c_all, c_one in zip(caches, one):
            assert np.array_equal(np.array(c_all.state[r:r + 1]), np.array(c_one.state))
            assert np.array_equal(np.array(c_all.conv[r:r + 1]), np.array(c_one.conv))


def test_trim_into_a_prompt_chunk_restores_the_ops_states():
    """Rewinding into a chunk the C path ran replays its recorded inputs (the cache's own
    ``trim``): the states of a prompt that many tokens shorter."""
    s, layers, xs, pad = _setup("conv3", "f32", 2, n_layers=2, seed=5)
    _, caches = _fast_prompt(s, layers, xs[:, :PROMPT], pad, [4, PROMPT - 4])
    _, shorter = _ops_prompt(s, layers, xs[:, :PROMPT - 3], pad)
    for c in caches:
        assert c.trim(3) == 3 and c.offset == PROMPT - 3
    for c, o in zip(caches, shorter):
        for name, a, b in zip(("conv", "state"), _state(c), _state(o)):
            _close(a, b, f"{name} after trim", 5e-5)


def test_steps_the_decode_call_does_not_take_run_the_prompt_call():
    """Several tokens per sequence outside a prompt (a verify step) and more sequences than
    the decode call takes: the C prompt path, the ops' result within rounding."""
    s, layers, _, _ = _setup("conv3", "f32", 1, n_layers=2, seed=9)
    rng = np.random.default_rng(10)
    for B, T in ((2, 4), (cpu.GEMV_MAX_ROWS + 1, 1)):
        xs = mx.array(rng.standard_normal((B, PROMPT + T, s["hidden"])).astype(np.float32))
        pad = [0] * B
        fast_caches, ops_caches = (_prompted(s, layers, xs[:, :PROMPT], pad) for _ in range(2))
        mask = attention_mask(B, T, PROMPT, pad)
        x = np.array(xs[:, PROMPT:])
        fast = cpu_ops.deltanet_layers(x, mask, fast_caches, layers, **_attrs(s))
        assert fast is not None
        _close(fast, _ops_stack(s, layers, x, mask, ops_caches), f"{B} x {T} step", 5e-5)
        for fc, oc in zip(fast_caches, ops_caches):
            for name, a, b in zip(("conv", "state"), _state(fc), _state(oc)):
                _close(a, b, f"{B} x {T} step {name}", 5e-5)
