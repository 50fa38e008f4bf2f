"""The cpu target's one-call MoE block (``vlmc_moe_block_ex``, kernels/cpu/moe.c; the
``moe_block`` op that ``lower`` makes of a Qwen3.5-MoE block's ops, or of a Gemma 4 layer's
routed experts): router GEMV, softmax, top-k, renormalisation, the routed experts and the
shared expert with its sigmoid gate, against transformers' Qwen3_5Moe sparse block; with the
router on its own input and per-expert scales, against transformers' Gemma4TextRouter and
Gemma4TextExperts; both against the separate ops they replace; a row alone and in a batch;
ties; refusals.

Shapes: ``SMALL`` is awkward (an expert width of 40 and a shared width of 80, neither a
multiple of the 16-column tiles; 10 experts, 3 per token); ``TILED`` cuts every projection
into several tiles, the last one short (hidden 1152, experts of 384, a shared expert of
320), for the quantized formats.
"""
from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from vlmc.ir.core import TensorType
from vlmc.ir.ops import OPS, ShapeError
from vlmc.kernels import cpu, cpu_ops
from vlmc.kernels.cpu import moe as cm
from vlmc.kernels.moe import block_ops
from vlmc.kernels.quant import QuantWeight

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the compiled CPU kernels")

SMALL = dict(experts=10, hidden=192, inter=40, shared=80, top_k=3)
TILED = dict(experts=10, hidden=1152, inter=384, shared=320, top_k=3)


def _hf_block(seed: int, experts: int, hidden: int, inter: int, shared: int, top_k: int):
    """transformers' sparse block with N(0, 1/fan_in) weights, the router's 3x wider (a
    clear top-k choice)."""
    torch = pytest.importorskip("torch")
    import transformers as tf
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = tf.Qwen3_5MoeTextConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k,
                                  moe_intermediate_size=inter, shared_expert_intermediate_size=shared)
    block = Qwen3_5MoeSparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (3.0 if name == "gate.weight" else 1.0) / p.shape[-1] ** 0.5)
    return block


def _fmt(w: mx.array, fmt: str):
    """A weight ([out, in] or stacked [E, out, in]) as "f32", "bf16" or "q<bits>g<group>"
    (affine, bfloat16 scales and biases, each row quantized on its own)."""
    if fmt == "f32":
        return w
    if fmt == "bf16":
        return w.astype(mx.bfloat16)
    bits, gs = int(fmt[1:fmt.index("g")]), int(fmt[fmt.index("g") + 1:])
    c, s, b = mx.quantize(w.reshape(-1, w.shape[-1]), group_size=gs, bits=bits)
    shape = w.shape[:-1]
    return QuantWeight(c.reshape(*shape, -1), s.astype(mx.bfloat16).reshape(*shape, -1),
                       b.astype(mx.bfloat16).reshape(*shape, -1), bits, gs, "affine")


def _weights(block, fmt: str = "f32", shared: bool = True) -> tuple:
    """(router, gate_up, down[, shared gate_up, shared down, shared gate]) as the artifact
    holds them: the experts and the shared expert in ``fmt``, the router and the shared
    gate float32 (the quantize pass keeps routers float)."""
    p = {k: mx.array(v.detach().numpy()) for k, v in block.named_parameters()}
    routed = (p["gate.weight"], _fmt(p["experts.gate_up_proj"], fmt), _fmt(p["experts.down_proj"], fmt))
    if not shared:
        return routed + (None, None, None)
    sgu = mx.concatenate([p["shared_expert.gate_proj.weight"], p["shared_expert.up_proj.weight"]])
    return routed + (_fmt(sgu, fmt), _fmt(p["shared_expert.down_proj.weight"], fmt), p["shared_expert_gate.weight"])


def _gemma(seed: int, experts: int, hidden: int, inter: int, top_k: int, **_):
    """transformers' Gemma 4 router and routed experts: N(0, 1/fan_in) expert weights, the
    router's N(0, 9) (its input has norm ~1: a clear top-k choice), router.scale near 1,
    per-expert scales in 0.5 .. 1.5."""
    torch = pytest.importorskip("torch")
    import transformers as tf
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

    cfg = tf.Gemma4TextConfig(hidden_size=hidden, num_experts=experts, top_k_experts=top_k,
                              moe_intermediate_size=inter, enable_moe_block=True, rms_norm_eps=1e-6)
    router, routed = Gemma4TextRouter(cfg), Gemma4TextExperts(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.proj.weight.copy_(3.0 * torch.randn(experts, hidden, generator=gen))
        router.scale.copy_(1 + 0.3 * torch.randn(hidden, generator=gen))
        router.per_expert_scale.copy_(0.5 + torch.rand(experts, generator=gen))
        for p in routed.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return router, routed


def _gemma_weights(router, routed, fmt: str = "f32") -> tuple:
    """(router, gate_up, down, None, None, None) and the per-expert scales, as the artifact
    holds them (the router float32, the experts in ``fmt``)."""
    def a(t):
        return mx.array(t.detach().numpy())
    return ((a(router.proj.weight), _fmt(a(routed.gate_up_proj), fmt), _fmt(a(routed.down_proj), fmt), None, None,
             None), a(router.per_expert_scale))


def _gemma_router_input(router, x: np.ndarray) -> np.ndarray:
    """What the router's projection reads: rms_norm(x) * scale * hidden**-0.5 (the op path
    computes it with its own ops before the block)."""
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        t = router.norm(torch.from_numpy(x)) * router.scale * router.scalar_root_size
    return t.numpy()


def _x(rows: int, hidden: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, hidden)).astype(np.float32)


def _ops(x, w, router_x=None, expert_scale=None, **kw):
    """The separate ops (as the op path runs them) and the experts their moe_route chose."""
    out = np.asarray(block_ops(cpu_ops, x, *w, router_x, expert_scale, **kw))
    _, experts = cpu_ops.moe_route(cpu_ops.linear(x if router_x is None else router_x, w[0]), top_k=kw["top_k"],
                                   normalize=kw["normalize"])
    return out, np.asarray(experts)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Within float32 rounding: the routing weights' softmax differs from MLX's in the last bit."""
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * float(np.abs(want).max()))


def test_matches_transformers_sparse_block():
    """Float32 weights: the experts transformers' router picks (most probable first), and
    its block's output within 1e-5, on 9 tokens."""
    torch = pytest.importorskip("torch")
    block = _hf_block(1, **SMALL)
    x = _x(9, SMALL["hidden"], 2)
    with torch.no_grad():
        want = block(torch.from_numpy(x.reshape(1, 9, -1))).numpy().reshape(9, 1, -1)
        _, _, hf_experts = block.gate(torch.from_numpy(x.reshape(9, -1)))
    got, experts, _ = cm.fused_block(x, *_weights(block), top_k=SMALL["top_k"], normalize=True, kind="silu",
                                     routing=True)
    np.testing.assert_array_equal(experts.reshape(9, -1), hf_experts.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_gemma4_matches_transformers_router_and_experts():
    """Float32 weights, the router on its own input and per-expert scales: the experts
    transformers' Gemma4TextRouter picks (most probable first), its scaled weights within
    1e-6, and Gemma4TextExperts' output within 1e-5, on 9 tokens whose router input differs
    from the experts' (as in the model: two different norms of the residual)."""
    torch = pytest.importorskip("torch")
    router, routed = _gemma(11, **SMALL)
    x, n = _x(9, SMALL["hidden"], 12), _x(9, SMALL["hidden"], 13)
    r = _gemma_router_input(router, x)
    with torch.no_grad():
        _, hf_w, hf_e = router(torch.from_numpy(x.reshape(9, -1)))
        want = routed(torch.from_numpy(n.reshape(9, -1)), hf_e, hf_w).numpy().reshape(9, 1, -1)
    w, scale = _gemma_weights(router, routed)
    got, experts, wts = cm.fused_block(n, *w, r, scale, top_k=SMALL["top_k"], normalize=True, kind="gelu_tanh",
                                       routing=True)
    np.testing.assert_array_equal(experts.reshape(9, -1), hf_e.numpy())
    np.testing.assert_allclose(wts.reshape(9, -1), hf_w.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _variant(block, fmt: str, variant: str, rows: int, hidden: int) -> tuple:
    """(x, weights, router_x, expert_scale, normalize) of a test variant: "gemma4" the
    routed experts alone, the router on another input than the experts and each chosen
    expert's weight scaled after the renormalisation."""
    w = _weights(block, fmt, shared=variant not in ("no_shared", "gemma4"))
    x = _x(rows, hidden, rows)
    if variant != "gemma4":
        return x, w, None, None, variant != "not_renormalised"
    scale = mx.array(np.random.default_rng(rows).uniform(0.5, 1.5, w[0].shape[0]).astype(np.float32))
    return x, w, _x(rows, hidden, 100 + rows), scale, True


@pytest.mark.parametrize("shapes,fmt", [(SMALL, "f32"), (SMALL, "bf16"), (TILED, "q4g64"), (TILED, "q8g64"),
                                        (TILED, "bf16")])
@pytest.mark.parametrize("variant", ["qwen3_5", "no_shared", "not_renormalised", "gemma4"])
def test_equals_the_separate_ops(shapes, fmt, variant):
    """The one call against the ops it replaces (router, moe_route, the routed experts, the
    shared expert, its gate, the sum): the same experts, the output within float32 rounding,
    for 1, 5 and 16 rows; with no shared expert (Qwen3-MoE), without renormalising the
    top-k probabilities (Qwen3-MoE's norm_topk_prob false), and as Gemma 4's (the router
    on its own input, per-expert scales, no shared expert). Past 16 rows it declines."""
    block = _hf_block(3, **shapes)
    for rows in (1, 5, 16):
        x, w, rx, scale, normalize = _variant(block, fmt, variant, rows, shapes["hidden"])
        kw = dict(top_k=shapes["top_k"], normalize=normalize, kind="silu")
        got, experts, wts = cm.fused_block(x, *w, rx, scale, **kw, routing=True)
        want, want_experts = _ops(x, w, rx, scale, **kw)
        np.testing.assert_array_equal(experts, want_experts, err_msg=f"rows={rows}")
        _close(got, want)
        if scale is not None:  # the weights it reports carry the scales
            rw, _ = cpu_ops.moe_route(cpu_ops.linear(rx, w[0]), top_k=kw["top_k"], normalize=True)
            np.testing.assert_allclose(wts, np.asarray(rw) * np.asarray(scale)[experts], rtol=1e-6, atol=0)
        np.testing.assert_array_equal(cpu_ops.moe_block(x, *w, rx, scale, **kw), got)  # the op takes the call
    x, w, rx, scale, normalize = _variant(block, fmt, variant, 17, shapes["hidden"])
    assert cm.fused_block(x, *w, rx, scale, top_k=shapes["top_k"], normalize=normalize, kind="silu") is None


@pytest.mark.parametrize("fmt", ["q4g64", "bf16"])
@pytest.mark.parametrize("variant", ["qwen3_5", "gemma4"])
def test_rows_alone_equal_rows_in_a_batch(fmt, variant):
    """Each of 16 rows (sharing some experts) alone gives its result among the 16, bit for bit."""
    block = _hf_block(5, **TILED)
    x, w, rx, scale, _ = _variant(block, fmt, variant, 16, TILED["hidden"])
    kw = dict(top_k=TILED["top_k"], normalize=True, kind="silu")
    together, experts, _ = cm.fused_block(x, *w, rx, scale, **kw, routing=True)
    assert len(np.unique(experts)) < 16 * TILED["top_k"]  # rows share experts
    for r in range(16):
        alone = cm.fused_block(x[r:r + 1], *w, None if rx is None else rx[r:r + 1], scale, **kw)
        np.testing.assert_array_equal(alone, together[r:r + 1], err_msg=f"row {r}")


def test_ties_go_to_the_lower_expert():
    """Equal router probabilities: the lower expert index first, as the op path's stable
    argsort orders them, with the tied weights equal. Two experts with the same router row
    (both in the top-k) are the pair transformers picks too; among more tied experts than
    places, torch's top-k takes its own pick, which neither path follows."""
    torch = pytest.importorskip("torch")
    block = _hf_block(7, **SMALL)
    w = list(_weights(block))
    router = np.array(w[0])
    router[[6, 8, 9]] = router[4]  # experts 4, 6, 8 and 9 tie
    x = _x(6, SMALL["hidden"], 8)
    # rows along the tied router row: the four tied experts the most probable, three places
    x[:3, 0] = router[4] * 40.0 / np.linalg.norm(router[4])
    w[0] = mx.array(router)
    kw = dict(top_k=3, normalize=True, kind="silu")
    got, experts, wts = cm.fused_block(x, *w, **kw, routing=True)
    want, want_experts = _ops(x, w, **kw)
    np.testing.assert_array_equal(experts, want_experts)
    _close(got, want)
    np.testing.assert_array_equal(experts[:3, 0], [[4, 6, 8]] * 3)
    assert (wts[:3, 0, 0] == wts[:3, 0, 1]).all() and (wts[:3, 0, 1] == wts[:3, 0, 2]).all()
    # all experts tied (a zero router): experts 0, 1, 2, each weighing a third
    w[0] = mx.zeros_like(w[0])
    _, experts, wts = cm.fused_block(x, *w, **kw, routing=True)
    np.testing.assert_array_equal(experts.reshape(-1, 3), [[0, 1, 2]] * 6)
    np.testing.assert_allclose(wts, 1 / 3, rtol=1e-6)
    # two tied experts both inside the top-k: transformers picks the same pair
    router = np.array(_weights(block)[0])
    x2 = _x(1, SMALL["hidden"], 9)
    with torch.no_grad():
        _, _, hf = block.gate(torch.from_numpy(x2.reshape(1, -1)))
    top = int(hf[0, 0])
    router[(top + 1) % SMALL["experts"]] = router[top]  # the first choice now has a twin
    block.gate.weight.data = torch.from_numpy(router)
    with torch.no_grad():
        _, _, hf = block.gate(torch.from_numpy(x2.reshape(1, -1)))
    _, experts, _ = cm.fused_block(x2, mx.array(router), *_weights(block)[1:], **kw, routing=True)
    assert sorted(experts.reshape(-1)[:2].tolist()) == sorted([top, (top + 1) % SMALL["experts"]])
    np.testing.assert_array_equal(np.sort(experts.reshape(1, -1), -1), np.sort(hf.numpy(), -1))


def test_gemma4_ties_go_to_the_lower_expert():
    """Gemma 4's routing under ties: the lower expert first (the op path's order), each
    tied weight renormalised alike and then times its own expert's scale; the routing and
    output as the separate ops'."""
    router, routed = _gemma(13, **SMALL)
    w, scale = _gemma_weights(router, routed)
    w = list(w)
    proj = np.array(w[0])
    proj[[6, 8, 9]] = proj[4]  # experts 4, 6, 8 and 9 tie
    w[0] = mx.array(proj)
    x, n = _x(6, SMALL["hidden"], 14), _x(6, SMALL["hidden"], 15)
    x[:3, 0] = proj[4] * 40.0 / np.linalg.norm(proj[4])  # rows along the tied router row
    r = _gemma_router_input(router, x)
    kw = dict(top_k=3, normalize=True, kind="gelu_tanh")
    got, experts, wts = cm.fused_block(n, *w, r, scale, **kw, routing=True)
    want, want_experts = _ops(n, w, r, scale, **kw)
    np.testing.assert_array_equal(experts, want_experts)
    _close(got, want)
    np.testing.assert_array_equal(experts[:3, 0], [[4, 6, 8]] * 3)
    s = np.asarray(scale)
    base = wts[:3, 0] / s[[4, 6, 8]]
    np.testing.assert_allclose(base, 1 / 3, rtol=1e-6)
    w[0] = mx.zeros_like(w[0])  # all tied: experts 0, 1, 2, a third each times its scale
    _, experts, wts = cm.fused_block(n, *w, r, scale, **kw, routing=True)
    np.testing.assert_array_equal(experts.reshape(-1, 3), [[0, 1, 2]] * 6)
    np.testing.assert_allclose(wts.reshape(-1, 3), np.broadcast_to(s[:3] / 3, (6, 3)), rtol=1e-6)


def test_bad_blocks_are_refused():
    """The kernel refuses a description that does not fit (top_k beyond the experts, a
    router of another width, a shared gate of two outputs) with -1, which the binding
    raises as a clear error; the IR rule refuses the same at compile time."""
    block = _hf_block(9, **SMALL)
    w = _weights(block)
    plan = cm._block_plan(w[0], w[1], w[2], w[3:], 3, True, "silu")
    assert plan is not None
    x = _x(2, SMALL["hidden"], 1)
    out = np.empty((2, SMALL["hidden"]), np.float32)
    idx, wts = np.empty((2, 11), np.int32), np.empty((2, 11), np.float32)  # room for the top_k tried below
    lib = cpu._get_lib()

    def run(p) -> int:
        return lib.vlmc_moe_block(ctypes.addressof(p), x.ctypes.data, 2, out.ctypes.data, idx.ctypes.data,
                                  wts.ctypes.data, 1)
    assert run(plan) == 0
    for field, sub, value in (("top_k", None, 11), ("top_k", None, 0), ("router", "N", 9), ("shared_gate", "N", 2),
                              ("shared_inter", None, 81)):
        bad = type(plan).from_buffer_copy(plan)
        setattr(getattr(bad, field), sub, value) if sub else setattr(bad, field, value)
        assert run(bad) == -1, field
    with pytest.raises(ValueError, match="moe_block rejected"):
        cm._check(run(bad), "moe_block")
    t = [TensorType((2, 1, 192), "float32"), TensorType((10, 192), "float32"), TensorType((10, 80, 192), "float32"),
         TensorType((10, 192, 40), "float32")]
    shared = [TensorType((160, 192), "float32"), TensorType((192, 80), "float32"), TensorType((1, 192), "float32")]
    assert OPS["moe_block"](t + shared, dict(top_k=3, normalize=True, kind="silu"))[0].shape == (2, 1, 192)
    with pytest.raises(ShapeError, match="top_k 11"):
        OPS["moe_block"](t, dict(top_k=11, normalize=True, kind="silu"))
    with pytest.raises(ShapeError, match="shared expert needs"):
        OPS["moe_block"](t + shared[:2], dict(top_k=3, normalize=True, kind="silu"))
    with pytest.raises(ShapeError, match="expert_scale"):
        OPS["moe_block"](t + [None] * 3 + [t[0], TensorType((9,), "float32")], dict(top_k=3, normalize=True,
                                                                                   kind="silu"))
    with pytest.raises(ShapeError, match="router input"):
        OPS["moe_block"](t + [None] * 3 + [TensorType((2, 1, 96), "float32")], dict(top_k=3, normalize=True,
                                                                                   kind="silu"))
    assert OPS["moe_block"](t + [None] * 3 + [t[0], TensorType((10,), "float32")],
                            dict(top_k=3, normalize=True, kind="silu"))[0].shape == (2, 1, 192)
    assert cm.fused_block(x, *w[:3], None, None, None, None, mx.ones((9,)), top_k=3, normalize=True,
                          kind="silu") is None  # scales for another expert count: the separate ops
    with pytest.raises(ShapeError, match="gate must be"):
        OPS["moe_block"](t + shared[:2] + [TensorType((2, 192), "float32")], dict(top_k=3, normalize=True, kind="silu"))
