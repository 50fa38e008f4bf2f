"""Gemma 4 (``gemma4``, ``gemma4_text``) against transformers on the tiny checkpoints of
``tests/fixtures/gemma4.py``.

Parity (as ``test_parity_gemma.py``): prompt ids equal to transformers' Gemma4Processor
(the PIL image processor), each image's real patches equal to its padded pixel rows
(within 1e-5) and its patch grid to its positions, float32 logits within 1e-4 at the last
prompt position and at each of 16 greedy steps, the 16 greedy tokens identical: text only,
one image, two images, an image in an earlier turn (and wide/tall images); sharded and
bfloat16 checkpoints. Then the ops Gemma 4 adds against the transformers modules they
replace, the KV plan (only the layers that own a cache get one, each with its own head
size; the KV-shared layers read their producer's) and the inputs it refuses (video parity:
``test_parity_video.py``). The MoE
decoder (``enable_moe_block``) on its own fixture: parity, routing, batching, quantized.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import gemma4 as g4  # noqa: E402
from parity_kit import LOGIT_ATOL  # noqa: E402
from vlmc.errors import InputError, UnsupportedModelError  # noqa: E402

FAMILY_CASES = {
    "gemma4": ["text", "one_image", "two_images", "multi_turn", "wide", "tall"],
    "gemma4_text": ["text", "chat"],
}
CASES = kit.Cases(chat=kit.CHAT)
_case, build_prompt = CASES.inputs, CASES.prompt
PARITY = [(f, c) for f, cases in FAMILY_CASES.items() for c in cases]

store = kit.store_fixture(
    "gemma4", build=g4.build_gemma4_checkpoint, cases=CASES,
    hf=lambda info: (g4.hf_processor(info["path"], info["family"]), g4.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: g4.hf_reference(info["path"], info["family"], *a, **kw))


def check_patches(p, ref):
    """Each image's real patches equal its padded pixel rows; its patch grid its positions."""
    kit.check_same_pixels(p, ref)
    for (_, h, w), pos in zip(p.images.grid_thw.tolist(), ref["image_position_ids"]):
        real = pos[(pos != -1).all(-1)]
        assert real[:, 0].max() + 1 == w and real[:, 1].max() + 1 == h and len(real) == h * w


def assert_parity(m, ref, case, what):
    kit.assert_parity(m, build_prompt(m, case), ref, what, pixels=check_patches)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{c}" for f, c in PARITY])
def test_parity(store, family, case):
    info = store.ckpt(family)
    assert_parity(store.vlm(info), store.ref(info, case), case, f"{family}/{case}")


def test_sharded_checkpoint(store):
    """Same seed in two shards: the single-file checkpoint's references apply."""
    base, info = kit.layout_checkpoints(store, dict(sharded=True), "gemma4")
    m = store.vlm(info)
    for case in ("text", "two_images"):
        assert_parity(m, store.ref(base, case), case, f"gemma4/sharded/{case}")


def test_bfloat16_checkpoint(store):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt("gemma4", dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    for case in ("text", "one_image"):
        assert_parity(m32, store.ref(info, case), case, f"gemma4/bf16-ckpt/{case}")
        kit.check_bf16_artifact(m32, m16, lambda m: build_prompt(m, case), case, flips=False)


def test_batched_matches_single(store):
    """A ragged batch of image and text prompts (left padding, rotating and shared caches)."""
    m = store.vlm(store.ckpt("gemma4"))
    batch = ("two_images", "text", "one_image")
    kit.check_batched_matches_single(m, [build_prompt(m, c) for c in batch], batch, "gemma4/batch", ragged=False)


@pytest.mark.parametrize("family,options", [("gemma4", {}), ("gemma4", {"quantize": "q4", "kv_bits": 4}),
                                             ("gemma4_text", {"dtype": "bfloat16"})])
def test_decode_layer_fast_path_is_the_ops(store, family, options, monkeypatch):
    """The cpu fast path takes all four Gemma 4 blocks (value norm, per-layer inputs, layer
    scalars, sliding and global head sizes, KV-shared layers reading rotating and dense
    caches, 4-bit caches): a batch of an image prompt and a text prompt decodes to the
    op-by-op logits bit for bit, past the window plus the rotating caches' slack."""
    from test_decode_layer_variants import assert_fast_path_is_the_ops
    from vlmc.kernels import cpu
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    info = store.ckpt(family)
    fast, plain = store.vlm(info, **options), store.vlm(info, no_fuse=("decode_layer",), **options)
    src = (store.artifact(info, **options) / "model.py").read_text()
    assert src.count("fast = ops.decode_layer(") == 4  # every block: sliding, global and their shared kinds
    text = "Tell me a short story about the river."
    prompts = [fast.build_prompt(text)] if family == "gemma4_text" else \
        [build_prompt(fast, "one_image"), fast.build_prompt(text)]
    stacks = src.split("def decode(", 1)[1].split("def ", 1)[0].count("ops.decode_layers(")  # runs of layers
    assert_fast_path_is_the_ops(fast, plain, prompts, g4.WINDOW + 36, monkeypatch, stacks=stacks)


# ------------------------------------------------------------------------------ the plan


def test_kv_plan_owns_caches_for_the_unshared_layers_only(store):
    """6 layers, the last 3 KV-shared: 3 caches (sliding, sliding, global), the global one
    with the global head size; the shared layers read layers 1 and 2."""
    m = store.vlm(store.ckpt("gemma4"))
    layers = m.kv_layers
    assert [L["index"] for L in layers] == [0, 1, 2]
    assert [L["kv"]["layout"] for L in layers] == ["rotating", "rotating", "dense"]
    assert [L["kv"]["head_dim"] for L in layers] == [16, 16, 32]
    caches = m.decoder.caches(1)
    assert [(c.kv_heads, c.head_dim) for c in caches] == [(2, 16), (2, 16), (2, 32)]
    blocks = {name: rows for name, rows in m.artifact.manifest["kv_plan"].items()}
    assert "decoder" in blocks
    prog_blocks = {b: [r.get("reads") for r in rows] for b, rows in _block_tables(m).items()}
    assert prog_blocks["shared_sliding_layer"] == [1, 1] and prog_blocks["shared_global_layer"] == [2]


def _block_tables(m):
    import re
    src = (m.artifact.path / "model.py").read_text()
    return {name.lower(): eval(rows) for name, rows in re.findall(r"^(\w+_LAYER) = (\[.*\])$", src, re.M)}


# ------------------------------------------------------------------------------ the new ops


def test_proportional_rope_matches_transformers():
    """rope_freqs(rotated=...) (reference and cpu libraries): Gemma4TextRotaryEmbedding's
    global-layer tables (proportional rope, a quarter of the frequencies turning)."""
    import transformers as tf
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding
    from vlmc.kernels import cpu_ops, reference

    cfg = g4.text_config({"<bos>": 2, "<eos>": 1, "<pad>": 0}, 128)
    rot = Gemma4TextRotaryEmbedding(cfg)
    pos = torch.arange(0, 300, 7)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos, "full_attention")
    for ops in (reference, cpu_ops):
        c, s = ops.rope_freqs(mx.array(pos.numpy().astype(np.int32)), kind="default", dim=32, theta=1000.0,
                              rotated=4)
        np.testing.assert_allclose(np.asarray(ops.result(c))[:, 0], cos.numpy(), atol=2e-6)
        np.testing.assert_allclose(np.asarray(ops.result(s))[:, 0], sin.numpy(), atol=2e-6)
    assert tf is not None


def test_clip_and_unweighted_rms_norm_match_transformers():
    """clip around a linear: Gemma4ClippableLinear; rms_norm with no weight: Gemma4RMSNorm
    (with_scale=False)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear, Gemma4RMSNorm
    from vlmc.kernels import cpu_ops, reference

    lin = Gemma4ClippableLinear(g4.vision_config(), 16, 8).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lin.linear.weight.copy_(torch.randn(8, 16, generator=g))
        lin.input_min.fill_(-0.7), lin.input_max.fill_(0.9), lin.output_min.fill_(-1.1), lin.output_max.fill_(1.3)
    x = torch.randn(5, 16, generator=g)
    norm = Gemma4RMSNorm(16, eps=1e-6, with_scale=False)
    with torch.no_grad():
        want, want_norm = lin(x).numpy(), norm(x).numpy()
    b = {k: mx.array(getattr(lin, k).numpy()) for k in ("input_min", "input_max", "output_min", "output_max")}
    for ops in (reference, cpu_ops):
        y = ops.clip(mx.array(x.numpy()), b["input_min"], b["input_max"])
        y = ops.clip(ops.linear(y, mx.array(lin.linear.weight.detach().numpy())), b["output_min"], b["output_max"])
        np.testing.assert_allclose(np.asarray(ops.result(y)), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ops.result(ops.rms_norm(mx.array(x.numpy()), None, eps=1e-6))),
                                   want_norm, atol=1e-5)
    assert (np.abs(want) >= 1.1 - 1e-6).any()  # the bounds bite


@pytest.mark.parametrize("layout", [{"layout": "dense"}, {"layout": "rotating", "window": 5}])
def test_shared_attention_reads_what_the_producer_wrote(layout):
    """shared_attention over a cache equals the producer's cached_attention for the same
    queries, and writes nothing (reference and cpu libraries)."""
    from vlmc.kernels import cpu_ops, reference
    from vlmc.runtime.kv_cache import attention_mask, make_caches

    rng = np.random.default_rng(0)
    for ops in (reference, cpu_ops):
        (cache,) = make_caches([{"index": 0, "kv": layout}], 1, 2, 8)
        for n in (6, 1, 1):
            q, k, v = (mx.array(rng.standard_normal((1, h, n, 8)).astype(np.float32)) for h in (4, 2, 2))
            mask = attention_mask(mx.zeros(1, mx.int32), cache.offset, n, n > 1)
            want = ops.cached_attention(q, k, v, cache, mask, scale=1.0)
            held = cache.held
            got = ops.shared_attention(q, cache, mask, scale=1.0)
            assert cache.held == held
            np.testing.assert_allclose(np.asarray(ops.result(got)), np.asarray(ops.result(want)), atol=1e-5)


def test_select_layer_takes_the_running_layers_slice():
    from vlmc.kernels import reference
    x = mx.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(np.asarray(reference.select_layer(x, 2)), np.asarray(x)[:, :, 2])


# ------------------------------------------------------------------------------ refusals


def test_audio_and_videos_without_a_tower_are_refused(store, tmp_path):
    """The audio tower is not read: an audio placeholder in a prompt is one error naming what
    is taken; ``gemma4_text`` (no vision tower) takes no media, before any decoding."""
    m = store.vlm(store.ckpt("gemma4"))
    assert m.inputs.video_processor is not None  # the fixture's nested video processor config
    with pytest.raises(InputError, match="text, images and videos here; audio inputs are not supported"):
        m.build_prompt("Listen: <|audio|>")
    with pytest.raises(InputError, match="video placeholder"):
        m.build_prompt("Watch: <|video|>")
    text = store.vlm(store.ckpt("gemma4_text"))
    assert text.inputs.video_processor is None
    with pytest.raises(InputError, match="takes no (images|videos)"):
        text.build_prompt("What moves?", videos=[tmp_path / "clip.mp4"])


def test_video_processor_config_is_read_in_transformers_order(store, tmp_path):
    """``processor_config.json``'s ``video_processor``, else ``video_preprocessor_config.json``,
    else the image config (hub checkpoints have the image config in both files and a video
    budget of its own only in the first)."""
    import json
    import shutil
    from pathlib import Path

    from vlmc.compiler import compile as vlmc_compile
    folder = Path(shutil.copytree(store.ckpt("gemma4")["path"], tmp_path / "ckpt"))
    nested = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(nested["image_processor"]))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**nested["video_processor"],
                                                                       "max_soft_tokens": 280}))

    def budget(name):
        art = Path(vlmc_compile(str(folder), tmp_path / name, dtype="float32", target="cpu"))
        return json.loads((art / "processor.json").read_text())["video"]["max_soft_tokens"]
    assert budget("nested") == nested["video_processor"]["max_soft_tokens"] == 140
    (folder / "processor_config.json").write_text(json.dumps({k: v for k, v in nested.items()
                                                              if k != "video_processor"}))
    assert budget("own-file") == 280
    (folder / "video_preprocessor_config.json").unlink()
    assert budget("image-config") == nested["image_processor"]["max_soft_tokens"] == 70


def test_server_takes_videos_as_generate_does(store, tmp_path):
    """A ``video_url`` data URI to ``vlmc serve`` on a Gemma 4 artifact: the prompt
    ``generate`` builds for the same clip and sampling (its parity with transformers:
    ``test_parity_video.py``), and the same greedy answer; ``/v1/models`` lists video."""
    pytest.importorskip("av")
    import json

    from fixtures.videos import make_clip
    from serve_helpers import LiveServer, data_uri
    info = store.ckpt("gemma4")
    m = store.vlm(info)
    clip = make_clip(tmp_path / "clip.mp4", n=13, width=56, height=40, fps=4)
    question = [{"type": "text", "text": "What moves?"}]
    want = m.generate(messages=[{"role": "user", "content": [
        {"type": "video", "video": str(clip), "num_frames": 3}, *question]}], max_tokens=4, temperature=0)
    server = LiveServer(str(store.artifact(info)))
    try:
        models = json.loads(server.get("/v1/models")[2])["data"]
        assert "video" in json.dumps(models)
        status, body = server.post("/v1/chat/completions", {
            "model": models[0]["id"], "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": data_uri(clip, "video/mp4"), "num_frames": 3}},
                *question]}]})
    finally:
        server.stop()
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens and want.text
    assert body["choices"][0]["message"]["content"] == want.text


def test_second_question_about_a_video_reuses_features_and_prefix_blocks(store, tmp_path):
    """Through the batching loop: the same clip again encodes nothing and imports the KV
    blocks of its frames (their times and soft tokens), and answers as a fresh model does.
    The prompt runs far past the 12-token sliding window and is prefilled in 16-token
    chunks: each chunk's blocks are kept before the window drops them (blocks of 32, more
    than the window holds)."""
    pytest.importorskip("av")
    import threading

    from fixtures.videos import make_clip
    from vlmc.runtime.batcher import Batcher, FinishEvent, Job, TokenEvent
    from vlmc.runtime.prefix_cache import PrefixCache
    from vlmc.runtime.vision_cache import VisionFeatureCache
    m = store.vlm(store.ckpt("gemma4"))
    clip = make_clip(tmp_path / "clip.mp4", n=13, width=56, height=40, fps=4)

    def prompt(question):
        return m.build_prompt(messages=[{"role": "user", "content": [
            {"type": "video", "video": str(clip), "num_frames": 3}, {"type": "text", "text": question}]}])

    def ask(batcher, p):
        done, seen = threading.Event(), {"tokens": []}

        def emit(ev):
            if isinstance(ev, TokenEvent):
                seen["tokens"].append(ev.token)
            if isinstance(ev, FinishEvent):
                seen["cached"] = ev.cached_tokens
                done.set()
        batcher.submit(Job(p, emit, max_tokens=4))
        assert done.wait(120)
        return seen["cached"], seen["tokens"]

    vision = VisionFeatureCache()
    batcher = Batcher(m, vision_cache=vision, prefix_cache=PrefixCache(), max_batch=1, prefill_chunk=16)
    try:
        assert ask(batcher, prompt("What moves first?"))[0] == 0
        second = prompt("Where does the disc go?")
        assert len(second.ids) > 4 * g4.WINDOW
        cached, tokens = ask(batcher, second)
        assert vision.stats()["hits"] == 1 and vision.stats()["misses"] == 1
        last_frame = len(second.ids) - 1 - second.ids[::-1].index(m.inputs.video_token_id)
        assert cached > last_frame - 32  # every whole block up to the question
    finally:
        batcher.shutdown()
    assert tokens == m.generate(messages=[{"role": "user", "content": [
        {"type": "video", "video": str(clip), "num_frames": 3}, {"type": "text", "text": "Where does the disc go?"}]}],
        max_tokens=4, temperature=0).token_ids


# ------------------------------------------------------------------------------ routed experts (26B-A4B)

MOE_CASES = [("gemma4_text", "text"), ("gemma4_text", "chat"), ("gemma4", "one_image"), ("gemma4", "multi_turn")]


@pytest.mark.parametrize("family,case", MOE_CASES, ids=[f"{f}-{c}" for f, c in MOE_CASES])
def test_moe_parity(store, family, case):
    """``enable_moe_block``: every layer's routed experts beside its MLP (router on the
    residual, per-expert scales, three extra norms) match transformers, prompt and 16
    greedy steps, and the experts take the one-call MoE block (not a dense path)."""
    info = store.ckpt(family, moe=True)
    m = store.vlm(info)
    assert (store.artifact(info) / "model.py").read_text().count("ops.moe_block(") == 4  # one per block
    assert_parity(m, store.ref(info, case), case, f"{family}/moe/{case}")


def test_moe_batched_matches_single(store):
    """A batch of image and text prompts through the routed experts (rows routed apart)."""
    m = store.vlm(store.ckpt("gemma4", moe=True))
    batch = ("two_images", "text", "one_image")
    kit.check_batched_matches_single(m, [build_prompt(m, c) for c in batch], batch, "gemma4/moe/batch", ragged=False)


def test_moe_routing_is_transformers_choice():
    """The router ops pick transformers' experts with its weights (per-expert scale applied
    after the renormalisation), on rows where the top-k are near and far apart."""
    import transformers as tf
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    from vlmc.kernels import reference as ref
    cfg = tf.Gemma4TextConfig(hidden_size=32, num_experts=8, top_k_experts=3, moe_intermediate_size=8,
                              enable_moe_block=True, rms_norm_eps=1e-6)
    router = Gemma4TextRouter(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(8, 32, generator=gen))
        router.scale.copy_(1 + 0.3 * torch.randn(32, generator=gen))
        router.per_expert_scale.copy_(0.5 + torch.rand(8, generator=gen))
    x = torch.randn(40, 32, generator=gen)
    _, want_w, want_i = router(x)
    r = ref.rms_norm(mx.array(x.numpy()), None, eps=1e-6) * mx.array(router.scale.detach().numpy()) * 32 ** -0.5
    w, i = ref.moe_route(r @ mx.array(router.proj.weight.detach().numpy()).T, top_k=3, normalize=True)
    w = w * mx.take(mx.array(router.per_expert_scale.detach().numpy()), i, axis=0)
    np.testing.assert_array_equal(np.array(i), want_i.numpy())
    np.testing.assert_allclose(np.array(w), want_w.detach().numpy(), atol=1e-6, rtol=0)


def test_roofline_reads_the_tied_head_not_the_per_layer_table(store):
    """`vlmc bench`'s bytes per decode token: the tied head reads the whole token embedding
    (codes, scales, biases), but the per-layer input table is a lookup of one row per token,
    not part of the head (it once was: 2.41 GB counted for E2B's 0.35 GB head)."""
    from vlmc.bench import _tensor_bytes, weight_roofline
    from vlmc.runtime.artifact import read_manifest
    manifest = read_manifest(store.artifact(store.ckpt(), quantize="q4"))
    tensors = manifest["tensors"]
    table = sum(_tensor_bytes(t) for n, t in tensors.items() if n.startswith("text.embed_tokens.weight"))
    per_layer = sum(_tensor_bytes(t) for n, t in tensors.items() if n.startswith("text.embed_tokens_per_layer."))
    assert table > 0 and per_layer > 0
    roof = weight_roofline(manifest)
    assert roof["lm_head_tied"] and roof["lm_head_bytes"] == table
    assert roof["embedding_bytes"] == table + per_layer
    assert roof["decode_bytes_per_token"] == roof["decoder_bytes"] + table


@pytest.mark.parametrize("scheme", ["q8", "q4"])
def test_moe_quantized_tracks_float(store, scheme):
    """Quantized (the experts per expert, the router kept float) and fed float32's greedy
    tokens, the MoE model strays from float32 no more than the dense fixture does under the
    same scheme (this tiny Gemma's logits are sensitive: dense q8 strays ~11% of the
    logits' range, q4 ~45%; the MoE one 11% and 57%)."""
    text = "Tell me a short story about the river."

    def strays(info):
        f32, q = store.vlm(info), store.vlm(info, quantize=scheme)
        tokens, want = kit.run_vlmc(f32, [f32.build_prompt(text)], steps=8)
        _, got = kit.run_vlmc(q, [q.build_prompt(text)], steps=8, sampler=kit.ForcedSampler(tokens[0]))
        return float(np.abs(got - want).max()) / float(np.ptp(want))

    info = store.ckpt("gemma4_text", moe=True)
    src = (store.artifact(info, quantize=scheme, no_fuse=("decode_layer",)) / "model.py").read_text()
    assert src.count("ops.qmoe_experts(") == 4 and "ops.moe_experts(" not in src
    from vlmc.bench import weight_roofline
    from vlmc.runtime.artifact import read_manifest
    roof = weight_roofline(read_manifest(store.artifact(info, quantize=scheme)))
    assert roof["routed_expert_bytes"] == roof["all_expert_bytes"] * 2 // 6 > 0  # top 2 of 6 experts read
    moe, dense = strays(info), strays(store.ckpt("gemma4_text"))
    assert moe < 1.5 * dense, (moe, dense)


@pytest.mark.parametrize("scheme", [None, "q8", "q4"])
def test_moe_block_equals_the_op_path(store, monkeypatch, scheme):
    """On the cpu target ``lower`` makes each layer's router projection, ``moe_route``,
    per-expert scale and routed experts one ``moe_block`` op (the norms before it stay ops;
    ``--no-fuse decode_layer`` keeps the separate ops): one per MoE layer, and over two
    sequences' prompt and 8 decode steps, each decode step's MoE layers taking the one C
    call, greedy tokens identical to the op path's and logits within float32 rounding
    (float32, q8 and q4 experts)."""
    from vlmc.kernels import cpu_ops

    info = store.ckpt("gemma4_text", moe=True)
    kw = {} if scheme is None else {"quantize": scheme}
    fused, plain = store.artifact(info, **kw), store.artifact(info, no_fuse=("decode_layer",), **kw)
    src = (fused / "model.py").read_text()
    assert src.count("ops.moe_block(") == 4 and "moe_route" not in src and "moe_experts" not in src
    assert "moe_block" not in (plain / "model.py").read_text()
    from vlmc.runtime.artifact import read_manifest
    assert read_manifest(fused)["meta"]["fusions"]["moe_block"] == len(g4.LAYER_TYPES)  # every layer has routed experts
    m = store.vlm(info, **kw)
    prompts = [m.build_prompt("Tell me a short story about the river."), m.build_prompt("circle square " * 5)]
    calls = []
    original = cpu_ops._fused_block

    def counted(*a, **k):
        out = original(*a, **k)
        calls.append(out is not None and np.asarray(a[0]).reshape(-1, a[0].shape[-1]).shape[0] == 2)
        return out
    monkeypatch.setattr(cpu_ops, "_fused_block", counted)
    toks, logits = kit.run_vlmc(m, prompts, steps=8)
    assert sum(calls) == 7 * len(g4.LAYER_TYPES)  # decode steps 2..8 of both rows (step 1 ends the prefill)
    ref_toks, ref_logits = kit.run_vlmc(store.vlm(info, no_fuse=("decode_layer",), **kw), prompts, steps=8)
    np.testing.assert_array_equal(toks, ref_toks)
    # the routing weights' softmax differs from MLX's in the last bit; with int8-rounded
    # activations (the q8/q4 GEMVs) such a difference a few layers on can flip one rounding
    # (measured: 1e-7 of the logits' range, 2e-5 after one flip at q8's step 7)
    top = float(np.abs(ref_logits).max())
    np.testing.assert_allclose(logits[:, 1], ref_logits[:, 1], rtol=0, atol=1e-6 * top)  # the first decode step
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=(1e-5 if scheme is None else 1e-4) * top)


def test_moe_rewrite_leaves_foreign_wiring_alone(store):
    """The rewrite's pattern on a Gemma 4 layer body (before lowering): one ``moe_block``
    reading the experts' norm, the router's own normed input and the per-expert scales;
    router logits, or the scaled weights, read by another op too: no rewrite."""
    import copy
    import json

    from vlmc.ir.serialize import from_json
    from vlmc.passes.moe_path import fuse_moe_blocks

    art = store.artifact(store.ckpt("gemma4_text", moe=True))
    prog = from_json(json.loads((art / "program.json").read_text()))
    body = next(b.body for b in prog.blocks.values() if any(op.op == "moe_route" for op in b.body.ops))
    fused = copy.deepcopy(body)
    assert fuse_moe_blocks(fused) == 1
    block = next(op for op in fused.ops if op.op == "moe_block")
    made = {o: op for op in fused.ops for o in op.outputs}
    assert block.inputs[4:7] == [None] * 3 and block.inputs[8] == "@router.per_expert_scale"
    assert made[block.inputs[0]].op == "rms_norm" and made[block.inputs[0]].inputs[1].startswith("@pre_feedforward")
    assert made[block.inputs[7]].op == "scale"  # rms_norm(x) * router.scale * hidden**-0.5
    assert not any(op.op in ("moe_route", "take", "moe_experts") for op in fused.ops)
    for read in ("moe_route", "take"):  # the logits, the gathered scales: read elsewhere
        other = copy.deepcopy(body)
        op = next(op for op in other.ops if op.op == read)
        other.outputs.append(op.inputs[0] if read == "moe_route" else op.outputs[0])
        assert fuse_moe_blocks(other) == 0, read
    other = copy.deepcopy(body)  # the weights scaled by something other than a take of experts
    take = next(op for op in other.ops if op.op == "take")
    take.attrs["axis"] = 1
    assert fuse_moe_blocks(other) == 0


@pytest.mark.parametrize("change,match", [({"enable_moe_block": True, "num_experts": 4}, "top_k_experts"),
                                          ({"use_bidirectional_attention": "vision"}, "use_bidirectional_attention")])
def test_unsupported_configs_are_refused(change, match):
    from vlmc.models.common.gemma4 import gemma4_text
    with pytest.raises(UnsupportedModelError, match=match):
        gemma4_text({"text_config": {"num_hidden_layers": 2, **change}}, nested=True)


# ------------------------------------------------------------------------------ MTP assistant

ASSIST_WINDOW = 512  # the target's window holds every test context (see test_assistant_drafts_match_transformers)


@pytest.fixture(scope="module")
def assisted(store):
    """(target info, target model, assistant model): a gemma4_text target whose window holds
    the test contexts, its 2-layer assistant, both compiled."""
    target = store.ckpt("gemma4_text", window=ASSIST_WINDOW)
    info = g4.build_assistant_checkpoint(store.root / "ckpt" / "assistant", target)
    return target, info, store.vlm(target), vlmc.load(store.artifact(info))


def _recording(draft, target):
    from vlmc.runtime.speculative import SharedKVDrafter

    class Recording(SharedKVDrafter):
        """Keeps every (context, drafted tokens, their logits) it proposed."""

        def __init__(self, *a):
            super().__init__(*a)
            self.log = []

        def propose(self, state, context, k, sampler=None, rng=None):
            d = super().propose(state, context, k, sampler, rng)
            if d.tokens:
                self.log.append((list(context), list(d.tokens), np.stack([np.asarray(lg) for lg in state.logits])))
            return d

    return Recording(draft, target)


def test_assistant_is_detected_from_its_config(assisted, store):
    """make_drafter and load(..., draft=<assistant artifact>) both pick the shared-KV drafter."""
    from vlmc.runtime.speculative import SharedKVDrafter, make_drafter
    target_info, info, target, assistant = assisted
    assert assistant.meta["drafter"]["kind"] == "shared_kv"
    assert isinstance(make_drafter(target, draft=assistant), SharedKVDrafter)
    loaded = vlmc.load(store.artifact(target_info), draft=str(store.artifact(info)))
    assert isinstance(loaded.speculation.drafter, SharedKVDrafter)


def test_assistant_drafts_match_transformers(assisted, store):
    """Every draft of a greedy speculative generation (after the prefill, and after verify
    steps that kept some drafts and not others) equals transformers' assistant's drafts for
    the same context: tokens identical, the first draft's logits within 1e-4. Each later
    draft feeds the assistant's own projected state back, which compounds float noise:
    transformers' own drafts differ by up to 3e-4 at the fourth draft between a cached and
    an uncached target pass on this fixture, so later drafts are held to 1e-3."""
    target_info, info, target, assistant = assisted
    drafter = _recording(assistant, target)
    messages, _ = _case("text")
    out = target.generate(messages=messages, max_tokens=24, draft=drafter, num_draft_tokens=3)
    assert len(drafter.log) >= 3
    hf_target = g4.hf_model(target_info["path"], "gemma4_text")
    hf_assist = g4.hf_assistant(info["path"])
    for context, tokens, logits in drafter.log:
        want_tokens, want_logits = g4.hf_drafts(hf_target, hf_assist, context, len(tokens))
        assert tokens == want_tokens, (len(context), tokens, want_tokens)
        diff = np.abs(logits - want_logits).max(-1)
        assert diff[0] <= LOGIT_ATOL and diff.max() <= 10 * LOGIT_ATOL, (len(context), diff)
    assert out.generation_tokens == 24


def test_greedy_output_with_the_assistant_is_unchanged(assisted):
    _, _, target, assistant = assisted
    for case in ("text", "chat"):
        messages, _ = _case(case)
        plain = target.generate(messages=messages, max_tokens=20, draft=False)
        spec = target.generate(messages=messages, max_tokens=20, draft=assistant, num_draft_tokens=4)
        assert spec.token_ids == plain.token_ids, case


def test_assistant_for_another_target_is_refused(assisted, store):
    from vlmc.errors import InputError as Err
    _, _, _, assistant = assisted
    other = store.vlm(store.ckpt("gemma4"))  # a target with another window is fine; another width is not
    from vlmc.runtime.speculative import SharedKVDrafter
    bad = dict(other.meta)
    bad_target = type("T", (), {"meta": {**bad, "text": {**bad["text"], "hidden_size": 99}},
                                "kv_layers": other.kv_layers, "model": other.model})()
    with pytest.raises(Err, match="not made for this target"):
        SharedKVDrafter(assistant, bad_target)


def test_ordered_logits_match_the_transformers_module():
    """ordered_logits (reference and cpu libraries): Gemma4AssistantMaskedEmbedder."""
    import transformers as tf
    from transformers.models.gemma4_assistant.modeling_gemma4_assistant import Gemma4AssistantMaskedEmbedder
    from vlmc.kernels import cpu_ops, reference

    cfg = tf.Gemma4AssistantConfig(text_config=tf.Gemma4TextConfig(vocab_size=96, hidden_size=16, hidden_size_per_layer_input=0,
                                                                             vocab_size_per_layer_input=0),
                                   num_centroids=8, centroid_intermediate_top_k=3, use_ordered_embeddings=True)
    emb = Gemma4AssistantMaskedEmbedder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb.centroids.weight.copy_(torch.randn(8, 16, generator=g))
        emb.token_ordering.copy_(torch.randperm(96, generator=g))
    head, h = torch.randn(96, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    with torch.no_grad():
        want = emb(h, head).numpy()
    for ops in (reference, cpu_ops):
        got = ops.ordered_logits(mx.array(h.numpy()), mx.array(emb.centroids.weight.detach().numpy()),
                                 mx.array(emb.token_ordering.numpy().astype(np.int32)), mx.array(head.numpy()), top_k=3)
        np.testing.assert_allclose(np.asarray(ops.result(got)), want, atol=1e-5)


def test_assistant_with_ordered_embeddings_drafts_as_transformers(assisted, store):
    """An assistant with ordered embeddings: its drafts after a prefill equal transformers'."""
    from vlmc.runtime.speculative import SharedKVDrafter
    from vlmc.runtime.step import Sequences
    target_info, _, target, _ = assisted
    info = g4.build_assistant_checkpoint(store.root / "ckpt" / "assistant_ordered", target_info, ordered=True)
    assistant = vlmc.load(store.artifact(info))
    hf_target, hf_assist = g4.hf_model(target_info["path"], "gemma4_text"), g4.hf_assistant(info["path"])
    drafter = SharedKVDrafter(assistant, target)
    for case in ("text", "chat"):
        messages, _ = _case(case)
        p = target.build_prompt(messages=messages)
        seqs = Sequences.start(target.decoder, [target.prompt_inputs(p)])
        context = list(p.ids) + [int(mx.argmax(seqs.prefill()[0]).item())]
        state = drafter.start(p.ids, p, seqs)
        draft = drafter.propose(state, context, 3)
        want_tokens, want_logits = g4.hf_drafts(hf_target, hf_assist, context, 3)
        assert draft.tokens == want_tokens, case
        first = np.asarray(state.logits[0])
        kept = want_logits[0] > want_logits[0].min()  # the scored tokens (the rest share the fill value)
        assert float(np.abs(first - want_logits[0])[kept].max()) <= LOGIT_ATOL
