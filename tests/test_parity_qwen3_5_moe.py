"""Qwen3.5-MoE against transformers, on the tiny checkpoints of
``tests/fixtures/qwen3_5_moe.py`` (8 routed experts, 2 per token, a gated shared expert).

Parity as ``test_parity_qwen3_5.py``: prompt ids, float32 logits within 1e-4 at the last
prompt position and at each of 16 greedy steps, the 16 greedy tokens identical (text, one
image, an image in an earlier turn; both config layouts and both expert layouts). The MoE
ops against transformers' sparse block (float and q4/q8 expert weights); every layer's
routing identical to transformers' router on the prompts' tokens; a decode step reads
only the routed experts; q4/q8 weights run and stay close; batching equals serial runs;
bytes read per decode token against the dense equivalent.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_5 as q35  # noqa: E402
from fixtures import qwen3_5_moe as qm  # noqa: E402
from parity_kit import LOGIT_ATOL, run_vlmc  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

CASE_NAMES = ["text", "one_image", "multi_turn"]
CASES = kit.Cases()
_case, build_prompt = CASES.inputs, CASES.prompt

store = kit.store_fixture(
    "qwen3_5_moe", build=qm.build_qwen3_5_moe_checkpoint, cases=CASES,
    hf=lambda info: (q35.hf_processor(info["path"]), qm.hf_model(info["path"])),
    reference=lambda info, *a, **kw: qm.hf_reference(info["path"], *a, **kw))


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parity(store, case):
    info = store.ckpt()
    m = store.vlm(info)
    kit.assert_parity(m, build_prompt(m, case), store.ref(info, case), f"qwen3_5_moe/{case}", pixels=kit.check_patches)


@pytest.mark.parametrize("kw", [dict(layout="v4"), dict(experts="fused")], ids=["v4", "fused_experts"])
def test_other_layouts(store, kw):
    """The hub's v4 config layout and transformers' fused expert stacks: the same weights
    (seed 0), the same outputs."""
    info = store.ckpt(**kw)
    ref = store.ref(store.ckpt(), "one_image")
    m = store.vlm(info)
    kit.check_generation(m, build_prompt(m, "one_image"), ref, f"qwen3_5_moe/{kw}/one_image")


# ------------------------------------------------------------------------------ the MoE ops


def _sparse_block(store, layer=0):
    _, model = store.hf_pair(store.ckpt())
    return model.model.language_model.layers[layer].mlp


def _stacked(block):
    return (mx.array(block.experts.gate_up_proj.detach().numpy()), mx.array(block.experts.down_proj.detach().numpy()))


def _quantized(w: mx.array, scheme: str):
    """Stacked [E, out, in] weights quantized as MLX packs them (groups of 32 along ``in``)."""
    from vlmc.kernels.quant import QuantWeight
    if scheme == "mxfp4":
        codes, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        return QuantWeight(codes, scales, None, 4, 32, "mxfp4")
    bits = int(scheme[1:])
    codes, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    return QuantWeight(codes, scales, biases, bits, 32, "affine")


def _dequantized(q) -> mx.array:
    return mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits, mode=q.mode)


def _moe_forward(ops, block, x, gate_up, down):
    """The block's IR ops (as ``common/moe.py`` emits them) in op library ``ops``."""
    p = {k: mx.array(v.detach().numpy()) for k, v in block.named_parameters() if not k.startswith("experts.")}
    weights, experts = ops.moe_route(ops.linear(x, p["gate.weight"]), top_k=qm.TOP_K, normalize=True)
    name = "moe_experts" if isinstance(gate_up, mx.array) else "qmoe_experts"
    y = getattr(ops, name)(x, weights, experts, gate_up, down, kind="silu")
    s = ops.linear(ops.glu(ops.linear(x, p["shared_expert.gate_proj.weight"]),
                           ops.linear(x, p["shared_expert.up_proj.weight"]), kind="silu"),
                   p["shared_expert.down_proj.weight"])
    g = ops.act(ops.linear(x, p["shared_expert_gate.weight"]), kind="sigmoid")
    return np.asarray(ops.result(ops.add(y, ops.mul(s, g)))), np.asarray(experts)


@pytest.mark.parametrize("library", ["reference", "cpu_ops"])
def test_moe_ops_match_transformers_sparse_block(store, library):
    """moe_route + moe_experts + the gated shared expert against transformers' sparse MoE
    block on random hidden states (a batch of 2 x 7 tokens): the same experts chosen, the
    output within 1e-5."""
    from vlmc.kernels import cpu_ops, reference
    ops = {"reference": reference, "cpu_ops": cpu_ops}[library]
    block = _sparse_block(store)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = block(x).numpy()
        _, _, hf_experts = block.gate(x.reshape(-1, 64))
    got, experts = _moe_forward(ops, block, mx.array(x.numpy()), *_stacked(block))
    np.testing.assert_array_equal(np.sort(experts.reshape(-1, qm.TOP_K), -1), np.sort(hf_experts.numpy(), -1))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["q4", "q8", "mxfp4"])
@pytest.mark.parametrize("library", ["reference", "cpu_ops"])
def test_quantized_experts_compute_their_dequantized_weights(store, library, scheme):
    """qmoe_experts over stacked experts quantized per expert (group 32; affine 4 and 8
    bits, mxfp4) equals moe_experts over the same weights dequantized, through gather_qmm
    (reference) and the per-expert compact-weight kernels (cpu_ops)."""
    from vlmc.kernels import cpu_ops, reference
    ops = {"reference": reference, "cpu_ops": cpu_ops}[library]
    block = _sparse_block(store, layer=1)
    gate_up, down = (_quantized(w, scheme) for w in _stacked(block))
    assert gate_up.scales.shape == (qm.EXPERTS, 2 * qm.EXPERT_DIM, 64 // 32)
    x = mx.array(np.random.default_rng(3).standard_normal((1, 5, 64)).astype(np.float32))
    got, _ = _moe_forward(ops, block, x, gate_up, down)
    want, _ = _moe_forward(reference, block, x, _dequantized(gate_up), _dequantized(down))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_moe_route_with_and_without_renormalisation():
    """moe_route's weights are the top-k softmax probabilities (most probable first),
    renormalised only when asked (Qwen3.5-MoE always is; Qwen3-MoE's ``norm_topk_prob``)."""
    from vlmc.kernels import reference

    logits = mx.array(np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32))
    probs = np.asarray(mx.softmax(logits, axis=-1))
    want = np.argsort(-probs, axis=-1)[..., :3]
    for normalize in (True, False):
        w, e = reference.moe_route(logits, top_k=3, normalize=normalize)
        np.testing.assert_array_equal(np.asarray(e), want)
        top = np.take_along_axis(probs, want, axis=-1)
        np.testing.assert_allclose(np.asarray(w), top / top.sum(-1, keepdims=True) if normalize else top, rtol=1e-6)


def test_refused_and_misshapen_checkpoints(store, tmp_path):
    """A config asking for un-renormalised routing is refused, and an expert tensor of the
    wrong shape is named, each in one error."""
    import shutil

    from vlmc.errors import UnsupportedModelError, WeightError

    src = Path(store.ckpt()["path"])
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["norm_topk_prob"] = False
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="renormalised"):
        vlmc_compile(bad, tmp_path / "a1", target="cpu")
    cfg["text_config"]["norm_topk_prob"] = True
    cfg["text_config"]["moe_intermediate_size"] = 2 * qm.EXPERT_DIM
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match=r"mlp\.experts\.0\.gate_proj\.weight"):
        vlmc_compile(bad, tmp_path / "a2", target="cpu")


def test_moe_shape_rules():
    from vlmc.ir.core import TensorType as T
    from vlmc.ir.ops import OPS, ShapeError

    w, e = OPS["moe_route"]([T(("B", "L", 8), "float32")], {"top_k": 2})
    assert w == T(("B", "L", 2), "float32") and e == T(("B", "L", 2), "int32")
    with pytest.raises(ShapeError):
        OPS["moe_route"]([T(("B", "L", 8), "float32")], {"top_k": 9})
    args = [T(("B", "L", 64), "float32"), w, e, T((8, 128, 64), "float32"), T((8, 64, 64), "float32")]
    assert OPS["moe_experts"](args, {"kind": "silu"}) == [args[0]]
    with pytest.raises(ShapeError):  # gate_up must be twice the down projection's inputs
        OPS["qmoe_experts"](args[:3] + [T((8, 96, 64), "float32"), args[4]], {"kind": "silu"})
    with pytest.raises(ShapeError):
        OPS["moe_experts"](args[:3] + [args[3], T((4, 64, 64), "float32")], {"kind": "silu"})


# ------------------------------------------------------------------------------ routing


def _record_routes(monkeypatch, ops_module):  # (a MonkeyPatch or one of its contexts)
    """Every moe_route call's (router logits, experts), in call order."""
    seen = []
    original = ops_module.moe_route

    def recording(logits, **kw):
        w, e = original(logits, **kw)
        seen.append((np.asarray(logits), np.asarray(e)))
        return w, e
    monkeypatch.setattr(ops_module, "moe_route", recording)
    return seen


@pytest.mark.parametrize("case", ["text", "one_image"])
def test_routing_matches_transformers_router(store, monkeypatch, case):
    """For every prompt token (image tokens included) and every layer, the experts vlmc's
    prefill routes to are the ones transformers' router picks, its router logits within
    1e-4 of transformers'; the fixture's top-k choice is clear of near-ties (a
    precondition: every token's k-th and (k+1)-th logits more than twice the router logits'
    measured difference apart, so the same choices follow from the logits, not from luck)."""
    from vlmc.kernels import cpu_ops
    from vlmc.runtime.step import Sequences

    info = store.ckpt()
    proc, model = store.hf_pair(info)
    m = store.vlm(info)
    messages, images = _case(case)
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=images or None, return_tensors="pt")
    routers = [layer.mlp.gate for layer in model.model.language_model.layers]
    want, margins, hooks = [], [], []
    for r in routers:
        def hook(mod, args, out):
            logits = torch.nn.functional.linear(args[0].reshape(-1, mod.weight.shape[1]), mod.weight)
            ranked = logits.sort(-1, descending=True).values
            margins.append(float((ranked[:, qm.TOP_K - 1] - ranked[:, qm.TOP_K]).min()))
            want.append((logits.numpy(), out[2].numpy()))
        hooks.append(r.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    seen = _record_routes(monkeypatch, cpu_ops)
    p = build_prompt(m, case)
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p, None)])
    while not seqs.prefill_done:
        seqs.prefill(len(p.ids))
    assert len(seen) == len(routers) == len(q35.LAYER_TYPES)
    err = max(float(np.abs(got.reshape(hf.shape) - hf).max()) for (got, _), (hf, _) in zip(seen, want))
    assert err <= LOGIT_ATOL, f"router logits differ by {err}"
    # a precondition on the fixture: with every logit within err of transformers', a gap above
    # 2 err between each token's k-th and (k+1)-th logits keeps the same top-k set. (The
    # measured err moves with the machine's kernels: 6.3e-5 on an AVX-512 Xeon, where the
    # closest gap is 6.2e-4.)
    assert min(margins) > 2 * err, f"near-tie in the fixture's routing: {margins} (router logits differ by {err})"
    for layer, ((_, got), (_, hf)) in enumerate(zip(seen, want)):
        np.testing.assert_array_equal(np.sort(got.reshape(-1, qm.TOP_K), -1), np.sort(hf, -1),
                                      err_msg=f"layer {layer}: experts differ")


def test_decode_reads_only_the_routed_experts(store, monkeypatch):
    """A decode step of two sequences takes the one-call MoE block in each MoE layer, and
    reads only the experts its router chose for them (at most 2 x top_k of the 8): with
    every other expert's weights NaN the step's output is the same, bit for bit."""
    from vlmc.kernels import cpu_ops
    from vlmc.kernels.cpu import moe as cpu_moe

    m = store.vlm(store.ckpt())
    prompts = [build_prompt(m, "text"), m.build_prompt("circle square " * 5)]
    ran: list[tuple[set, bool]] = []
    original = cpu_moe.fused_block

    def poisoned(x, router, gate_up, down, *shared, **kw):
        got = original(x, router, gate_up, down, *shared, routing=True, **kw)
        if got is None:
            return None
        out, experts, _ = got
        if np.asarray(x).reshape(-1, 64).shape[0] == 2:  # a decode step of both rows
            routed = set(experts.reshape(-1).tolist())
            keep = mx.array([e in routed for e in range(qm.EXPERTS)])[:, None, None]
            bad = original(x, router, mx.where(keep, gate_up, mx.nan), mx.where(keep, down, mx.nan), *shared, **kw)
            ran.append((routed, np.array_equal(bad, out)))
        return out
    monkeypatch.setattr(cpu_ops, "_fused_block", poisoned)
    run_vlmc(m, prompts, steps=3)
    assert len(ran) == 2 * len(q35.LAYER_TYPES)  # decode steps 2 and 3 (step 1 ends the prefill)
    for routed, same in ran:
        assert same and len(routed) <= 2 * qm.TOP_K < qm.EXPERTS


def test_lower_makes_each_moe_block_one_op(store):
    """On the cpu target ``lower`` turns each MoE layer's router, routing, routed experts
    and gated shared expert into one ``moe_block`` op (``--no-fuse decode_layer`` keeps the
    ops): greedy tokens identical and logits within 1e-5 of the op-by-op artifact's over
    two sequences' decode steps. Wiring it does not know stays as it is: router logits
    read elsewhere (no rewrite), a shared gate other than a sigmoid (the routed part only)."""
    import copy
    from vlmc.ir.serialize import from_json
    from vlmc.passes.moe_path import fuse_moe_blocks

    info = store.ckpt()
    fused, plain = store.artifact(info), store.artifact(info, no_fuse=("decode_layer",))
    src = (Path(fused) / "model.py").read_text()
    assert src.count("ops.moe_block(") == 2 and "moe_route" not in src and "moe_experts" not in src
    assert "moe_block" not in (Path(plain) / "model.py").read_text()
    m = store.vlm(info)
    prompts = [build_prompt(m, "text"), m.build_prompt("circle square " * 5)]
    toks, logits = run_vlmc(m, prompts, steps=8)
    ref_toks, ref_logits = run_vlmc(store.vlm(info, no_fuse=("decode_layer",)), prompts, steps=8)
    np.testing.assert_array_equal(toks, ref_toks)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
    prog = from_json(json.loads((Path(fused) / "program.json").read_text()))  # before lowering
    body = next(b.body for b in prog.blocks.values() if any(op.op == "moe_route" for op in b.body.ops))
    assert fuse_moe_blocks(copy.deepcopy(body)) == 1
    read_elsewhere = copy.deepcopy(body)
    read_elsewhere.outputs.append(next(op for op in read_elsewhere.ops if op.op == "moe_route").inputs[0])
    assert fuse_moe_blocks(read_elsewhere) == 0
    other_gate = copy.deepcopy(body)
    next(op for op in other_gate.ops if op.op == "act" and op.attrs.get("kind") == "sigmoid").attrs["kind"] = "tanh"
    assert fuse_moe_blocks(other_gate) == 1
    block = next(op for op in other_gate.ops if op.op == "moe_block")
    assert len(block.inputs) == 4 and any(op.op == "glu" for op in other_gate.ops)


# ------------------------------------------------------------------------------ weights, batching


def _routed_trace(monkeypatch, m, prompt, sampler, steps, forced_routes=None):
    """quality._trace (the next-token log-probs of each step) and every moe_route call's
    experts in call order. ``forced_routes``: the experts each call must choose instead
    (a reference trace's, in the same call order), weighted by this model's own router
    probabilities of them."""
    from vlmc.kernels import cpu_ops
    from vlmc.quality import _trace

    with monkeypatch.context() as mp:
        # decode steps through the separate ops, whose moe_route can be recorded and forced
        # (the one-call MoE block routes in C)
        mp.setattr(cpu_ops, "_fused_block", lambda *a, **kw: None)
        if forced_routes is not None:
            calls = iter(forced_routes)

            def forced(logits, *, top_k, normalize=True):
                experts = mx.array(next(calls))
                probs = mx.softmax(mx.array(np.asarray(logits)).astype(mx.float32), axis=-1)
                w = mx.take_along_axis(probs, experts.reshape(*probs.shape[:-1], top_k), axis=-1)
                return w / mx.sum(w, axis=-1, keepdims=True), experts
            mp.setattr(cpu_ops, "moe_route", forced)
        seen = _record_routes(mp, cpu_ops)
        toks, logps = _trace(m, prompt, sampler, steps)
    return toks, logps, [e for _, e in seen]


def _kls(ref_lp, lp) -> list[float]:
    return [float(np.sum(np.exp(r) * (r - c))) for r, c in zip(ref_lp, lp)]


FLAT = 0.25


def test_quantized_weights_run_and_stay_close(store, monkeypatch):
    """Compiled with q8 and q4 weights (group 64): the stacked experts are stored quantized
    per expert ([experts, out, in / 64] scales and biases), the routers stay float.

    Judged teacher-forced (``vlmc.quality``: float32's 16 greedy tokens fed to both, an
    image prompt and a text prompt). A routed model's output jumps wherever a rounding
    flips a near-tied routing choice, and on this fixture q8 already flips some in each
    prompt; so the weights are judged with the routing forced to float32's choices (each
    call's experts replayed, weighted by the quantized model's own router): q8 within the
    other families' q8 bound (mean KL < 0.02), its top-1 changes only at near-flat
    positions (float32's top token below ``FLAT`` probability: the fixture's random
    distributions are mostly that flat), q4 running and costing more (mean KL above q8's,
    below 1.5). Free-running, q8 stays below q4."""
    from vlmc.quality import _Forced
    from vlmc.runtime.sampling import Sampler, SamplingParams

    info = store.ckpt()
    base = store.vlm(info)
    prompts = [base.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=10)]),
               base.build_prompt("Tell me a short story about the river.")]
    traces = [_routed_trace(monkeypatch, base, p, Sampler(SamplingParams()), 16) for p in prompts]
    forced, free, agree, flips = {}, {}, {}, {}
    for scheme, bits in (("q8", 8), ("q4", 4)):
        q = store.vlm(info, quantize=scheme)
        manifest = json.loads((store.artifact(info, quantize=scheme) / "manifest.json").read_text())
        for layer in ("attn_layers.0", "linear_layers.2"):
            name = f"text.{layer}.mlp.experts.gate_up_proj"
            assert manifest["quantized"][name]["bits"] == bits
            assert manifest["tensors"][name + ".scales"]["shape"] == [qm.EXPERTS, 2 * qm.EXPERT_DIM, 1]
            assert manifest["tensors"][f"text.{layer}.mlp.experts.down_proj"]["shape"] == \
                [qm.EXPERTS, 64, qm.EXPERT_DIM * bits // 32]
            assert f"text.{layer}.mlp.gate.weight" not in manifest["quantized"]
        forced[scheme], free[scheme], agree[scheme], flips[scheme] = [], [], [], 0
        for p, (toks, ref_lp, ref_routes) in zip(prompts, traces):
            _, lp, _ = _routed_trace(monkeypatch, q, p, _Forced(toks), 16, forced_routes=ref_routes)
            forced[scheme] += _kls(ref_lp, lp)
            # top-1 disagreements, each with float32's probability of its own top token
            agree[scheme] += [float(np.exp(r.max())) for r, c in zip(ref_lp, lp) if np.argmax(r) != np.argmax(c)]
            _, lp, routes = _routed_trace(monkeypatch, q, p, _Forced(toks), 16)
            free[scheme] += _kls(ref_lp, lp)
            flips[scheme] += sum(int(np.sum(np.sort(a, -1) != np.sort(b, -1)) > 0)
                                 for a, b in zip(ref_routes, routes))
    summary = {s: dict(forced_kl=float(np.mean(forced[s])), top1_flips=len(agree[s]),
                       free_kl=float(np.mean(free[s])), route_calls_that_differ=flips[s]) for s in forced}
    assert np.mean(forced["q8"]) < 0.02, summary
    assert all(p < FLAT for p in agree["q8"]), (agree["q8"], summary)
    assert np.mean(forced["q8"]) < np.mean(forced["q4"]) < 1.5, summary
    assert np.mean(free["q8"]) < np.mean(free["q4"]) and np.all(np.isfinite(free["q4"])), summary


def test_speculation_is_lossless(store):
    """Greedy output with prompt-lookup drafts (verify steps routing several tokens at once,
    rejected ones rewound) is the output without them."""
    m = store.vlm(store.ckpt())
    prompt = "the river runs by the mill and the mill turns by the river " * 3
    want = m.generate(prompt=prompt, max_tokens=24).token_ids
    assert m.generate(prompt=prompt, max_tokens=24, draft="prompt-lookup").token_ids == want


def test_batched_prompts_equal_serial(store):
    """Two different prompts (one with an image, left padding for the shorter) batched
    through prefill and decode give what each gives alone: routing is per token."""
    m = store.vlm(store.ckpt())
    names = ("one_image", "text")
    kit.check_batched_matches_single(m, [build_prompt(m, c) for c in names], names, "qwen3_5_moe/batch")


def test_reference_op_library_matches_cpu_target(store):
    """An artifact for a GPU target, run here through the MLX reference ops (gather_mm over
    the stacked experts), gives the cpu target's greedy tokens and logits (within 1e-4);
    bfloat16 weights run on the cpu target and keep its first greedy token."""
    info = store.ckpt()
    cpu = store.vlm(info)
    p = build_prompt(cpu, "one_image")
    toks, logits = run_vlmc(cpu, [p], steps=8)
    ref = store.vlm(info, target="cuda")
    assert "from vlmc.kernels import gpu_ops as ops" in (store.artifact(info, target="cuda") / "model.py").read_text()
    t2, l2 = run_vlmc(ref, [build_prompt(ref, "one_image")], steps=8)
    np.testing.assert_array_equal(t2, toks)
    assert float(np.abs(l2 - logits).max()) <= LOGIT_ATOL
    bf16 = store.vlm(info, dtype="bfloat16")
    t3, l3 = run_vlmc(bf16, [build_prompt(bf16, "one_image")], steps=2)
    assert np.all(np.isfinite(l3)) and t3[0, 0] == toks[0, 0]


# ------------------------------------------------------------------------------ bytes per token

# Qwen/Qwen3.5-35B-A3B's text config (the published sizes; transformers' defaults)
QWEN3_5_35B_A3B = dict(hidden_size=2048, num_hidden_layers=40, num_experts=256, num_experts_per_tok=8,
                       moe_intermediate_size=512, shared_expert_intermediate_size=512)


def test_expert_bytes_per_token_of_a_published_config():
    """Routed + shared experts and routers per decode token against reading every expert,
    counted by hand from the config's sizes (bf16)."""
    from vlmc.models.common.moe import expert_bytes_per_token

    c = QWEN3_5_35B_A3B
    per_expert = 3 * c["moe_intermediate_size"] * c["hidden_size"] * 2
    shared = 3 * c["shared_expert_intermediate_size"] * c["hidden_size"] * 2
    router = (c["num_experts"] + 1) * c["hidden_size"] * 2
    got = expert_bytes_per_token(c)
    assert got["routed"] == c["num_hidden_layers"] * (8 * per_expert + shared + router)
    assert got["all_experts"] == c["num_hidden_layers"] * (256 * per_expert + shared + router)
    assert got["ratio"] == got["all_experts"] / got["routed"]
    q4 = expert_bytes_per_token(c, bits_per_weight=4.5)  # the router stays bf16
    assert q4["routed"] == c["num_hidden_layers"] * ((8 * per_expert + shared) * 4.5 / 16 + router)


def test_bench_roofline_counts_routed_experts_only(store):
    """``vlmc bench``'s roofline counts the stacked experts at top_k / experts of their bytes
    (the rest of the decoder in full)."""
    from vlmc.bench import weight_roofline

    info = store.ckpt()
    manifest = json.loads((store.artifact(info) / "manifest.json").read_text())
    roof = weight_roofline(manifest)
    experts = sum(4 * int(np.prod(t["shape"])) for n, t in manifest["tensors"].items() if ".mlp.experts." in n)
    assert experts > 0
    assert roof["routed_expert_bytes"] == experts * qm.TOP_K // qm.EXPERTS
    assert roof["all_expert_bytes"] == experts
    assert roof["decoder_bytes"] + roof["all_expert_bytes"] - roof["routed_expert_bytes"] == roof["dense_equivalent_decoder_bytes"]
