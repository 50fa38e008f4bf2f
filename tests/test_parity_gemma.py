"""Gemma 3 (``gemma3``, ``gemma3_text``) and PaliGemma against transformers, and everything
else a family must support, on the tiny checkpoints of ``tests/fixtures/gemma.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' processor (Gemma 3's
image sequences expanded in the text, PaliGemma's prompt format), pixels within 1e-5,
float32 logits within 1e-4 at the last prompt position and at each of 16 greedy steps,
the 16 greedy tokens identical; for both config layouts and weight namings, sharded and
bfloat16 checkpoints, and ragged batches. Then: the new IR ops against the transformers
modules they replace, the KV plan (sliding-window layers on rotating caches), quantized
weights and KV caches (judged by KL and top-1 agreement, as random fixtures allow), the
prefix and vision caches, the batching loop with image and text requests, ``vlmc serve``,
``vlmc bench`` and the errors these families add.

Gemma 3's image tokens attend to each other in both directions in every layer, sliding-
window layers included (transformers: AND(window, OR(causal, image block))): the step
loop adds the spans to the prefill mask and the rotating caches add only the window's
lower bound to it. PaliGemma 2 keeps its whole prefix visible across the sliding window
where the prefix is longer than the window (OR(AND(window, causal), prefix)), which a mask
built from the step mask and the window cannot express
(``test_paligemma2_prefix_longer_than_the_window``, strict xfail); the fixture's window
holds the test prompts, not their generated tokens.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import gemma as gm  # noqa: E402
from parity_kit import GREEDY_STEPS, IMG, _txt, _user  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402
from vlmc.runtime.kv_cache import RotatingKVCache  # noqa: E402

FAMILY_CASES = {
    "gemma3": ["text", "one_image", "two_images", "wide", "tall", "multi_turn"],
    "gemma3_text": ["text", "chat"],
    "paligemma": ["text", "one_image", "two_images", "wide", "tall"],
    "paligemma2": ["text", "one_image", "two_images", "wide"],
}
CASES = kit.Cases(chat=kit.CHAT)
_case, build_prompt = CASES.inputs, CASES.prompt
PARITY = [(f, c) for f, cases in FAMILY_CASES.items() for c in cases]

store = kit.store_fixture(
    "gemma", build=gm.build_gemma_checkpoint, cases=CASES,
    hf=lambda info: (gm.hf_processor(info["path"], info["family"]), gm.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: gm.hf_reference(info["path"], info["family"], *a, **kw))


def check_spans(m, p, ref):
    """The bidirectional spans are transformers' token types."""
    if ref["token_type_ids"] is not None:
        spans = m.inputs.attention_spans(p.ids, p.images)
        marked = np.zeros(len(p.ids), dtype=bool)
        for s, e in spans:
            marked[s:e] = True
        prefix_lm = m.meta["family"] == "paligemma"
        np.testing.assert_array_equal(marked, ref["token_type_ids"] == (0 if prefix_lm else 1))


def assert_parity(m, ref, case, what):
    kit.assert_parity(m, build_prompt(m, case), ref, what, also=check_spans)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{c}" for f, c in PARITY])
def test_parity(store, family, case):
    info = store.ckpt(family)
    ref = store.ref(info, case)
    assert_parity(store.vlm(info), ref, case, f"{family}/{case}")


def test_gemma3_images_keep_their_spans_in_sliding_window_layers(store):
    info = store.ckpt("gemma3")
    assert_parity(store.vlm(info), store.ref(info, "one_image"), "one_image", "gemma3/one_image, rotating caches")


def test_gemma3_expands_images_in_the_text(store):
    """The fixture's tokenizer merges newline runs, so expanding <start_of_image> by ids
    ("\\n" + "\\n\\n" as separate tokens) would not give transformers' ids: the parity of
    ids above depends on the text-level expansion."""
    m = store.vlm(store.ckpt("gemma3"))
    assert m.tokenizer.encode("\n\n\n") != m.tokenizer.encode("\n") + m.tokenizer.encode("\n\n")
    p = build_prompt(m, "one_image")
    boi = p.ids.index(m.inputs.boi_token_id)
    assert p.ids[boi - 1] != m.tokenizer.encode("\n\n")[0]  # "user\n" + "\n\n" merged


LAYOUTS = kit.LAYOUTS_AND_MODULE_NAMES


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_checkpoint_layouts(store, family, layout):
    """Same seed, other config layout / weight names / shards: the v5 checkpoint's
    transformers references apply."""
    kw = LAYOUTS[layout]
    base, info = kit.layout_checkpoints(store, kw, family)
    if kw.get("layout") == "v4" and not family.startswith("paligemma"):
        text = info["config"] if family == "gemma3_text" else info["config"]["text_config"]
        assert "layer_types" not in text and "rope_parameters" not in text and "rope_local_base_freq" in text
    m = store.vlm(info)
    for case in FAMILY_CASES[family]:
        assert_parity(m, store.ref(base, case), case, f"{family}/{layout}/{case}")


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_bfloat16_checkpoint(store, family):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt(family, dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    cases = [c for c in ("text", "wide", "chat") if c in FAMILY_CASES[family]]
    for case in cases:
        assert_parity(m32, store.ref(info, case), case, f"{family}/bf16-ckpt/{case}")
        kit.check_bf16_artifact(m32, m16, lambda m: build_prompt(m, case), f"{family}/{case}")


BATCHES = {
    "gemma3": [("two_images", "text"), ("multi_turn", "text", "one_image"), ("tall", "chat")],
    "paligemma": [("two_images", "text"), ("one_image", "text")],
    "paligemma2": [("two_images", "text")],
}


@pytest.mark.parametrize("family,batch", [(f, b) for f, bs in BATCHES.items() for b in bs],
                         ids=[f"{f}-{'+'.join(b)}" for f, bs in BATCHES.items() for b in bs])
def test_batched_matches_single(store, family, batch):
    """Ragged batches of image and text prompts (left padding moves every span)."""
    kit.check_batch_against_refs(store, store.ckpt(family), batch, f"{family}/batch")


# ------------------------------------------------------------------------------ the new IR ops


def test_gemma3_projector_ops_match_the_transformers_module():
    """avg_pool_tokens, then rms_norm with the folded 1 + w, then linear with the transposed
    weight: Gemma3MultiModalProjector (reference and cpu op libraries)."""
    import transformers as tf
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from vlmc.kernels import cpu_ops, reference

    cfg = tf.Gemma3Config(text_config=dict(hidden_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           num_hidden_layers=1, intermediate_size=32, vocab_size=64),
                          vision_config=dict(hidden_size=20, image_size=112, patch_size=14, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32), mm_tokens_per_image=4)
    proj = Gemma3MultiModalProjector(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        proj.mm_input_projection_weight.copy_(torch.randn(20, 24, generator=g))
        proj.mm_soft_emb_norm.weight.copy_(torch.randn(20, generator=g) * 0.3)
    x = torch.randn(3, 64, 20, generator=g)
    with torch.no_grad():
        want = proj(x).numpy()
    w_norm = mx.array(proj.mm_soft_emb_norm.weight.detach().numpy() + 1.0)
    w_proj = mx.array(proj.mm_input_projection_weight.detach().numpy().T.copy())
    for ops in (reference, cpu_ops):
        y = ops.avg_pool_tokens(mx.array(x.numpy()), grid=8, kernel=4)
        y = ops.linear(ops.rms_norm(y, w_norm, eps=1e-6), w_proj)
        np.testing.assert_allclose(np.asarray(ops.result(y)), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scale_and_softcap_match_transformers(dtype):
    """scale: Gemma3TextScaledWordEmbedding (sqrt(hidden) in the table's dtype); softcap: the
    logit soft-capping transformers' Gemma3ForCausalLM applies."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
    from vlmc.kernels import cpu_ops, reference

    tdt = getattr(torch, dtype)
    emb = Gemma3TextScaledWordEmbedding(50, 48, 0, embed_scale=48 ** 0.5).to(tdt)
    ids = torch.tensor([[3, 7, 49, 0]])
    with torch.no_grad():
        want = emb(ids).float().numpy()
    table = mx.array(emb.weight.detach().float().numpy()).astype(getattr(mx, dtype))
    got = reference.scale(reference.embedding(mx.array(ids.numpy()), table), 48 ** 0.5)
    assert got.dtype == table.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(mx.float32)), want)

    logits = torch.randn(2, 5, 40) * 30
    capped = (torch.tanh(logits / 20.0) * 20.0).numpy()
    for ops in (reference, cpu_ops):
        for x in (mx.array(logits.numpy()), logits.numpy()):  # MLX arrays and the cpu target's host arrays
            got = np.asarray(ops.result(ops.softcap(x, cap=20.0)))
            np.testing.assert_allclose(got, capped, rtol=0, atol=1e-5)
        host = cpu_ops.scale(logits.numpy(), 48 ** 0.5)
        np.testing.assert_array_equal(host, (logits * torch.tensor(48 ** 0.5)).numpy())


@pytest.mark.parametrize("dense_cache", [True, False], ids=["dense", "rotating"])
def test_softcapped_attention_matches_gemma2_eager_attention(dense_cache):
    """cached_attention with ``softcap``: transformers' eager Gemma 2 attention (scores
    scaled, soft-capped, masked, softmax in float32), grouped heads, a padded causal mask;
    the cpu op library, on host arrays too, gives the reference's numbers."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    from vlmc.kernels import cpu_ops, reference
    from vlmc.runtime.kv_cache import KVCache, attention_mask

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) * 3 for h in (4, 2, 2))
    starts = mx.array([0, 2], dtype=mx.int32)
    mask = attention_mask(starts, 0, 7, True)
    additive = torch.where(torch.from_numpy(np.array(mask)), 0.0, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.125, softcap=5.0)
    want = want.transpose(1, 2).numpy()
    for ops, host in ((reference, False), (cpu_ops, False), (cpu_ops, True)):
        cache = KVCache(2, 2, 16) if dense_cache else RotatingKVCache(2, 2, 16, window=64)
        args = [np.asarray(t.numpy()) if host else mx.array(t.numpy()) for t in (q, k, v)]
        out = np.asarray(ops.result(ops.cached_attention(*args, cache, mask, scale=0.125, softcap=5.0)))
        np.testing.assert_allclose(out[0], want[0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(out[1, :, 2:], want[1, :, 2:], rtol=0, atol=2e-5)  # past the padding


def test_rope_tables_match_gemma3_rotary_embedding():
    """rope_freqs for the local table (default) and the global one (linear scaling): the
    cos/sin of transformers' Gemma3RotaryEmbedding, in both op libraries."""
    import transformers as tf
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from vlmc.kernels import cpu_ops, reference

    cfg = tf.Gemma3TextConfig(head_dim=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1_000_000.0},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    rot = Gemma3RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 77, 1000, 4095]])
    for layer_type, attrs in (("full_attention", {"theta": 1_000_000.0, "factor": 8.0}),
                              ("sliding_attention", {"theta": 10000.0})):
        cos, sin = rot(torch.zeros(1), pos, layer_type)
        for ops in (reference, cpu_ops):
            c, s = ops.rope_freqs(mx.array(pos.numpy().astype(np.int32)), kind="default", dim=16, **attrs)
            np.testing.assert_allclose(np.asarray(ops.result(c))[:, 0], cos.numpy(), rtol=0, atol=2e-6)
            np.testing.assert_allclose(np.asarray(ops.result(s))[:, 0], sin.numpy(), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------ KV plan, quantization


def test_inspect_shows_the_sliding_window_layers_on_rotating_caches(store):
    from click.testing import CliRunner
    from vlmc.cli import main

    art = store.artifact(store.ckpt("gemma3"))
    manifest = json.loads((art / "manifest.json").read_text())
    kv = [L["kv"] for L in manifest["kv_plan"]["text_layer"]]
    assert kv[0]["layout"] == kv[1]["layout"] == "rotating" and kv[0]["window"] == gm.GEMMA3_WINDOW
    assert kv[2]["layout"] == "dense"
    shown = CliRunner().invoke(main, ["inspect", str(art)]).output
    assert f"rotating(window={gm.GEMMA3_WINDOW})" in shown and f"layers 0-1     rotating {gm.GEMMA3_WINDOW}" in shown
    assert "per-layer cos: 2x %cos_local %cos_global" in shown
    assert "ops.decode_layers(" in (art / "model.py").read_text()  # the cpu fast path takes Gemma 3's layer


@pytest.mark.parametrize("family,options", [("gemma3", {}), ("gemma3", {"quantize": "q4", "kv_bits": 4}),
                                             ("gemma3_text", {"dtype": "bfloat16"}), ("paligemma", {"quantize": "q8"}),
                                             ("paligemma2", {})])
def test_decode_layer_fast_path_is_the_ops(store, family, options, monkeypatch):
    """The cpu fast path takes every Gemma decoder layer (QK-norm, sandwich norms, GELU-tanh,
    Gemma 2's soft-capped scores, sliding windows on rotating caches with their own rotary
    tables; 4-bit caches on Gemma 3's global layers): a batch of an image prompt and a text
    prompt decodes to the op-by-op logits bit for bit, Gemma 3's past its window plus the
    rotating caches' slack (the oldest tokens dropped on the way)."""
    from test_decode_layer_variants import assert_fast_path_is_the_ops
    from vlmc.kernels import cpu
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    info = store.ckpt(family)
    fast, plain = store.vlm(info, **options), store.vlm(info, no_fuse=("decode_layer",), **options)
    assert "ops.decode_layers(" in (store.artifact(info, **options) / "model.py").read_text()
    text = "Tell me a short story about the river."
    prompts = [fast.build_prompt(text)] if family == "gemma3_text" else \
        [fast.build_prompt(messages=_case("one_image")[0], images=_case("one_image")[1]), fast.build_prompt(text)]
    if family == "paligemma":  # its processor takes an image with every prompt
        prompts = [fast.build_prompt(messages=_case(c)[0], images=_case(c)[1]) for c in ("one_image", "wide")]
    assert_fast_path_is_the_ops(fast, plain, prompts, gm.GEMMA3_WINDOW + 36, monkeypatch)


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "paligemma2"])
def test_quantized_kv_caches(store, family):
    """Every KV layout on the global layers (the last one too), the sliding-window layers kept
    rotating: 8-bit codes track float32 (top-1 >= 0.9, mean KL < 0.02); coarser codes cost
    more, never less (random fixtures: their near-flat distributions flip easily)."""
    def windows_stay_rotating(m, wanted):
        layouts = [L["kv"]["layout"] for L in m.kv_layers]
        assert layouts == ["rotating" if L.get("window") else wanted for L in m.kv_layers], layouts
        assert ("rotating" in layouts) == (family != "paligemma")

    kit.check_quantized_kv_caches(store.vlm(store.ckpt(family)), store.artifact(store.ckpt(family)),
                                  layouts=windows_stay_rotating)


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_quantized_weights(store, family):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more."""
    kit.check_quantized_weights(store, store.ckpt(family), ("vision.", "projector."))


# ------------------------------------------------------------------------------ caches and batching


def test_prefix_cache_reuses_gemma3_blocks_up_to_a_span_and_changes_nothing(store):
    """A second turn over the same image reuses the first's blocks (never a prefix that ends
    inside the image's bidirectional soft tokens); another image behind the same ids does not."""
    m = store.vlm(store.ckpt("gemma3"))
    prompts = kit.second_turn_prompts(m)
    hits = kit.run_with_prefix_cache(m, prompts, timeout=120)
    (start, end), = m.inputs.attention_spans(prompts[1].ids, prompts[1].images)
    assert hits[0] == 0 and hits[1] >= end and hits[1] % 8 == 0
    assert hits[2] <= start and all(not start < h < end for h in hits)


def test_prefix_lm_prompts_reuse_nothing_and_change_nothing(store):
    """PaliGemma's whole prompt is one bidirectional span: no proper prefix is reusable."""
    m = store.vlm(store.ckpt("paligemma"))
    image = ck.make_test_image(120, 90, seed=10)
    prompts = [m.build_prompt("caption en", images=[image]), m.build_prompt("caption en: what shapes?", images=[image])]
    assert kit.run_with_prefix_cache(m, prompts, max_tokens=8, timeout=120) == [0, 0]


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_batching_loop_with_images_and_text(store, family):
    """Joined batches of image and text requests (chunked prefills between decode steps,
    a chunk never ending inside a span) give one-at-a-time outputs; the vision cache serves
    a repeated image."""
    kit.check_batching_loop_with_images_and_text(store.vlm(store.ckpt(family)), timeout=120)


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_gemma3_and_paligemma_image_chats(store, tmp_path):
    """Both families behind one `vlmc serve`: an image chat answers what the Python API
    generates for the same messages."""
    from serve_helpers import LiveServer

    infos = [store.ckpt(f) for f in ("gemma3", "paligemma")]
    server = LiveServer(*(str(store.artifact(i)) for i in infos))
    try:
        assert server.get("/v1/models")[0] == 200
        ids = kit.check_serve_answers(server, [store.vlm(i) for i in infos], kit.image_chat())
        bad = server.post("/v1/chat/completions", {"model": ids[1], "max_tokens": 4, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "caption en"}]})
        assert bad[0] == 400 and "one user message" in json.dumps(bad[1])
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_bench_smoke(store, family):
    kit.check_bench_smoke(store.artifact(store.ckpt(family)), family)


def test_unsupported_model_type_names_the_gemma_families(store, tmp_path):
    from vlmc.models import supported_model_types

    kit.unsupported_model_type_error(store.ckpt("gemma3")["path"], tmp_path, "gemma5")
    assert {"gemma3", "gemma3_text", "paligemma"} <= set(supported_model_types())


PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20, "pan_and_scan_max_num_crops": 3,
                "pan_and_scan_min_ratio_to_activate": 1.2}


@pytest.fixture(scope="module")
def pan_and_scan(store):
    """The Gemma 3 checkpoint with pan-and-scan switched on (crops down to 20 pixels, so the
    fixture's small images are cut), compiled and loaded, with transformers' processor and model."""
    import shutil

    src = store.root / "ckpt" / "gemma3-pan-and-scan"
    if not src.exists():
        shutil.copytree(store.ckpt("gemma3")["path"], src)
        cfg = json.loads((src / "preprocessor_config.json").read_text())
        (src / "preprocessor_config.json").write_text(json.dumps({**cfg, **PAN_AND_SCAN}))
    info = {**store.ckpt("gemma3"), "path": src}
    return info, store.vlm(info), _CallKwargs(gm.hf_processor(src, "gemma3"), PAN_AND_SCAN), gm.hf_model(src, "gemma3")


class _CallKwargs:
    """transformers' processor with keyword arguments added to every call: Gemma3Processor
    (5.24) passes its own pan-and-scan defaults (off, 256, 4, 1.2) to the image processor
    whatever the image processor was configured with, so pan-and-scan is a call option there."""

    def __init__(self, processor, kwargs):
        self._processor, self._kwargs = processor, kwargs

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        return self._processor(*args, **{**kwargs, **self._kwargs})


@pytest.mark.parametrize("case,crops", [("wide", [3]), ("tall", [3]), ("two_images", [2, 0]), ("multi_turn", [2])])
def test_gemma3_pan_and_scan_matches_transformers(pan_and_scan, case, crops):
    """do_pan_and_scan: each elongated image is followed by its crops (transformers' cut,
    each crop resized through PIL), the prompt says so in Gemma3Processor's words with one
    soft-token sequence per crop, and ids, pixels, bidirectional spans, logits and greedy
    tokens equal transformers'."""
    info, m, proc, model = pan_and_scan
    messages, images = _case(case)
    ref = gm.hf_reference(info["path"], "gemma3", messages, images, greedy_steps=GREEDY_STEPS, processor=proc,
                          model=model)
    p = build_prompt(m, case)
    assert p.images.grid_thw[:, 0].tolist() == [1 + c for c in crops]
    assert len(m.inputs.attention_spans(p.ids, p.images)) == sum(1 + c for c in crops)
    if any(crops):
        assert "here are some crops" in m.tokenizer.decode(p.ids)
    assert_parity(m, ref, case, f"gemma3/{case} pan-and-scan")


def test_pan_and_scan_is_gemma3s_alone(store, tmp_path):
    """PaliGemma's SigLIP processor has no pan-and-scan: the switch is refused, not ignored."""
    import shutil

    from vlmc.errors import VlmcError

    src = tmp_path / "pg"
    shutil.copytree(store.ckpt("paligemma")["path"], src)
    cfg = json.loads((src / "preprocessor_config.json").read_text())
    (src / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_pan_and_scan": True}))
    with pytest.raises(VlmcError, match="do_pan_and_scan"):
        vlmc_compile(src, tmp_path / "out")


@pytest.mark.parametrize("change,message", [
    (("config.json", {"text_config": {"attn_logit_softcapping": 50.0}}), "attn_logit_softcapping"),
    (("config.json", {"text_config": {"use_bidirectional_attention": True}}), "use_bidirectional_attention"),
    (("config.json", {"mm_tokens_per_image": 9}), "mm_tokens_per_image 9"),
    (("config.json", {"text_config": {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}}),
     "rope type 'yarn'"),
])
def test_gemma3_configs_vlmc_cannot_honour_are_refused(store, tmp_path, change, message):
    kit.check_refused(store.ckpt("gemma3")["path"], tmp_path, change, message)


def test_paligemma_with_another_decoder_is_refused(store, tmp_path):
    import shutil

    from vlmc.errors import UnsupportedModelError

    src = tmp_path / "pg"
    shutil.copytree(store.ckpt("paligemma")["path"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma3_text"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gemma3_text' is not supported; supported: gemma, gemma2"):
        vlmc_compile(src, tmp_path / "out")


@pytest.mark.xfail(strict=True, reason="PaliGemma 2 keeps its whole prefix visible across the sliding window "
                                       "(OR(window AND causal, prefix)); a rotating cache's mask cannot tell span "
                                       "keys from causal ones (see the module docstring)")
def test_paligemma2_prefix_longer_than_the_window(store):
    info = store.ckpt("paligemma2", window=8)
    assert_parity(store.vlm(info), store.ref(info, "one_image"), "one_image", "paligemma2/window 8")


def test_paligemma_prompts(store):
    """One user message, images first whatever their place among its parts; anything else
    is one clear error."""
    from vlmc.errors import InputError

    m = store.vlm(store.ckpt("paligemma"))
    img = ck.make_test_image(64, 64, seed=3)
    p = m.build_prompt(messages=[_user(_txt("caption "), IMG, _txt("en"))], images=[img])
    assert p.text == "<bos>caption en\n"
    n = gm.PALIGEMMA_IMAGE_SIZE // 14
    assert p.ids[:n * n] == [m.image_token_id] * (n * n) and p.ids[n * n] == m.tokenizer.bos_token_id
    assert m.inputs.positions(p.ids, p.images)[0][0, 0] == 1  # PaliGemma's positions are 1-based
    with pytest.raises(InputError, match="one user message"):
        m.build_prompt(messages=[_user(_txt("a")), {"role": "assistant", "content": "b"}, _user(_txt("c"))])
    with pytest.raises(InputError, match="image token"):
        m.build_prompt("<image> caption en", images=[img])


def test_gemma3_text_checkpoint_without_a_preprocessor_config(store, tmp_path):
    info = gm.build_gemma_checkpoint(tmp_path / "ck", "gemma3_text", preprocessor=False)
    m = vlmc.load(vlmc_compile(info["path"], tmp_path / "art"))
    assert_parity(m, store.ref(store.ckpt("gemma3_text"), "text"), "text", "gemma3_text/no preprocessor")


def test_gemma3_artifact_runs_without_torch(store, tmp_path):
    """The families' runtime halves import nothing of torch or transformers: the CLI runs a
    Gemma 3 image prompt where importing them fails, and says what the Python API says."""
    info = store.ckpt("gemma3")
    kit.check_cli_runs_without_torch(store.vlm(info), store.artifact(info), tmp_path)
