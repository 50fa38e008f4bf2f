"""Sampler parity with transformers' logits processors and warpers, plus seeding and validation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.errors import InputError
from vlmc.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    log_softmax,
)

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")

B, V = 4, 300


def _logits(seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def _history(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + 100)
    # Rows of different lengths with repeats, like prompt + generated tokens.
    return [list(rng.integers(0, V, size=n)) for n in (0, 5, 40, 120)]


def _survivors(x) -> np.ndarray:
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.array(x)
    return np.isfinite(arr)


def test_greedy_is_argmax():
    x = _logits()
    out = Sampler(SamplingParams())(mx.array(x))
    assert out.dtype == mx.int32 and out.shape == (B,)
    assert np.array_equal(np.array(out), x.argmax(-1))


def test_top_k_one_equals_greedy():
    x = _logits(1)
    greedy = np.array(Sampler(SamplingParams())(mx.array(x)))
    for seed in range(3):
        s = Sampler(SamplingParams(temperature=0.8, top_k=1, seed=seed))
        assert np.array_equal(np.array(s(mx.array(x))), greedy)


def test_seed_reproducible():
    x = mx.array(_logits(2, scale=0.5))  # flat-ish, so draws vary a lot
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    a, b = Sampler(params), Sampler(params)
    seq_a = [np.array(a(x)) for _ in range(8)]
    seq_b = [np.array(b(x)) for _ in range(8)]
    assert all(np.array_equal(p, q) for p, q in zip(seq_a, seq_b))
    # Steps differ from each other, and a different seed gives a different sequence.
    assert not all(np.array_equal(seq_a[0], s) for s in seq_a[1:])
    c = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=4321))
    seq_c = [np.array(c(x)) for _ in range(8)]
    assert not all(np.array_equal(p, q) for p, q in zip(seq_a, seq_c))


def test_sampling_follows_distribution():
    probs = np.array([0.6, 0.3, 0.1], dtype=np.float32)
    x = mx.array(np.tile(np.log(probs), (20000, 1)))
    draws = np.array(Sampler(SamplingParams(temperature=1.0, seed=0))(x))
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, probs, atol=0.02)
    # min_p=0.4 (threshold 0.24) removes the 0.1 token; the others keep their ratio.
    draws = np.array(Sampler(SamplingParams(temperature=1.0, min_p=0.4, seed=0))(x))
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert freq[2] == 0 and abs(freq[0] - 2 / 3) < 0.02


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
def test_top_k_matches_transformers(k):
    x = _logits(3)
    # A tie at the threshold: transformers keeps every tied token.
    x[0, :3] = x[0].max() + 1.0
    ours = apply_top_k(mx.array(x), k)
    ref = logits_process.TopKLogitsWarper(top_k=k)(None, torch.from_numpy(x.copy()))
    assert np.array_equal(_survivors(ours), _survivors(ref))
    assert np.array_equal(np.array(ours)[_survivors(ours)], x[_survivors(ours)])


@pytest.mark.parametrize("top_p", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(top_p):
    for seed in range(3):
        x = _logits(10 + seed, scale=2.0)
        ours = apply_top_p(mx.array(x), top_p)
        ref = logits_process.TopPLogitsWarper(top_p=top_p)(None, torch.from_numpy(x.copy()))
        assert np.array_equal(_survivors(ours), _survivors(ref))
        assert _survivors(ours).sum(-1).min() >= 1


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p_matches_transformers(min_p):
    x = _logits(4)
    ours = apply_min_p(mx.array(x), min_p)
    ref = logits_process.MinPLogitsWarper(min_p=min_p)(None, torch.from_numpy(x.copy()))
    assert np.array_equal(_survivors(ours), _survivors(ref))
    assert _survivors(ours).sum(-1).min() >= 1


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    x = _logits(5)
    history = _history(5)
    ours = np.array(apply_repetition_penalty(mx.array(x), history, penalty))
    proc = logits_process.RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row, ids in enumerate(history):
        scores = torch.from_numpy(x[row : row + 1].copy())
        ref = proc(torch.tensor([ids], dtype=torch.long), scores) if ids else scores
        np.testing.assert_allclose(ours[row], ref.numpy()[0], rtol=1e-6)
    assert not np.array_equal(ours[3], x[3])


def test_full_pipeline_matches_transformers():
    """Penalty, temperature, top-k, top-p, min-p composed in transformers' order."""
    # Chosen so that each of top-k, top-p and min-p is the binding filter on some row.
    params = SamplingParams(temperature=1.5, top_k=30, top_p=0.95, min_p=0.03, repetition_penalty=1.2, seed=0)
    x = _logits(6)
    history = _history(6)
    ours = np.array(Sampler(params).process(mx.array(x), history))
    chain = [
        logits_process.RepetitionPenaltyLogitsProcessor(penalty=1.2),
        logits_process.TemperatureLogitsWarper(1.5),
        logits_process.TopKLogitsWarper(top_k=30),
        logits_process.TopPLogitsWarper(top_p=0.95),
        logits_process.MinPLogitsWarper(min_p=0.03),
    ]
    for row, ids in enumerate(history):
        scores = torch.from_numpy(x[row : row + 1].copy())
        input_ids = torch.tensor([ids], dtype=torch.long)
        for proc in chain:
            if isinstance(proc, logits_process.RepetitionPenaltyLogitsProcessor) and not ids:
                continue
            scores = proc(input_ids, scores)
        ref = scores.numpy()[0]
        assert np.array_equal(np.isfinite(ours[row]), np.isfinite(ref))
        keep = np.isfinite(ref)
        np.testing.assert_allclose(ours[row][keep], ref[keep], rtol=1e-5)
    # Every draw lands on a surviving token.
    draws = np.array(Sampler(params)(mx.array(np.repeat(x[3:4], 500, axis=0)), [history[3]] * 500))
    assert np.isfinite(ours[3][draws]).all()


def test_greedy_applies_repetition_penalty():
    x = np.zeros((1, 10), dtype=np.float32)
    x[0, 3], x[0, 7] = 2.0, 1.9
    s = Sampler(SamplingParams(repetition_penalty=1.5))
    assert int(s(mx.array(x), [[3]])[0]) == 7
    assert int(s(mx.array(x), [[]])[0]) == 3
    assert int(s(mx.array(x))[0]) == 3


def test_log_softmax():
    x = _logits(7)
    ref = torch.log_softmax(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_allclose(np.array(log_softmax(mx.array(x))), ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplingParams(**kwargs)


def test_params_normalized():
    p = SamplingParams(temperature=1, top_p=1, top_k=np.int64(5), seed=np.int32(3))
    assert isinstance(p.temperature, float) and p.top_k == 5 and type(p.top_k) is int and p.seed == 3
    assert SamplingParams().greedy and not p.greedy
