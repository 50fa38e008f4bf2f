"""Qwen3.5 (dense, hybrid linear attention) against transformers, on the tiny checkpoints
of ``tests/fixtures/qwen3_5.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' processor, patches within
1e-5, float32 logits within 1e-4 at the last prompt position and at each of 16 greedy
steps, the 16 greedy tokens identical: text, one image, two images, an image in an earlier
turn, both config layouts. Then the hybrid stack layer by layer against transformers'
recurrent (token by token) and chunked forms, chunked prefill, ragged batches equal to
serial runs, greedy decoding with prompt-lookup drafts equal to without (verify steps
rewound through the recurrent states), the template's thinking default, the plan that
``vlmc inspect`` shows. Prefix caching over the recurrent states:
``test_prefix_cache_recurrent.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_5 as q35  # noqa: E402
from parity_kit import LOGIT_ATOL  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "multi_turn"]
CASES = kit.Cases()
build_prompt = CASES.prompt

store = kit.store_fixture(
    "qwen3_5", build=q35.build_qwen3_5_checkpoint, cases=CASES,
    hf=lambda info: (q35.hf_processor(info["path"]), q35.hf_model(info["path"])),
    reference=lambda info, *a, **kw: q35.hf_reference(info["path"], *a, **kw))


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parity(store, case):
    info = store.ckpt()
    m = store.vlm(info)
    kit.assert_parity(m, build_prompt(m, case), store.ref(info, case), f"qwen3_5/{case}", pixels=kit.check_patches)


def test_v4_layout(store):
    info = store.ckpt(layout="v4")
    ref = store.ref(store.ckpt(), "one_image")  # the same weights (seed 0)
    m = store.vlm(info)
    kit.check_generation(m, build_prompt(m, "one_image"), ref, "qwen3_5/v4/one_image")


# ------------------------------------------------------------------------------ the hybrid stack


def _hf_logits_token_by_token(model, ids):
    """transformers' recurrent form: one token at a time through its cache (the linear
    layers' recurrent kernel and conv update), logits after every token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            # explicit positions: the model keeps the last image prompt's M-RoPE delta otherwise
            out.append(model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache,
                             use_cache=True).logits[0, -1].numpy())
    return np.stack(out)


def test_hybrid_layers_step_by_step_match_transformers_recurrent_and_chunked(store):
    """Every prompt position's logits, prefilled one column at a time (the delta rule's step
    form) and in chunks of 5 (its chunked form, carried across chunks with the conv
    state), against transformers' token-by-token recurrent form and its chunked form
    (the whole prompt at once, no cache)."""
    from vlmc.runtime.step import Sequences

    info = store.ckpt()
    _, model = store.hf_pair(info)
    m = store.vlm(info)
    p = m.build_prompt("Tell me a short story about the river and the old mill by the bridge.")
    ids = torch.tensor([p.ids])
    recurrent = _hf_logits_token_by_token(model, ids)
    with torch.no_grad():
        chunked = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0].numpy()
    assert float(np.abs(recurrent - chunked).max()) <= LOGIT_ATOL
    for chunk in (1, 5):
        seqs = Sequences.start(m.decoder, [m.prompt_inputs(p, None)])
        rows, ends = [], []
        while not seqs.prefill_done:
            rows.append(np.array(seqs.prefill(chunk)[0]))
            ends.append(seqs.prefilled - 1)
        assert len(rows) == -(-len(p.ids) // chunk)
        for want in (recurrent, chunked):
            diff = float(np.abs(np.stack(rows) - want[ends]).max())
            assert diff <= LOGIT_ATOL, f"chunk {chunk}: {diff}"


def test_batched_prompts_equal_serial(store):
    """Two different prompts (one with an image, left padding for the shorter) batched
    through prefill and decode give what each gives alone; padding columns never reach a
    recurrent state."""
    m = store.vlm(store.ckpt())
    names = ("one_image", "text")
    kit.check_batched_matches_single(m, [build_prompt(m, c) for c in names], names, "qwen3_5/batch")


def test_batching_loop_joins_and_keeps_rows(store):
    """The batching loop (chunked prefills joining a running batch, finished rows dropped)
    gives one-at-a-time outputs."""
    from vlmc.runtime.batcher import Batcher

    m = store.vlm(store.ckpt())
    image = ck.make_test_image(100, 70, seed=10)
    prompts = [m.build_prompt("Describe the picture.", images=[image]), m.build_prompt("Tell me about shapes"),
               m.build_prompt("circle square " * 12)]
    jobs = [dict(prompt=p, max_tokens=5 + 4 * i) for i, p in enumerate(prompts)]
    batcher = Batcher(m, max_batch=8, prefill_chunk=16)
    try:
        alone = [kit.run_jobs(batcher, [j], timeout=300)[0][0] for j in jobs]
        together, _ = kit.run_jobs(batcher, jobs * 2, timeout=300)
    finally:
        batcher.shutdown()
    assert together == alone * 2
    assert batcher.counters["decode_steps"] < batcher.counters["batched_tokens"]


@pytest.mark.parametrize("options", [{}, {"quantize": "q4"}], ids=["f32", "q4"])
def test_decode_fast_paths_are_the_ops_within_rounding(store, options, monkeypatch):
    """The cpu fast paths take every decode step's layers: the Gated DeltaNet layers (one C
    call per run of consecutive such layers: layer 0, then layers 2-3; their prompt chunks
    too, ``vlmc_deltanet_prompt``) and the gated
    full-attention layers (``decode_layer`` with partial rotary and the output gate; layers
    1 and 4). A batch of an image prompt and a text prompt decodes the op-by-op artifact's
    greedy tokens (``--no-fuse decode_layer``), its logits within float32 rounding."""
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.runtime.sampling import Sampler, SamplingParams
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    info = store.ckpt()
    fast, plain = store.vlm(info, **options), store.vlm(info, no_fuse=("decode_layer",), **options)
    from vlmc.kernels.step_rows import in_prompt
    ran = {"_deltanet_layers": [], "_decode_layers": []}
    prompt_calls = []  # the DeltaNet stacks' prompt chunks (``vlmc_deltanet_prompt``)
    for name, got in ran.items():
        def counted(*a, _real=getattr(cpu_ops, name), _got=got, _name=name, **k):
            out = _real(*a, **k)
            (prompt_calls if in_prompt() and _name == "_deltanet_layers" else _got).append(out is not None)
            return out
        monkeypatch.setattr(cpu_ops, name, counted)
    steps, outs = 12, []
    for m in (fast, plain):
        for got in (*ran.values(), prompt_calls):
            got.clear()
        prompts = [build_prompt(m, "one_image"), m.build_prompt("Tell me a short story about the river.")]
        got = list(m.generate_steps(prompts, Sampler(SamplingParams()), steps))
        outs.append((np.stack([np.asarray(t) for t, _ in got]), np.stack([np.array(lg) for _, lg in got])))
        for calls in ran.values():  # two stack calls of each kind per decode step, none in the plain model
            assert calls.count(True) == (2 * (steps - 1) if m is fast else 0), ran
        assert prompt_calls.count(True) == (len(prompt_calls) if m is fast else 0) and (m is plain or prompt_calls)
    assert np.array_equal(outs[0][0], outs[1][0])
    diff = float(np.abs(outs[0][1] - outs[1][1]).max())
    assert 0 < diff <= 1e-5 * max(1.0, float(np.abs(outs[1][1]).max())), diff


def test_speculation_is_lossless(store):
    """Greedy output with drafts is the output without them. Prompt lookup, and the model
    drafting for itself (its own hybrid caches rewound over several decode steps), through
    the engine's loop; and in the batching loop a drafter that proposes the right
    continuation with every third token wrong, so verify steps keep some tokens and
    reject others, two rows at a time: the recurrent states are rewound within a step
    (restored, then recomputed over the kept tokens)."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.speculative import Draft, Drafter, Speculation

    m = store.vlm(store.ckpt())
    cases = [dict(prompt="the river runs by the mill and the mill turns by the river " * 3),
             dict(prompt="Describe the picture.", images=[ck.make_test_image(100, 70, seed=3)])]
    plain = [m.generate(max_tokens=24, **case).token_ids for case in cases]
    for case, want in zip(cases, plain):
        for draft in ("prompt-lookup", m):
            assert m.generate(max_tokens=24, draft=draft, **case).token_ids == want, (draft, case)

    prompts = [m.build_prompt(**case) for case in cases]
    answers = {tuple(p.ids): want for p, want in zip(prompts, plain)}

    class HalfRight(Drafter):
        name = "half-right"

        def start(self, prompt_ids, prompt=None, target=None):
            return list(prompt_ids)

        def propose(self, state, context, k, sampler=None, rng=None):
            done = len(context) - len(state)
            truth = answers[tuple(state)][done:done + k]
            return Draft([t if (done + i) % 3 != 2 else (t + 1) % 400 for i, t in enumerate(truth)])

    batcher = Batcher(m, speculation=Speculation(HalfRight(), num_draft_tokens=4, adaptive=False))
    try:
        got, _ = kit.run_jobs(batcher, [dict(prompt=p, max_tokens=24) for p in prompts], timeout=300)
    finally:
        batcher.shutdown()
    assert got == plain
    c = batcher.counters
    assert c["draft_proposed"] > c["draft_accepted"] > 0 and c["speculative_steps"] > 0


# ------------------------------------------------------------------------------ template, plan


def test_thinking_is_on_by_default(store):
    """The template opens a think block unless enable_thinking is false, as transformers
    renders it."""
    info = store.ckpt()
    proc, _ = store.hf_pair(info)
    m = store.vlm(info)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    on = m.build_prompt(messages=messages)
    off = m.build_prompt(messages=messages, template_vars={"enable_thinking": False})
    assert on.text.endswith("<|im_start|>assistant\n<think>\n")
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.text == proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert off.text == proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                enable_thinking=False)


def test_server_follows_the_templates_thinking_default(store):
    """A chat request that does not say enable_thinking, to a server that does not either,
    thinks as Qwen3.5's template does by default: the reply is split into reasoning_content
    and content, and a thinking budget applies; enable_thinking: false (request or server)
    renders the closed empty block and leaves the reply whole."""
    from vlmc.runtime.prefix_cache import PrefixCache
    from vlmc.runtime.vision_cache import VisionFeatureCache
    from vlmc.serve.jobs import Settings, draft_chat, plan_chat
    from vlmc.serve.models import Resident
    from vlmc.serve.parsers import OutputParser
    from vlmc.serve.protocol import ChatCompletionRequest

    resident = Resident("m", store.vlm(store.ckpt()), None, VisionFeatureCache(), PrefixCache())
    reply = "the user greets me</think>\n\nHello!"

    def plan(settings=Settings(), **extra):
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], **extra)
        return plan_chat(resident, req, settings, draft_chat(resident, req, settings), [])

    default = plan()
    assert default.prompt.text.endswith("<think>\n") and default.parser["starts_in_thinking"]
    out = OutputParser(**default.parser)
    out.feed(reply)
    out.finish()
    got = out.result()
    assert (got.reasoning_content, got.content) == ("the user greets me", "Hello!")
    assert plan(thinking_budget=4).thinking is not None
    for off in (plan(enable_thinking=False), plan(Settings(enable_thinking=False))):
        assert off.prompt.text.endswith("<think>\n\n</think>\n\n") and not off.parser["thinking"]
        assert off.thinking is None


def test_plan_and_inspect_show_recurrent_states(store):
    """kv_layout plans a recurrent state per linear-attention layer (bytes per sequence)
    beside the full-attention layers' KV caches; the manifest lists every decoder layer's
    cache in order and ``vlmc inspect`` shows both kinds; KV options reach only the
    full-attention layers."""
    import json

    from click.testing import CliRunner

    from vlmc.cli import main

    info = store.ckpt()
    art = store.artifact(info)
    manifest = json.loads((Path(art) / "manifest.json").read_text())
    layers = manifest["kv_plan"]["decoder"]
    assert [L["kv"]["layout"] for L in layers] == ["recurrent", "dense", "recurrent", "recurrent", "dense"]
    per_seq = (4 * 16 * 16) * 4 + 3 * (2 * 2 * 16 + 4 * 16) * 4
    assert {L["kv"]["bytes_per_sequence"] for L in layers if L["kv"]["layout"] == "recurrent"} == {per_seq}
    assert manifest["meta"]["kv_plan"]["bytes_per_sequence"] == 3 * per_seq
    out = CliRunner().invoke(main, ["inspect", str(art)]).output
    assert "recurrent state 4x16x16 + conv 3" in out and f"{per_seq:,} B/sequence" in out
    q = vlmc.load(art, kv_bits=8, kv_quantize_last=True)
    assert [L["kv"]["layout"] for L in q.kv_layers] == ["recurrent", "quantized", "recurrent", "recurrent",
                                                        "quantized"]
    p = q.build_prompt("Tell me a short story about the river.")
    assert len(q.generate(prompt="Tell me a short story about the river.", max_tokens=4).token_ids) == 4
    assert p.ids


@pytest.mark.parametrize("kind", ["full_attention", "linear_attention"])
def test_blocks_match_transformers_decoder_layers(store, kind):
    """Each compiled block against transformers' decoder layer of that kind on the same
    hidden states: the gated full-attention layer (output gate, QK-norm, partial
    interleaved M-RoPE) with its causal mask, and the Gated DeltaNet layer (conv, delta
    rule, gated norm) from a fresh state."""
    from vlmc.kernels import reference
    from vlmc.runtime.kv_cache import KVCache, attention_mask
    from vlmc.runtime.state_cache import StateCache

    info = store.ckpt()
    _, model = store.hf_pair(info)
    m = store.vlm(info)
    layer = q35.LAYER_TYPES.index(kind)
    n = 9
    x = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(n)[None, None].expand(3, 1, n)
    lm = model.model.language_model
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = lm.layers[layer](x, position_embeddings=lm.rotary_emb(x, pos),
                                attention_mask=causal if kind == "full_attention" else None).numpy()
    block = "text_attn_layer" if kind == "full_attention" else "text_linear_layer"
    run = getattr(m.model, block)
    table = run.__globals__[block.upper()]
    local = next(i for i, row in enumerate(table) if row["layer"] == layer)
    cos, sin = reference.rope_freqs(mx.array(pos.numpy()), kind="mrope_interleaved", dim=8, theta=100.0,
                                    sections=[2, 1, 1])
    cache = KVCache(1, 2, 16) if kind == "full_attention" else StateCache(1)
    mask = attention_mask(mx.zeros(1, mx.int32), 0, n, True)
    got = run(getattr(m.model, f"{block}_params")[local], table[local], mx.array(x.numpy()), cos, sin, mask, cache)
    np.testing.assert_allclose(np.asarray(got), want, atol=LOGIT_ATOL, rtol=0)


def test_bench_and_long_context_report(store):
    """``vlmc bench`` runs a hybrid artifact (its cache memory counts the states)."""
    from vlmc.bench import bench, format_report

    info = store.ckpt()
    art = store.artifact(info)
    r = bench(str(art), prompt_lengths=[8], decode_tokens=4, image_size=64, runs=1)
    assert r["family"] == "qwen3_5" and r["decode"]["decode_tps"] > 0 and "image" in r
    assert "qwen3_5" in format_report(r)
