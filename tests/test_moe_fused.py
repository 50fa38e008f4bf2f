"""The cpu target's fused routed experts (``vlmc_moe_experts``, kernels/cpu/moe.c): one C
call per MoE layer and step against the per-expert loop it replaces (bit for bit), the MLX
reference (``gather_qmm`` / ``gather_mm``), a row alone and in any batch (bit for bit), and
reading only the routed experts.

Shapes are chosen so that both projections are cut into several tiles, the last one short
(hidden 1152 = 9 x 128, expert width 384 = 3 x 128: gate_up tiles of 144, 144, 96 columns
for 4-bit codes, down tiles of 896 and 256 rows), with rows that share experts and rows
that do not.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vlmc.kernels import cpu, cpu_ops, reference
from vlmc.kernels.cpu import moe as cpu_moe
from vlmc.kernels.quant import QuantWeight

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the compiled CPU kernels")

E, H, I, K = 10, 1152, 384, 3


def _stack(shape, seed: int, fmt: str):
    """Stacked [E, out, in] expert weights: "f32", "bf16", or "q<bits>g<group>[s]" (affine,
    each expert's rows quantized on their own; "s": float32 scales, else bfloat16)."""
    w = mx.random.normal(shape, key=mx.random.key(seed)) * (shape[-1] ** -0.5)
    if fmt == "f32":
        return w
    if fmt == "bf16":
        return w.astype(mx.bfloat16)
    bits, gs = int(fmt[1:fmt.index("g")]), int(fmt[fmt.index("g") + 1:].rstrip("s"))
    c, s, b = mx.quantize(w.reshape(-1, shape[-1]), group_size=gs, bits=bits)
    dt = mx.float32 if fmt.endswith("s") else mx.bfloat16
    return QuantWeight(c.reshape(*shape[:2], -1), s.astype(dt).reshape(*shape[:2], -1),
                       b.astype(dt).reshape(*shape[:2], -1), bits, gs, "affine")


def _routes(rows: int, seed: int):
    """x [rows, 1, H], routing weights and experts [rows, 1, K]: distinct experts per row, the
    rows drawn from a few experts only, so that experts have 1 to many rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 1, H)).astype(np.float32)
    pool = rng.choice(E, 6, replace=False)
    idx = np.stack([rng.choice(pool, K, replace=False) for _ in range(rows)]).astype(np.int32).reshape(rows, 1, K)
    w = rng.random((rows, 1, K)).astype(np.float32)
    return x, w / w.sum(-1, keepdims=True), idx


def _loop(x, w, idx, gate_up, down):
    return cpu_moe.routed_experts(x, w, mx.array(idx), gate_up, down, glu=lambda g, u: cpu_ops.glu(g, u, "silu"),
                                  linear=cpu_ops.linear, qlinear=cpu_ops.qlinear)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


FORMATS = ["q4g64", "q4g128s", "q8g64", "q2g64", "q3g64", "q5g128", "q6g64s", "bf16", "f32"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_equals_the_loop_and_the_reference(fmt):
    """Bit for bit the per-expert loop's result (same kernels, same arithmetic per row),
    and within the kernels' tolerance of the MLX reference: int8 activations ~1% relative
    for 2-6-bit codes, their residual for 8-bit codes, float x for float weights."""
    gate_up, down = _stack((E, 2 * I, H), 1, fmt), _stack((E, H, I), 2, fmt)
    for rows in (1, 4, 13):
        x, w, idx = _routes(rows, rows)
        got = cpu_moe.fused_experts(x, w, mx.array(idx), gate_up, down, "silu")
        assert got is not None and got.shape == (rows, 1, H)
        np.testing.assert_array_equal(got, _loop(x, w, idx, gate_up, down), err_msg=f"{fmt} rows={rows}")
        want = np.asarray(reference.moe_experts(mx.array(x), mx.array(w), mx.array(idx), gate_up, down, kind="silu"))
        tol = 2e-2 if fmt[:2] in ("q2", "q3", "q4", "q5", "q6") and cpu.int8_activations() else 2e-4
        assert _rel(got, want) < tol, (fmt, rows, _rel(got, want))


@pytest.mark.parametrize("fmt", ["q4g64", "q6g64s", "bf16"])
def test_rows_alone_equal_rows_in_a_batch(fmt):
    """Batch invariance: each row's output alone is its output among 13 rows (other rows
    sharing some of its experts), bit for bit."""
    gate_up, down = _stack((E, 2 * I, H), 3, fmt), _stack((E, H, I), 4, fmt)
    x, w, idx = _routes(13, 7)
    together = cpu_moe.fused_experts(x, w, mx.array(idx), gate_up, down, "silu")
    for r in range(13):
        alone = cpu_moe.fused_experts(x[r:r + 1], w[r:r + 1], mx.array(idx[r:r + 1]), gate_up, down, "silu")
        np.testing.assert_array_equal(alone, together[r:r + 1], err_msg=f"row {r}")


def test_reads_only_the_routed_experts():
    """Every expert no row chose has NaN scales (q4) or NaN weights (f32): the output is
    unchanged, bit for bit."""
    x, w, idx = _routes(3, 11)
    chosen = np.isin(np.arange(E), idx)
    assert not chosen.all()
    keep = mx.array(chosen)[:, None, None]
    for fmt in ("q4g64", "f32"):
        gate_up, down = _stack((E, 2 * I, H), 5, fmt), _stack((E, H, I), 6, fmt)
        if fmt == "f32":
            bad_gu, bad_dn = mx.where(keep, gate_up, mx.nan), mx.where(keep, down, mx.nan)
        else:
            bad_gu, bad_dn = (QuantWeight(q.weight, mx.where(keep, q.scales, mx.nan).astype(q.scales.dtype), q.biases,
                                          q.bits, q.group_size, q.mode) for q in (gate_up, down))
        want = cpu_moe.fused_experts(x, w, mx.array(idx), gate_up, down, "silu")
        got = cpu_moe.fused_experts(x, w, mx.array(idx), bad_gu, bad_dn, "silu")
        np.testing.assert_array_equal(got, want, err_msg=fmt)


def test_the_op_takes_the_fused_call_for_a_step_and_the_loop_for_a_prompt(monkeypatch):
    """cpu_ops.moe_experts: the fused call for up to FUSED_MAX_ROWS rows, the loop beyond
    (a prompt's rows, for the int8 GEMM); both give the same bits."""
    gate_up, down = _stack((E, 2 * I, H), 8, "q4g64"), _stack((E, H, I), 9, "q4g64")
    calls = []
    real_fused, real_loop = cpu_ops._fused_experts, cpu_ops._routed_experts
    monkeypatch.setattr(cpu_ops, "_fused_experts", lambda *a: calls.append("fused") or real_fused(*a))
    monkeypatch.setattr(cpu_ops, "_routed_experts", lambda *a, **k: calls.append("loop") or real_loop(*a, **k))
    rows = cpu_moe.FUSED_MAX_ROWS + 1
    x, w, idx = _routes(rows, 12)
    few = cpu_ops.qmoe_experts(x[:2], w[:2], mx.array(idx[:2]), gate_up, down, kind="silu")
    assert calls == ["fused"]
    many = cpu_ops.qmoe_experts(x, w, mx.array(idx), gate_up, down, kind="silu")
    assert calls == ["fused", "fused", "loop"]
    np.testing.assert_array_equal(many[:2], few)


def test_bad_routes_are_refused():
    """An expert id out of range or twice in one row: the kernel refuses (no memory read
    outside the stacked weights), the op raises."""
    gate_up, down = _stack((E, 2 * I, H), 1, "q4g64"), _stack((E, H, I), 2, "q4g64")
    x, w, idx = _routes(2, 3)
    for bad in (E, -1):
        wrong = idx.copy()
        wrong[1, 0, 2] = bad
        with pytest.raises(Exception, match="moe_experts"):
            cpu_moe.fused_experts(x, w, mx.array(wrong), gate_up, down, "silu")
    twice = idx.copy()
    twice[0, 0, 1] = twice[0, 0, 0]
    with pytest.raises(Exception, match="moe_experts"):
        cpu_moe.fused_experts(x, w, mx.array(twice), gate_up, down, "silu")


def test_the_kernel_arguments_do_not_keep_weights_alive():
    """The cached kernel arguments of a stacked weight pair leave with the gate_up weight
    (an unloaded model's experts are freed)."""
    import gc
    import weakref

    gate_up, down = _stack((E, 2 * I, H), 1, "q4g64"), _stack((E, H, I), 2, "q4g64")
    x, w, idx = _routes(1, 3)
    assert cpu_moe.fused_experts(x, w, mx.array(idx), gate_up, down, "silu") is not None
    before, ref = len(cpu_moe._plans), weakref.ref(gate_up)
    del gate_up
    gc.collect()
    assert ref() is None and len(cpu_moe._plans) == before - 1
