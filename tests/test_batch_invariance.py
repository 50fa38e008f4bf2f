"""Batch invariance on the cpu target: a sequence's logits, bit for bit, do not depend on
the other sequences sharing its steps. Greedy continuous batching then gives exactly the
replies of serial runs (`benchmarks/batch_invariance.py` and `serve_load.py
--check-serial` check it at real shapes).

What it takes: every kernel a row passes through computes that row with the same
arithmetic whatever the row count of the call (GEMV, int8 GEMM, GEMV passes for small
products; the one-pass attention kernel for any number of query rows) and left padding
changes nothing; for Qwen3.5's Gated DeltaNet layers, a recurrence that runs token by
token whatever the chunk (the C prompt path) and padding rows that leave a zero state zero.
Holds where the kernels run on int8 activations and AVX-512 (elsewhere the float GEMM and
BLAS attention round per call shape; those tests skip).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from vlmc.kernels import cpu
from vlmc.kernels.cpu import attention as cpu_attention

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.skipif(
    not cpu.int8_activations() or not cpu._get_lib().vlmc_gemm_q_i8_available()
    or not cpu_attention._fused_available(),
    reason="batch invariance needs the int8 kernels and the one-pass attention kernel (AVX512-VNNI)")


@pytest.mark.parametrize("bits,gs,sdtype", [(4, 64, mx.bfloat16), (4, 128, mx.float32), (8, 64, mx.float32),
                                            (3, 64, mx.bfloat16), (6, 128, mx.bfloat16)])
def test_qlinear_rows_equal_alone_and_in_any_batch(bits, gs, sdtype):
    """The int8 GEMM (many rows), GEMV passes (rows over GEMV_MAX_ROWS of a small product)
    and the GEMV (few rows) give each row the same bits."""
    rng = np.random.default_rng(bits * 1000 + gs)
    for M, N, K in [(37, 517, 1024), (40, 96, 4608), (23, 64, 256)]:
        wq, s, b = mx.quantize(mx.random.normal((N, K), scale=0.02).astype(sdtype), group_size=gs, bits=bits)
        x = rng.standard_normal((M, K)).astype(np.float32)
        bias = mx.array(rng.standard_normal(N).astype(np.float32))
        together = np.asarray(cpu.qlinear(mx.array(x), wq, s, b, bias, bits=bits, group_size=gs))
        alone = np.concatenate([np.asarray(cpu.qlinear(mx.array(x[m:m + 1]), wq, s, b, bias, bits=bits, group_size=gs))
                                for m in range(M)])
        tail = np.asarray(cpu.qlinear(mx.array(x[-5:]), wq, s, b, bias, bits=bits, group_size=gs))
        assert np.array_equal(together, alone), (M, N, K, np.abs(together - alone).max())
        assert np.array_equal(together[-5:], tail), (M, N, K)


def test_prefill_attention_rows_equal_alone_and_left_padded():
    """A prompt's causal attention alone (few query rows) and left-padded in a longer batch."""
    rng = np.random.default_rng(0)
    H, Hk, D, width = 6, 2, 64, 29
    for n in (1, 2, 5, 12, 17, 29):
        q = rng.standard_normal((1, H, n, D)).astype(np.float32)
        k, v = (rng.standard_normal((1, Hk, n, D)).astype(np.float32) for _ in range(2))
        causal = np.tril(np.ones((n, n), bool))[None, None]
        alone = np.asarray(cpu_attention.attention(mx.array(q), mx.array(k), mx.array(v), mx.array(causal),
                                                   scale=D ** -0.5))
        pad = width - n
        qp, kp, vp = (np.concatenate([np.zeros(a.shape[:2] + (pad, D), np.float32), a], 2) for a in (q, k, v))
        keep = np.tril(np.ones((width, width), bool)) & (np.arange(width) >= pad)[None, :]
        other = rng.standard_normal(qp.shape).astype(np.float32)  # a second row of the batch
        batch = [np.concatenate([qp, other]), np.concatenate([kp, kp]), np.concatenate([vp, vp])]
        mask = np.stack([keep, np.tril(np.ones((width, width), bool))])[:, None]
        padded = np.asarray(cpu_attention.attention(*(mx.array(a) for a in batch), mx.array(mask), scale=D ** -0.5))
        assert np.array_equal(padded[:1, :, pad:], alone), n


@pytest.fixture(scope="module")
def demo_q4(tmp_path_factory):
    from vlmc.demo import MODEL_DIR
    return vlmc.load(vlmc.compile(MODEL_DIR, tmp_path_factory.mktemp("inv") / "q4", quantize="q4"))


@pytest.fixture(scope="module")
def qwen3_5_q4(tmp_path_factory):
    """The tiny Qwen3.5 (Gated DeltaNet layers between gated full-attention ones): its
    prompt chunks run the recurrence token by token in C (``vlmc_deltanet_prompt``)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fixtures import qwen3_5 as q35
    root = tmp_path_factory.mktemp("inv_qwen3_5")
    info = q35.build_qwen3_5_checkpoint(root / "ckpt")
    return vlmc.load(vlmc.compile(info["path"], root / "q4", quantize="q4"))


MODELS = ["demo_q4", "qwen3_5_q4"]


def _logits(model, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    """The logits after the prefill and each greedy step: benchmarks/batch_invariance.py's run."""
    spec = importlib.util.spec_from_file_location("bench_batch_invariance", BENCH / "batch_invariance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.run(model, prompts, steps)


@pytest.mark.parametrize("model", MODELS)
def test_q4_model_rows_equal_their_lone_runs(model, request):
    """Prompts of 1-40 ids prefilled together (left-padded) and decoded greedily: each row's
    logits after the prefill and every step equal its lone run's, bit for bit."""
    m = request.getfixturevalue(model)
    rng = np.random.default_rng(3)
    vocab = m.tokenizer.vocab_size
    prompts = [[int(t) for t in rng.integers(10, vocab - 10, n)] for n in (1, 3, 9, 15, 17, 40)]
    together = _logits(m, prompts, 3)
    for i, p in enumerate(prompts):
        alone = _logits(m, [p], 3)
        for step, (a, t) in enumerate(zip(alone, together)):
            assert np.array_equal(a[0], t[i]), (len(p), step, float(np.abs(a[0] - t[i]).max()))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("chunks", [[5], [16], [30, 3, 4]])
def test_q4_prompt_in_chunks_equals_the_whole_prefill(model, chunks, request):
    """A prompt prefilled in chunks (the server's budgeted prefill, the rest of a prompt after
    a prefix-cache hit) takes the prompt kernels even where a chunk is as short as a decode
    step: the logits after it and after every decode step equal the whole prefill's."""
    from parity_kit import chunked_prefill_logits
    m = request.getfixturevalue(model)
    rng = np.random.default_rng(4)
    ids = [int(t) for t in rng.integers(10, m.tokenizer.vocab_size - 10, 37)]
    whole, chunked = (chunked_prefill_logits(m, ids, sizes) for sizes in ([None], chunks))
    for step, (a, b) in enumerate(zip(whole, chunked)):
        assert np.array_equal(a, b), (chunks, step, float(np.abs(a - b).max()))
