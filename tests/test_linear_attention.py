"""The linear-attention ops (Gated DeltaNet, Qwen3.5) against the transformers functions and
modules they replace, in float32 within 1e-4: the gated delta rule's step and chunked forms
(against transformers' recurrent and chunked torch forms, from a zero and a non-zero state,
grouped value heads), the causal conv1d with state, the gated RMSNorm, the decay/rate
gates; and the recurrent-state cache: steps continue each other, trim rewinds exactly (from
the few states it keeps), and
the snapshots the prefix cache keeps at block boundaries are transformers' recurrent state
there and continue bitwise like the cache they came from."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
q35 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

import mlx.core as mx  # noqa: E402

from vlmc.kernels import reference as ref  # noqa: E402
from vlmc.kernels import linear_attention as la  # noqa: E402
from vlmc.runtime.state_cache import StateCache  # noqa: E402

ATOL = 1e-4


def _inputs(seed, b=2, n=11, hk=2, hv=4, dk=8, dv=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, hk, dk, generator=g)
    k = torch.randn(b, n, hk, dk, generator=g)
    v = torch.randn(b, n, hv, dv, generator=g)
    decay = -torch.rand(b, n, hv, generator=g) * 2
    beta = torch.rand(b, n, hv, generator=g)
    state = torch.randn(b, hv, dk, dv, generator=g) * 0.5
    return q, k, v, decay, beta, state


def _mx(t):
    return mx.array(t.detach().numpy())


def _run(q, k, v, decay, beta, cache):
    """Our op, q/k L2-normed as the layer does before it."""
    qn = ref.l2_norm(_mx(q), 1e-6)
    kn = ref.l2_norm(_mx(k), 1e-6)
    dummy = mx.zeros((q.shape[0], q.shape[1], 1))
    cache.conv_step(mx.zeros((q.shape[0], 1, 1)), dummy, dummy[:, -1:])  # the conv half of the step
    return ref.gated_delta_rule(qn, kn, _mx(v), _mx(decay), _mx(beta), cache, scale=q.shape[-1] ** -0.5, chunk=4)


def _cache_with(state):
    c = StateCache(state.shape[0])
    c.state = _mx(state) if state is not None else None
    return c


@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("n", [1, 11])
def test_gated_delta_rule_matches_transformers(n, initial):
    q, k, v, decay, beta, state = _inputs(n, n=n)
    init = state if initial else None
    kw = dict(initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True)
    want_r, state_r = q35.torch_recurrent_gated_delta_rule(q, k, v, decay, beta, **kw)
    want_c, state_c = q35.torch_chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=4, **kw)
    cache = _cache_with(state) if initial else StateCache(q.shape[0])
    got = _run(q, k, v, decay, beta, cache)
    for want, want_state in ((want_r, state_r), (want_c, state_c)):
        np.testing.assert_allclose(np.array(got), want.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.array(cache.state), want_state.numpy(), atol=ATOL, rtol=0)


def test_chunked_and_step_forms_agree_and_continue_each_other():
    q, k, v, decay, beta, state = _inputs(5, n=13)
    whole = _cache_with(state)
    out = np.array(_run(q, k, v, decay, beta, whole))
    pieces = _cache_with(state)
    parts = []
    for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 13)):  # chunked, steps, chunked again
        parts.append(np.array(_run(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], decay[:, lo:hi], beta[:, lo:hi], pieces)))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(pieces.state), np.array(whole.state), atol=ATOL, rtol=0)
    assert pieces.offset == whole.offset == 13


def test_trim_rewinds_the_state_exactly():
    q, k, v, decay, beta, state = _inputs(7, n=9)
    sl = lambda lo, hi: [t[:, lo:hi] for t in (q, k, v, decay, beta)]  # noqa: E731
    ref_cache = _cache_with(state)
    _run(*sl(0, 4), ref_cache)
    kept = np.array(_run(*sl(4, 6), ref_cache))
    cache = _cache_with(state)
    _run(*sl(0, 4), cache)
    _run(*sl(4, 9), cache)          # a verify step of 5 tokens, 3 of them rejected
    assert cache.trim(3) == 3 and cache.offset == 6
    np.testing.assert_allclose(np.array(cache.state), np.array(ref_cache.state), atol=1e-5, rtol=0)
    again = np.array(_run(*sl(6, 7), cache))
    want = np.array(_run(*sl(6, 7), ref_cache))
    np.testing.assert_allclose(again, want, atol=1e-5, rtol=0)
    assert kept.shape[1] == 2
    # whole steps come back too, and a rewind past the records changes nothing
    assert cache.trim(cache.rewindable() + 1) == 0
    before = cache.offset
    assert cache.trim(1) == 1 and cache.offset == before - 1


def test_decode_steps_keep_few_states_and_every_rewind_is_exact():
    """30 one-token steps after a 3-token prompt step: the cache keeps a state only every
    ``stride`` tokens (not one per step: 1 MiB each at real shapes), its records still reach
    ``history`` tokens back, and every rewind over them (into a step, onto a checkpoint,
    between checkpoints, past a partial rewind) gives the state and conv window a cache that
    never saw the dropped tokens holds."""
    n = 33
    q, k, v, decay, beta, state = _inputs(13, n=n)
    sl = lambda lo, hi: [t[:, lo:hi] for t in (q, k, v, decay, beta)]  # noqa: E731

    def fed(upto):  # the cache after tokens [0, upto): a 3-token step, then one token a step
        c = _cache_with(state)
        _run(*sl(0, 3), c)
        for t in range(3, upto):
            _run(*sl(t, t + 1), c)
        return c

    full = fed(n)
    kept = [s for s in full._steps if s.state_before is not None]
    assert full.rewindable() >= StateCache.history
    assert len(kept) <= StateCache.history // StateCache.stride + 2 < len(full._steps)
    for back in range(1, full.rewindable() + 1):
        cache = fed(n)
        assert cache.trim(back) == back and cache.offset == n - back
        want = _cache_with(state)
        _run(*sl(0, 3), want)
        for t in range(3, n - back):
            _run(*sl(t, t + 1), want)
        np.testing.assert_allclose(np.array(cache.state), np.array(want.state), atol=1e-5, rtol=0)
        # the cache goes on from there: one more step, then a second rewind across it
        _run(*sl(n - back, n - back + 1), cache)
        _run(*sl(n - back, n - back + 1), want)
        if back == full.rewindable():  # nothing older was kept: only the new step rewinds
            assert cache.rewindable() == 1
            continue
        assert cache.trim(2) == 2
        want2 = fed(n - back - 1)
        np.testing.assert_allclose(np.array(cache.state), np.array(want2.state), atol=1e-5, rtol=0)
    assert fed(n).trim(full.rewindable() + 1) == 0


@pytest.mark.parametrize("block", [3, 5, 8])
def test_snapshots_at_block_boundaries_are_the_recurrent_state(block):
    """A prefill cut into steps that end on block boundaries (steps longer than the chunked
    form's chunk of 4, and not multiples of it): the snapshot after each boundary is
    transformers' token-by-token state over that prefix; a fresh cache started from it
    continues bitwise as the cache it was taken from (same steps after it)."""
    n = 19
    q, k, v, decay, beta, state = _inputs(11, n=n)
    sl = lambda lo, hi: [t[:, lo:hi] for t in (q, k, v, decay, beta)]  # noqa: E731
    cache = StateCache(2)
    snaps, lo = {}, 0
    for hi in [*range(block, n, block), n]:
        _run(*sl(lo, hi), cache)
        snaps[hi], lo = (cache.snapshot(0), cache.snapshot(1)), hi
    assert cache.export_blocks(block) == [{}] * (n // block)
    kw = dict(initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
    for at, pair in snaps.items():
        _, want = q35.torch_recurrent_gated_delta_rule(*sl(0, at), **kw)
        got = np.concatenate([np.array(s["state"]) for s in pair])
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
    at = block * 2
    for row in (0, 1):
        one = lambda lo, hi: [t[row:row + 1] for t in sl(lo, hi)]  # noqa: E731
        source = StateCache(1)
        _run(*one(0, block), source)
        _run(*one(block, at), source)
        snap = source.snapshot(0)
        want = np.array(_run(*one(at, n), source))
        fresh = StateCache(1)
        fresh.import_state(snap, at)
        assert fresh.offset == at
        np.testing.assert_array_equal(np.array(_run(*one(at, n), fresh)), want)
        np.testing.assert_array_equal(np.array(fresh.state), np.array(source.state))
    with pytest.raises(ValueError, match="empty cache"):
        cache.import_state(snaps[at][0], at)


def test_causal_conv1d_matches_transformers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 10, generator=g)               # [B, L, C]
    w = torch.randn(10, 4, generator=g)
    want = q35.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    cache = StateCache(2)
    got = ref.causal_conv1d(_mx(x), _mx(w), cache, activation="silu")
    np.testing.assert_allclose(np.array(got), want.numpy(), atol=ATOL, rtol=0)
    # continued one token at a time: transformers' update form with its conv state
    cache2 = StateCache(2)
    ref.causal_conv1d(_mx(x[:, :7]), _mx(w), cache2, activation="silu")
    conv_state = torch.nn.functional.pad(x[:, :7].transpose(1, 2), (4 - 7, 0))[:, :, -4:].clone()
    for t in range(7, 12):
        want_t = q35.causal_conv1d_update(x[:, t:t + 1].transpose(1, 2), conv_state, w, None, "silu")
        got_t = ref.causal_conv1d(_mx(x[:, t:t + 1]), _mx(w), cache2, activation="silu")
        np.testing.assert_allclose(np.array(got_t), want_t.transpose(1, 2).numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.array(got_t), want[:, t:t + 1].numpy(), atol=ATOL, rtol=0)


def test_gated_rms_norm_and_gates_match_transformers():
    torch.manual_seed(0)
    norm = q35.Qwen3_5RMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, z = torch.randn(3, 5, 8), torch.randn(3, 5, 8) * 3
    np.testing.assert_allclose(np.array(ref.rms_norm_gated(_mx(x), _mx(z), _mx(norm.weight), 1e-6)),
                               norm(x, z).detach().numpy(), atol=ATOL, rtol=0)
    a, b = torch.randn(2, 5, 4) * 10, torch.randn(2, 5, 4)
    a_log, dt_bias = torch.rand(4) * 2, torch.randn(4)
    g, beta = ref.delta_gates(_mx(a), _mx(b), _mx(a_log), _mx(dt_bias))
    want_g = -a_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)
    np.testing.assert_allclose(np.array(g), want_g.numpy(), atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(np.array(beta), b.sigmoid().numpy(), atol=ATOL, rtol=0)


def test_chunked_form_pads_a_partial_chunk():
    q, k, v, decay, beta, state = _inputs(9, n=5, hk=1, hv=1)
    qh, kh = (la._heads(ref.l2_norm(_mx(t)), 1) for t in (q, k))
    vh = _mx(v).transpose(0, 2, 1, 3)
    gh, bh = _mx(decay).transpose(0, 2, 1), _mx(beta).transpose(0, 2, 1)
    o1, s1 = la.delta_rule_steps(qh, kh, vh, gh, bh, _mx(state))
    o2, s2 = la.delta_rule_chunked(qh, kh, vh, gh, bh, _mx(state), chunk=8)
    np.testing.assert_allclose(np.array(o2), np.array(o1), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(s2), np.array(s1), atol=ATOL, rtol=0)
