"""Qwen3-VL against transformers, and everything else a family must support, on the tiny
checkpoints of ``tests/fixtures/qwen3_vl.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' Qwen3VLProcessor, patches
within 1e-5 and grids equal, float32 logits within 1e-4 at the last prompt position and at
each of 16 greedy steps, the 16 greedy tokens identical; for both config layouts, sharded
and bfloat16 checkpoints, ragged batches, and the Instruct and Thinking chat templates.
Then: the IR pieces Qwen3-VL added against the transformers modules they replace (the
bilinear position-embedding taps, interleaved M-RoPE, DeepStack's additions), quantized
weights and KV caches (judged by KL and top-1 agreement, as random fixtures allow), the
prefix and vision caches, the batching loop with image and text requests, ``vlmc serve``,
``vlmc bench``, speculative decoding and the configurations vlmc refuses.

DeepStack: ``vision_encode`` returns each image token's merged features followed by the
DeepStack mergers' features; ``embed`` makes every token's row as wide, the token
embedding followed by zeros, so the default merge places whole rows and prefill adds the
k-th block after decoder layer k (zeros at text tokens: any mix of image and text prompts
batches, and decode steps add nothing).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_vl as q3  # noqa: E402
from parity_kit import IMG, LOGIT_ATOL, _txt, _user  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
THINKING_HISTORY = ([{"role": "system", "content": "Answer briefly."}, _user(IMG, _txt("What is in the image?")),
                     {"role": "assistant", "content": "<think>\nA square, a circle.\n</think>\n\nTwo shapes."},
                     _user(_txt("Which is larger?"))], [(120, 90)])
CASES = kit.Cases(thinking_history=THINKING_HISTORY)
_case, build_prompt = CASES.inputs, CASES.prompt

store = kit.store_fixture(
    "qwen3", build=q3.build_qwen3_checkpoint, cases=CASES,
    hf=lambda info: (q3.hf_processor(info["path"]), q3.hf_model(info["path"])),
    reference=lambda info, *a, **kw: q3.hf_reference(info["path"], *a, **kw))


def assert_parity(m, ref, case, what):
    kit.assert_parity(m, build_prompt(m, case), ref, what, pixels=kit.check_patches)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parity(store, case):
    info = store.ckpt()
    ref = store.ref(info, case)
    if case in ("wide", "tall"):
        (_, h, w), = ref["image_grid_thw"]
        assert h != w and (h > w) == (case == "tall")
    assert_parity(store.vlm(info), ref, case, f"qwen3_vl/{case}")


def test_thinking_template(store):
    """The Thinking variant's template: the generation prompt opens <think>, an earlier
    assistant turn keeps only its answer; vlmc's prompt is transformers'."""
    info = store.ckpt(variant="thinking")
    for case in ("one_image", "thinking_history"):
        ref = store.ref(info, case)
        assert ref["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        assert_parity(store.vlm(info), ref, case, f"qwen3_vl-thinking/{case}")
    assert "A square" not in store.ref(info, "thinking_history")["prompt"]


def test_tools_and_vision_ids_reach_the_template(store):
    """Tools and add_vision_id render as transformers renders them (the Instruct template)."""
    info = store.ckpt()
    m = store.vlm(info)
    tok = ck.hf_tokenizer(info["path"])
    tools = [{"type": "function", "function": {"name": "count", "description": "Count shapes",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages, images = _case("two_images")
    for kw in ({"tools": tools}, {"add_vision_id": True}):
        want = tok.apply_chat_template(messages, chat_template=info["chat_template"], add_generation_prompt=True,
                                       tokenize=False, **kw)
        p = m.build_prompt(messages=messages, images=images, template_vars=kw)
        assert p.text == want


def test_deepstack_features_change_the_outputs(store):
    """The fixture exercises DeepStack: zeroing its blocks of the image features moves the
    logits well beyond the parity tolerance (so parity above checks the additions)."""
    m = store.vlm(store.ckpt())
    p = build_prompt(m, "one_image")
    feats = m.encode_images(p.images)
    h = m.meta["text"]["hidden_size"]
    assert feats.shape[-1] == (1 + len(q3.DEEPSTACK)) * h
    base = m.prompt_inputs(p, feats)
    cut = m.prompt_inputs(p, mx.concatenate([feats[:, :h], mx.zeros_like(feats[:, h:])], axis=-1))
    from vlmc.runtime.step import Sequences
    full = np.array(Sequences.start(m.decoder, [base]).prefill())
    plain = np.array(Sequences.start(m.decoder, [cut]).prefill())
    assert np.abs(full - plain).max() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("layout", list(kit.LAYOUTS))
def test_checkpoint_layouts(store, layout):
    """Same seed, other config layout / shards: the v5 checkpoint's references apply."""
    kw = kit.LAYOUTS[layout]
    base, info = kit.layout_checkpoints(store, kw)
    if kw.get("layout") == "v4":
        text = info["config"]["text_config"]
        assert "rope_parameters" not in text and text["rope_scaling"]["mrope_interleaved"] and "rope_theta" in text
    m = store.vlm(info)
    for case in ("text", "two_images", "multi_turn"):
        assert_parity(m, store.ref(base, case), case, f"qwen3_vl/{layout}/{case}")


def test_bfloat16_checkpoint(store):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt(dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    for case in ("text", "wide"):
        assert_parity(m32, store.ref(info, case), case, f"qwen3_vl/bf16-ckpt/{case}")
        kit.check_bf16_artifact(m32, m16, lambda m: build_prompt(m, case), case)


BATCHES = [("two_images", "text"), ("multi_turn", "text", "one_image"), ("wide", "tall")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    """Ragged batches of image and text prompts (left padding; text rows' DeepStack blocks are zeros)."""
    kit.check_batch_against_refs(store, store.ckpt(), batch, "qwen3_vl/batch")


# ------------------------------------------------------------------------------ the new IR pieces


def test_position_taps_match_the_vision_model():
    """take + mul + sum_axis over the host-planned taps: Qwen3VLVisionModel's resampled
    position embeddings (bilinear, align_corners) for grids smaller and larger than the
    table, several images and frames, in both op libraries."""
    import transformers as tf
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights
    from vlmc.kernels import cpu_ops, reference
    from vlmc.models.qwen3_vl.inputs import position_taps

    cfg = tf.Qwen3VLVisionConfig(depth=1, hidden_size=8, num_heads=2, intermediate_size=8, num_position_embeddings=36,
                                 out_hidden_size=8, deepstack_visual_indexes=[])
    model = Qwen3VLVisionModel(cfg).eval()
    grid = torch.tensor([[1, 4, 6], [2, 10, 8], [1, 2, 2], [1, 14, 4]])
    idx, wt = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=6, mode="bilinear",
                                                           align_corners=True, spatial_merge_size=2)
    with torch.no_grad():
        want = (model.pos_embed(idx) * wt[:, :, None]).sum(1).numpy()
    rows, weights = position_taps(grid.numpy(), 6, 2)
    np.testing.assert_array_equal(weights, wt.numpy())  # the same float32 weights, bit for bit
    table = mx.array(model.pos_embed.weight.detach().numpy())
    for ops in (reference, cpu_ops):
        pe = ops.take(table, mx.array(rows), axis=0)
        pe = ops.sum_axis(ops.mul(pe, ops.reshape(mx.array(weights), [0, 0, 1])), axis=1)
        np.testing.assert_allclose(np.asarray(ops.result(pe)), want, rtol=0, atol=1e-6)


def test_interleaved_mrope_matches_the_text_rotary_embedding():
    """rope_freqs kind mrope_interleaved: Qwen3VLTextRotaryEmbedding's cos/sin for three
    distinct position streams, with the published sections and the fixture's (whose w
    section runs past the frequencies), in both op libraries."""
    import transformers as tf
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    from vlmc.kernels import cpu_ops, reference

    g = torch.Generator().manual_seed(0)
    for dim, sections, theta in ((128, [24, 20, 20], 5_000_000.0), (16, [2, 3, 3], 100.0)):
        cfg = tf.Qwen3VLTextConfig(head_dim=dim, hidden_size=dim * 2, num_attention_heads=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                    "mrope_section": sections, "mrope_interleaved": True})
        rot = Qwen3VLTextRotaryEmbedding(cfg)
        pos = torch.randint(0, 3000, (3, 2, 7), generator=g)
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        for ops in (reference, cpu_ops):
            c, s = ops.rope_freqs(mx.array(pos.numpy().astype(np.int32)), kind="mrope_interleaved", dim=dim,
                                  theta=theta, sections=sections)
            np.testing.assert_allclose(np.asarray(ops.result(c))[:, 0], cos.numpy(), rtol=0, atol=2e-6)
            np.testing.assert_allclose(np.asarray(ops.result(s))[:, 0], sin.numpy(), rtol=0, atol=2e-6)


def test_pad_axis():
    """pad_axis (the widened embeddings): zeros after x along an axis, on MLX and host arrays."""
    from vlmc.kernels import cpu_ops, reference

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    want = np.concatenate([x, np.zeros((2, 3, 8), np.float32)], axis=-1)
    np.testing.assert_array_equal(cpu_ops.pad_axis(x, axis=-1, after=8), want)
    for ops in (reference, cpu_ops):
        np.testing.assert_array_equal(np.asarray(ops.result(ops.pad_axis(mx.array(x), axis=-1, after=8))), want)
        got = np.asarray(ops.result(ops.pad_axis(mx.array(x), axis=1, before=1, after=2)))
        np.testing.assert_array_equal(got, np.pad(x, [(0, 0), (1, 2), (0, 0)]))


def test_chunked_prefill_matches_whole(store):
    """Prefill in chunks that cut through an image (its DeepStack blocks sliced with the
    embeddings) gives the logits of one whole prefill."""
    from vlmc.runtime.step import Sequences

    m = store.vlm(store.ckpt())
    p = build_prompt(m, "two_images")
    whole = np.array(Sequences.start(m.decoder, [m.prompt_inputs(p)]).prefill())
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
    while not seqs.prefill_done:
        logits = seqs.prefill(7)
    np.testing.assert_allclose(np.array(logits), whole, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("options", [{}, {"quantize": "q4"}], ids=["f32", "q4"])
def test_decode_layer_fast_path_is_the_ops(store, options, monkeypatch):
    """The cpu fast path takes Qwen3's layer (QK-norm): decode steps of an image prompt and a
    text prompt give the op-by-op logits bit for bit. A prefill in chunks of 7 through two
    images (DeepStack features added at three layers) takes the prompt kernels in both
    artifacts, not the stack call (a prompt's rows: vlmc/kernels/step_rows.py), and gives
    the same logits bit for bit."""
    from test_decode_layer_variants import assert_fast_path_is_the_ops
    from vlmc.kernels import cpu, cpu_ops
    from vlmc.runtime.step import Sequences
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    info = store.ckpt()
    fast, plain = store.vlm(info, **options), store.vlm(info, no_fuse=("decode_layer",), **options)
    prompts = [build_prompt(fast, "one_image"), fast.build_prompt("Tell me a short story about the river.")]
    assert_fast_path_is_the_ops(fast, plain, prompts, 12, monkeypatch)
    ran, real = [], cpu_ops._decode_layers
    monkeypatch.setattr(cpu_ops, "_decode_layers", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    chunked = []
    for m in (fast, plain):
        p = build_prompt(m, "two_images")
        seqs = Sequences.start(m.decoder, [m.prompt_inputs(p)])
        while not seqs.prefill_done:
            logits = seqs.prefill(7)
        chunked.append(np.array(logits))
    assert ran and all(r is None for r in ran)  # the chunks declined the stack calls
    assert np.array_equal(chunked[0].view(np.uint32), chunked[1].view(np.uint32))


# ------------------------------------------------------------------------------ quantization, caches


def test_quantized_kv_caches(store):
    """Every KV layout: 8-bit codes track float32 (top-1 >= 0.9, mean KL < 0.02); coarser
    codes cost more, never less; a rotating window over every layer runs too."""
    art = store.artifact(store.ckpt())
    kit.check_quantized_kv_caches(store.vlm(store.ckpt()), art, layouts=kit.every_layer_is)
    kit.check_rotating_window_runs(art)


def test_quantized_weights(store):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more."""
    kit.check_quantized_weights(store, store.ckpt(), ("vision.",))


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 4}], ids=["dense", "kv4"])
def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store, kv):
    """A second turn over the same image reuses the first's blocks (their DeepStack-added
    keys and values included); another image behind the same ids reuses nothing past it."""
    m = vlmc.load(store.artifact(store.ckpt()), **kv)
    prompts = kit.second_turn_prompts(m)
    hits = kit.run_with_prefix_cache(m, prompts)
    first_image = prompts[2].ids.index(m.image_token_id)
    assert hits[0] == 0 and hits[1] > first_image + sum(prompts[1].images.num_tokens)
    assert hits[2] <= first_image


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests (chunked prefills between decode steps)
    give one-at-a-time outputs; the vision cache serves a repeated image."""
    kit.check_batching_loop_with_images_and_text(store.vlm(store.ckpt()))


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts, and with the model drafting for itself (its
    prompt prefilled from ``embed``'s widened rows), is the output without them."""
    kit.check_speculation_is_lossless(store.vlm(store.ckpt()))


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_an_image_chat(store):
    """`vlmc serve`: an image chat answers what the Python API generates for the same messages."""
    from serve_helpers import LiveServer

    server = LiveServer(str(store.artifact(store.ckpt())))
    try:
        kit.check_serve_answers(server, [store.vlm(store.ckpt())], kit.image_chat())
    finally:
        server.stop()


def test_bench_smoke(store):
    kit.check_bench_smoke(store.artifact(store.ckpt()), "qwen3_vl")


def test_unsupported_model_type_names_the_new_families(store, tmp_path):
    from vlmc.models import supported_model_types

    kit.unsupported_model_type_error(store.ckpt()["path"], tmp_path, "qwen3_vl_moe")
    assert {"qwen3_vl", "idefics3", "smolvlm"} <= set(supported_model_types())


@pytest.mark.parametrize("change,message", [
    (("config.json", {"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}}), "rope type 'yarn'"),
    (("config.json", {"vision_config": {"num_position_embeddings": 15}}), "not a square grid"),
    (("preprocessor_config.json", {"patch_size": 14}), "patch_size 14"),
])
def test_configs_vlmc_cannot_honour_are_refused(store, tmp_path, change, message):
    kit.check_refused(store.ckpt()["path"], tmp_path, change, message)


def test_artifact_runs_without_torch(store, tmp_path):
    """The runtime half imports nothing of torch or transformers: the CLI runs an image
    prompt where importing them fails, and says what the Python API says."""
    kit.check_cli_runs_without_torch(store.vlm(store.ckpt()), store.artifact(store.ckpt()), tmp_path)
