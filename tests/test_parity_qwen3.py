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

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_vl as q3  # noqa: E402
from test_parity import (CASES, GREEDY_STEPS, IMG, LOGIT_ATOL, ForcedSampler, _txt, _user,  # noqa: E402
                         check_inputs, check_outputs, run_vlmc)
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
EXTRA_CASES = {
    "thinking_history": ([{"role": "system", "content": "Answer briefly."},
                          _user(IMG, _txt("What is in the image?")),
                          {"role": "assistant", "content": "<think>\nA square, a circle.\n</think>\n\nTwo shapes."},
                          _user(_txt("Which is larger?"))], [(120, 90)]),
}


def _case(name):
    messages, sizes = {**CASES, **EXTRA_CASES}[name]
    return messages, [ck.make_test_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


class Store:
    """Checkpoints built, compiled and loaded once per module; transformers references cached."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpts, self.arts, self.models, self.hf, self.refs = {}, {}, {}, {}, {}

    def ckpt(self, **kw):
        key = tuple(sorted(kw.items()))
        if key not in self.ckpts:
            name = "_".join(["qwen3"] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            self.ckpts[key] = q3.build_qwen3_checkpoint(self.root / "ckpt" / name, **kw)
        return self.ckpts[key]

    def artifact(self, info, **kw):
        kw = {"target": "cpu", **kw}
        key = (info["path"], tuple(sorted(kw.items())))
        if key not in self.arts:
            tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            self.arts[key] = vlmc_compile(info["path"], self.root / "art" / f"{Path(info['path']).name}-{tag}", **kw)
        return self.arts[key]

    def vlm(self, info, **kw):
        art = self.artifact(info, **kw)
        if art not in self.models:
            self.models[art] = vlmc.load(art)
        return self.models[art]

    def ref(self, info, case):
        key = (info["path"], case)
        if key not in self.refs:
            if info["path"] not in self.hf:
                self.hf[info["path"]] = (q3.hf_processor(info["path"]), q3.hf_model(info["path"]))
            proc, model = self.hf[info["path"]]
            messages, images = _case(case)
            self.refs[key] = q3.hf_reference(info["path"], messages, images, greedy_steps=GREEDY_STEPS,
                                             processor=proc, model=model)
        return self.refs[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return Store(tmp_path_factory.mktemp("qwen3"))


def build_prompt(m, case):
    messages, images = _case(case)
    return m.build_prompt(messages=messages, images=images)


def assert_parity(m, ref, case, what):
    p = build_prompt(m, case)
    check_inputs(p, ref, "qwen3_vl")
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, what)


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


LAYOUTS = {"v4_hub": dict(layout="v4"), "v4_sharded": dict(layout="v4", sharded=True),
           "v5_sharded": dict(sharded=True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_layouts(store, layout):
    """Same seed, other config layout / shards: the v5 checkpoint's references apply."""
    kw = LAYOUTS[layout]
    base, info = store.ckpt(), store.ckpt(**kw)
    if kw.get("sharded"):
        assert len(info["weight_files"]) == 2 and (Path(info["path"]) / "model.safetensors.index.json").is_file()
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
        t32, l32 = run_vlmc(m32, [build_prompt(m32, case)])
        _, l16 = run_vlmc(m16, [build_prompt(m16, case)], sampler=ForcedSampler(t32[0]))
        diff = np.abs(l16[0] - l32[0]).max(-1)
        assert np.isfinite(l16).all() and diff.max() < 0.5, f"{case}: {diff.round(3)}"
        top2 = np.sort(l32[0], -1)[:, -2:]
        agree = l16[0].argmax(-1) == t32[0]
        assert agree[top2[:, 1] - top2[:, 0] > 0.25].all()


BATCHES = [("two_images", "text"), ("multi_turn", "text", "one_image"), ("wide", "tall")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    """Ragged batches of image and text prompts (left padding; text rows' DeepStack blocks are zeros)."""
    info = store.ckpt()
    m = store.vlm(info)
    prompts = [build_prompt(m, c) for c in batch]
    assert len({len(p.ids) for p in prompts}) == len(prompts)
    toks, logits = run_vlmc(m, prompts)
    for i, (case, p) in enumerate(zip(batch, prompts)):
        t1, l1 = run_vlmc(m, [p])
        np.testing.assert_array_equal(toks[i], t1[0], err_msg=f"{case} in batch {batch}")
        assert float(np.abs(logits[i] - l1[0]).max()) <= LOGIT_ATOL
        check_outputs(toks[i], logits[i], store.ref(info, case), f"qwen3_vl/batch/{case}")


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


# ------------------------------------------------------------------------------ quantization, caches


def _quality_prompts(m):
    return [m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=10)]),
            m.build_prompt("Tell me a short story about the river.")]


def test_quantized_kv_caches(store):
    """Every KV layout: 8-bit codes track float32 (top-1 >= 0.9, mean KL < 0.02); coarser
    codes cost more, never less."""
    from vlmc.quality import compare

    art = store.artifact(store.ckpt())
    base = store.vlm(store.ckpt())
    prompts = _quality_prompts(base)
    kls = []
    for kw in ({"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}):
        m = vlmc.load(art, **kw, kv_quantize_last=True)
        want = "turboquant" if "kv_quant_scheme" in kw else "quantized"
        assert [L["kv"]["layout"] for L in m.kv_layers] == [want] * len(m.kv_layers)
        report = compare(base, m, prompts, steps=16)
        kls.append(report.mean_kl)
        if kw["kv_bits"] == 8:
            assert report.top1_agreement >= 0.9 and report.mean_kl < 0.02, report
        assert report.mean_kl < 1.5, (kw, report)
    assert kls == sorted(kls), kls
    rot = vlmc.load(art, max_kv_size=24)  # a rotating window over every layer runs too
    assert all(L["kv"]["layout"] == "rotating" for L in rot.kv_layers)
    assert rot.generate("Tell me a short story about the river. " * 3, max_tokens=8).generation_tokens == 8


def test_quantized_weights(store):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more."""
    from vlmc.quality import compare

    info = store.ckpt()
    base = store.vlm(info)
    prompts = _quality_prompts(base)
    q8 = compare(base, store.vlm(info, quantize="q8"), prompts, steps=16)
    q4 = compare(base, store.vlm(info, quantize="q4"), prompts, steps=16)
    assert q8.top1_agreement >= 0.9 and q8.mean_kl < 0.02, q8
    assert q8.mean_kl < q4.mean_kl < 1.5, q4
    manifest = json.loads((store.artifact(info, quantize="q4") / "manifest.json").read_text())
    assert any(k.startswith("text.layers.0.") for k in manifest["quantized"])
    assert any(k.startswith("vision.") for k in manifest["quantized"])


def _run_jobs(batcher, jobs, timeout=180):
    import threading

    from vlmc.runtime.batcher import Job, TokenEvent

    tokens, finish, done = [[] for _ in jobs], [None] * len(jobs), threading.Event()

    def emit(i):
        def on_event(ev):
            if isinstance(ev, TokenEvent):
                tokens[i].append(ev.token)
            else:
                finish[i] = ev
                if all(f is not None for f in finish):
                    done.set()
        return on_event

    for i, kw in enumerate(jobs):
        batcher.submit(Job(emit=emit(i), **kw))
    assert done.wait(timeout), "jobs did not finish"
    return tokens, finish


def _turn(m, image, question):
    return m.build_prompt(messages=[
        _user(IMG, _txt("What is in the image?")),
        {"role": "assistant", "content": [_txt("A red square and a blue circle.")]},
        _user(_txt(question))], images=[image])


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 4}], ids=["dense", "kv4"])
def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store, kv):
    """A second turn over the same image reuses the first's blocks (their DeepStack-added
    keys and values included); another image behind the same ids reuses nothing past it."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    m = vlmc.load(store.artifact(store.ckpt()), **kv)
    one, two = ck.make_test_image(120, 90, seed=10), ck.make_test_image(120, 90, seed=11)
    prompts = [_turn(m, one, "How many shapes are there?"), _turn(m, one, "Describe the image."),
               _turn(m, two, "Describe the image.")]
    plain, cached = Batcher(m), Batcher(m, prefix_cache=PrefixCache(block_size=8))
    try:
        ref = [_run_jobs(plain, [dict(prompt=p, max_tokens=12)])[0] for p in prompts]
        got = [_run_jobs(cached, [dict(prompt=p, max_tokens=12)]) for p in prompts]
    finally:
        plain.shutdown()
        cached.shutdown()
    assert [g[0] for g in got] == ref
    hits = [g[1][0].cached_tokens for g in got]
    first_image = prompts[2].ids.index(m.image_token_id)
    assert hits[0] == 0 and hits[1] > first_image + sum(prompts[1].images.num_tokens)
    assert hits[2] <= first_image


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests (chunked prefills between decode steps)
    give one-at-a-time outputs; the vision cache serves a repeated image."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.vision_cache import VisionFeatureCache

    m = store.vlm(store.ckpt())
    a, b = ck.make_test_image(100, 70, seed=10), ck.make_test_image(64, 64, seed=11)
    prompts = [m.build_prompt("Describe the picture.", images=[a]), m.build_prompt("Tell me about shapes"),
               m.build_prompt("What is on the left side?", images=[b]), m.build_prompt("Compare them.", images=[a, b]),
               m.build_prompt("circle square " * 20)]
    jobs = [dict(prompt=p, max_tokens=6 + 3 * i) for i, p in enumerate(prompts)]
    vision = VisionFeatureCache()
    batcher = Batcher(m, max_batch=8, prefill_chunk=16, vision_cache=vision)
    try:
        alone = [_run_jobs(batcher, [j])[0][0] for j in jobs]
        together, _ = _run_jobs(batcher, jobs * 2)
    finally:
        batcher.shutdown()
    assert together == alone * 2
    assert batcher.counters["decode_steps"] < batcher.counters["batched_tokens"]
    assert vision.hits >= 4 and vision.misses == 2
    for p, toks in zip(prompts[:2], alone):  # and the engine's own step loop agrees
        t, _ = run_vlmc(m, [p], steps=len(toks))
        assert t[0].tolist() == toks


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts, and with the model drafting for itself (its
    prompt prefilled from ``embed``'s widened rows), is the output without them."""
    m = store.vlm(store.ckpt())
    image = ck.make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        plain = m.generate(max_tokens=24, **case)
        for draft in ("prompt-lookup", m):
            assert m.generate(max_tokens=24, draft=draft, **case).token_ids == plain.token_ids, (draft, case)


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_an_image_chat(store):
    """`vlmc serve`: an image chat answers what the Python API generates for the same messages."""
    import io

    from serve_helpers import LiveServer, data_uri, image_message

    art = store.artifact(store.ckpt())
    buf = io.BytesIO()
    ck.make_test_image(100, 70, seed=10).save(buf, format="PNG")
    messages = image_message("Describe the picture.", data_uri(buf.getvalue()))
    server = LiveServer(str(art))
    try:
        model_id = json.loads(server.get("/v1/models")[2])["data"][0]["id"]
        status, body = server.post("/v1/chat/completions", {"model": model_id, "messages": messages,
                                                             "temperature": 0, "max_tokens": 8})
        assert status == 200, body
        want = store.vlm(store.ckpt()).generate(messages=messages, max_tokens=8, temperature=0)
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    finally:
        server.stop()


def test_bench_smoke(store):
    from vlmc.bench import bench, format_report

    r = bench(str(store.artifact(store.ckpt())), prompt_lengths=[8], decode_tokens=4, image_size=64, runs=1)
    assert r["family"] == "qwen3_vl" and r["decode"]["decode_tps"] > 0 and "image" in r
    assert "qwen3_vl" in format_report(r)


def test_unsupported_model_type_names_the_new_families(store, tmp_path):
    import shutil

    from vlmc.errors import UnsupportedModelError
    from vlmc.models import supported_model_types

    src = tmp_path / "other"
    shutil.copytree(store.ckpt()["path"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_vl_moe"}))
    with pytest.raises(UnsupportedModelError) as err:
        vlmc_compile(src, tmp_path / "out")
    line = str(err.value)
    assert "\n" not in line and "'qwen3_vl_moe' is not supported" in line
    assert ", ".join(supported_model_types()) in line
    assert {"qwen3_vl", "idefics3", "smolvlm"} <= set(supported_model_types())


@pytest.mark.parametrize("change,message", [
    (("config.json", {"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}}), "rope type 'yarn'"),
    (("config.json", {"vision_config": {"num_position_embeddings": 15}}), "not a square grid"),
    (("preprocessor_config.json", {"patch_size": 14}), "patch_size 14"),
])
def test_configs_vlmc_cannot_honour_are_refused(store, tmp_path, change, message):
    import shutil

    from vlmc.errors import VlmcError

    src = tmp_path / "ck"
    shutil.copytree(store.ckpt()["path"], src)
    name, patch = change
    cfg = json.loads((src / name).read_text())
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (src / name).write_text(json.dumps(cfg))
    with pytest.raises(VlmcError, match=message):
        vlmc_compile(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_artifact_runs_without_torch(store, tmp_path):
    """The runtime half imports nothing of torch or transformers: the CLI runs an image
    prompt where importing them fails, and says what the Python API says."""
    import os
    import subprocess
    import sys
    import textwrap

    from test_parity import _BLOCKER, REPO_ROOT

    art = store.artifact(store.ckpt())
    img = tmp_path / "img.png"
    ck.make_test_image(100, 70, seed=3).save(img)
    expect = store.vlm(store.ckpt()).generate("hi", images=[str(img)], max_tokens=4)
    cli = _BLOCKER + textwrap.dedent(f"""
        import runpy
        sys.argv = ["vlmc", "run", {str(art)!r}, "-p", "hi", "-i", {str(img)!r}, "--max-tokens", "4"]
        try:
            runpy.run_module("vlmc.cli", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "blocked import" not in r.stderr, r.stderr
    assert r.stdout == expect.text + "\n"
