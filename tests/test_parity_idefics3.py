"""Idefics3 and SmolVLM (``idefics3``, ``smolvlm``) against transformers, and everything
else a family must support, on the tiny checkpoints of ``tests/fixtures/idefics3.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' Idefics3Processor /
SmolVLMProcessor (each image spelled out in the text as row/column tiles and a global
image, then tokenized, so newlines merge as the tokenizer merges them), pixels within
1e-5 (every tile, [tiles, 3, T, T] against the processor's [1, tiles, 3, T, T]), float32
logits within 1e-4 at the last prompt position and at each of 16 greedy steps, the 16
greedy tokens identical; for both config layouts, sharded and bfloat16 checkpoints, and
ragged batches. Then: the image processor against transformers' on more sizes and
settings, the tower's bucketed position ids and the pixel-shuffle connector against the
transformers modules, quantized weights and KV caches, the prefix and vision caches, the
batching loop, ``vlmc serve``, ``vlmc bench``, speculative decoding and refused configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLMProcessor needs it

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import idefics3 as i3  # noqa: E402
from test_parity import (CASES, GREEDY_STEPS, IMG, LOGIT_ATOL, PIXEL_ATOL, ForcedSampler, _txt, _user,  # noqa: E402
                         check_outputs, run_vlmc)
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
EXTRA_CASES = {
    "small": ([_user(IMG, _txt("What is this?"))], [(40, 30)]),
    "chat": ([{"role": "system", "content": "Answer briefly."}, _user(_txt("What is the weather today?")),
              {"role": "assistant", "content": [_txt("Sunny with a light wind.")]}, _user(_txt("And tomorrow?"))], []),
}
SEEDS = {"idefics3": 0, "smolvlm": 1}


def _case(name):
    messages, sizes = {**CASES, **EXTRA_CASES}[name]
    return messages, [ck.make_test_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


class Store:
    """Checkpoints built, compiled and loaded once per module; transformers references cached."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpts, self.arts, self.models, self.hf, self.refs = {}, {}, {}, {}, {}

    def ckpt(self, family, **kw):
        kw = {"seed": SEEDS[family], **kw}
        key = (family, tuple(sorted(kw.items())))
        if key not in self.ckpts:
            name = "_".join([family] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            self.ckpts[key] = i3.build_idefics3_checkpoint(self.root / "ckpt" / name, family, **kw)
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
            fam = info["family"]
            if info["path"] not in self.hf:
                self.hf[info["path"]] = (i3.hf_processor(info["path"], fam), i3.hf_model(info["path"], fam))
            proc, model = self.hf[info["path"]]
            messages, images = _case(case)
            self.refs[key] = i3.hf_reference(info["path"], fam, messages, images, greedy_steps=GREEDY_STEPS,
                                             processor=proc, model=model)
        return self.refs[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return Store(tmp_path_factory.mktemp("idefics3"))


def build_prompt(m, case):
    messages, images = _case(case)
    return m.build_prompt(messages=messages, images=images)


def assert_parity(m, ref, case, what):
    p = build_prompt(m, case)
    np.testing.assert_array_equal(np.asarray(p.ids, dtype=np.int64), ref["input_ids"],
                                  err_msg=f"{what}: prompt ids differ from transformers' input_ids")
    if ref["pixel_values"] is None:
        assert p.images is None
    else:
        (theirs,) = ref["pixel_values"]  # [1, tiles, 3, T, T]: one prompt
        assert ref["pixel_attention_mask"].all()  # the tiles of one prompt are never padded
        mine = np.asarray(p.images.pixel_values, dtype=np.float32)
        assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=PIXEL_ATOL)
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, what)


# ------------------------------------------------------------------------------ parity

PARITY = [(f, c) for f in ("idefics3", "smolvlm") for c in CASE_NAMES + ["small", "chat"]]


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{c}" for f, c in PARITY])
def test_parity(store, family, case):
    info = store.ckpt(family)
    assert_parity(store.vlm(info), store.ref(info, case), case, f"{family}/{case}")


def test_images_are_spelled_out_in_the_text(store):
    """The fixture's tokenizer merges newline runs, so the "\\n" after the last tile row and
    the one before the global image are one token: expanding by ids would not give
    transformers' ids. A one-tile image has no row/column tokens."""
    m = store.vlm(store.ckpt("idefics3"))
    tok = m.tokenizer
    assert tok.encode("\n\n") != tok.encode("\n") * 2
    p = build_prompt(m, "wide")
    text = tok.decode(p.ids)
    rows, cols = p.images.grids[0]
    assert (rows, cols) == (2, 3) and "<row_2_col_3>" in text and "<row_3_col_1>" not in text
    assert "\n\n<fake_token_around_image><global-img>" in text
    small = build_prompt(m, "small")  # upscaled to the longest edge like any other image: tiles
    assert small.images.grids == [(3, 3)]
    one = build_prompt(store.vlm(store.ckpt("idefics3", splitting=False)), "small")
    assert one.images.grids == [(0, 0)] and "<row_" not in tok.decode(one.ids)
    assert sum(1 for t in one.ids if t == m.image_token_id) == i3.TILE_TOKENS


LAYOUTS = {"v4_hub": dict(layout="v4"), "v4_sharded": dict(layout="v4", sharded=True),
           "v5_sharded": dict(sharded=True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_checkpoint_layouts(store, family, layout):
    """Same seed, other config layout / shards: the v5 checkpoint's references apply."""
    kw = LAYOUTS[layout]
    base, info = store.ckpt(family), store.ckpt(family, **kw)
    if kw.get("sharded"):
        assert len(info["weight_files"]) == 2 and (Path(info["path"]) / "model.safetensors.index.json").is_file()
    if kw.get("layout") == "v4":
        text = info["config"]["text_config"]
        assert "rope_parameters" not in text and text["rope_theta"] == 100.0
    m = store.vlm(info)
    for case in ("text", "two_images", "multi_turn"):
        assert_parity(m, store.ref(base, case), case, f"{family}/{layout}/{case}")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_bfloat16_checkpoint(store, family):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt(family, dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    for case in ("text", "wide"):
        assert_parity(m32, store.ref(info, case), case, f"{family}/bf16-ckpt/{case}")
        t32, l32 = run_vlmc(m32, [build_prompt(m32, case)])
        _, l16 = run_vlmc(m16, [build_prompt(m16, case)], sampler=ForcedSampler(t32[0]))
        diff = np.abs(l16[0] - l32[0]).max(-1)
        assert np.isfinite(l16).all() and diff.max() < 0.5, f"{case}: {diff.round(3)}"
        top2 = np.sort(l32[0], -1)[:, -2:]
        agree = l16[0].argmax(-1) == t32[0]
        assert agree[top2[:, 1] - top2[:, 0] > 0.25].all()


def test_without_image_splitting(store):
    """do_image_splitting false: every image is one squashed tile, as transformers does it."""
    info = store.ckpt("idefics3", splitting=False)
    m = store.vlm(info)
    for case in ("two_images", "wide"):
        ref = store.ref(info, case)
        assert_parity(m, ref, case, f"idefics3/no-splitting/{case}")
        assert ref["pixel_values"].shape[1] == len(_case(case)[1])


BATCHES = [("two_images", "text"), ("multi_turn", "chat", "one_image"), ("wide", "small")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    info = store.ckpt("smolvlm")
    m = store.vlm(info)
    prompts = [build_prompt(m, c) for c in batch]
    assert len({len(p.ids) for p in prompts}) == len(prompts)
    toks, logits = run_vlmc(m, prompts)
    for i, (case, p) in enumerate(zip(batch, prompts)):
        t1, l1 = run_vlmc(m, [p])
        np.testing.assert_array_equal(toks[i], t1[0], err_msg=f"{case} in batch {batch}")
        assert float(np.abs(logits[i] - l1[0]).max()) <= LOGIT_ATOL
        check_outputs(toks[i], logits[i], store.ref(info, case), f"smolvlm/batch/{case}")


# ------------------------------------------------------------------------------ processor and tower pieces


@pytest.mark.parametrize("settings", [
    {}, {"do_image_splitting": False}, {"size": {"longest_edge": 300}, "resample": 3},
    {"size": {"longest_edge": 100}, "do_resize": False}, {"size": {"longest_edge": 56}},
], ids=["default", "no-splitting", "bicubic-300", "no-resize", "one-tile"])
def test_processor_matches_transformers(settings):
    """Tiles and their pixels equal Idefics3ImageProcessorPil's for many image sizes
    (portrait, landscape, square, smaller and larger than a tile, odd sizes), RGBA and
    greyscale inputs included."""
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from vlmc.models.common.processors import make_image_processor, spec_from_preprocessor_config

    pp = {k: v for k, v in i3.preprocessor_config("idefics3").items() if k not in ("image_processor_type",
                                                                                    "processor_class")}
    pp.update(settings)
    theirs = Idefics3ImageProcessorPil(**pp)
    mine = make_image_processor(spec_from_preprocessor_config(pp, "idefics3", tile_tokens=4))
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (57, 55), (30, 200), (200, 30), (113, 169), (169, 113), (500, 20), (1, 1), (640, 480)]
    for w, h in sizes + [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(6)]:
        img = ck.make_test_image(w, h, seed=w * 7 + h)
        for im in (img, img.convert("RGBA"), img.convert("L")):
            want = theirs(images=[[im]], return_tensors="np", return_row_col_info=True)
            got = mine.process([im])
            assert got.grids == [(want["rows"][0][0], want["cols"][0][0])], (w, h)
            np.testing.assert_allclose(got.pixel_values, want["pixel_values"][0], rtol=0, atol=PIXEL_ATOL)
            assert got.num_tokens == [4 * len(got.pixel_values)]
    from vlmc.errors import InputError
    with pytest.raises(InputError, match="zero size"):
        mine.process([Image.new("RGB", (0, 5))])


def test_bucketed_positions_match_the_vision_embeddings():
    """siglip_tower's position_ids path with the host-planned ids: Idefics3VisionEmbeddings
    (patchify, patch embedding, bucketed position rows) for grid sizes where the buckets are
    the identity and where float rounding moves patches (19, 25, 29), in both op libraries."""
    import transformers as tf
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings
    from vlmc.kernels import cpu_ops, reference
    from vlmc.models.idefics3.inputs import bucket_positions

    for grid in (4, 19, 25, 29, 32):
        cfg = tf.Idefics3VisionConfig(hidden_size=8, num_attention_heads=2, image_size=grid * 2, patch_size=2)
        emb = Idefics3VisionEmbeddings(cfg).eval()
        px = torch.randn(2, 3, grid * 2, grid * 2, generator=torch.Generator().manual_seed(grid))
        with torch.no_grad():
            want = emb(px, torch.ones(2, grid, grid, dtype=torch.bool)).numpy()
        ids = bucket_positions(grid, grid)
        assert (grid in (19, 25, 29)) == (not np.array_equal(ids, np.arange(grid * grid)))
        w = mx.array(emb.patch_embedding.weight.detach().numpy().reshape(8, -1))
        b = mx.array(emb.patch_embedding.bias.detach().numpy())
        table = mx.array(emb.position_embedding.weight.detach().numpy())
        for ops in (reference, cpu_ops):
            x = ops.linear(ops.patchify(mx.array(px.numpy()), patch=2), w, b)
            x = ops.add(x, ops.take(table, mx.array(ids), axis=0))
            np.testing.assert_allclose(np.asarray(ops.result(x)), want, rtol=0, atol=1e-5)


def test_connector_matches_transformers(store):
    """The pixel shuffle (reshape/transpose ops) and projection of the compiled program:
    Idefics3Connector on the tower's output, through the artifact's own vision_encode."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    info = store.ckpt("idefics3")
    model = store.hf.get(info["path"], (None, None))[1] or i3.hf_model(info["path"], "idefics3")
    m = store.vlm(info)
    p = build_prompt(m, "one_image")
    px = torch.from_numpy(p.images.pixel_values)
    with torch.no_grad():
        hidden = model.model.vision_model(px).last_hidden_state
        want = model.model.connector(hidden).reshape(-1, i3.TEXT_HIDDEN).numpy()
    assert isinstance(model.model.connector, Idefics3Connector)
    got = np.array(m.encode_images(p.images))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------ quantization, caches


def _quality_prompts(m):
    return [m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=10)]),
            m.build_prompt("Tell me a short story about the river.")]


def test_quantized_kv_caches(store):
    """Every KV layout: 8-bit codes track float32 (top-1 >= 0.9, mean KL < 0.02); coarser
    codes cost more, never less; the cpu decode_layer fast path serves the Llama layers."""
    from vlmc.quality import compare

    info = store.ckpt("smolvlm")
    art = store.artifact(info)
    assert "decode_layer" in (art / "model.py").read_text()
    base = store.vlm(info)
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
    rot = vlmc.load(art, max_kv_size=24)
    assert all(L["kv"]["layout"] == "rotating" for L in rot.kv_layers)
    assert rot.generate("Tell me a short story about the river. " * 3, max_tokens=8).generation_tokens == 8


def test_quantized_weights(store):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more."""
    from vlmc.quality import compare

    info = store.ckpt("idefics3")
    base = store.vlm(info)
    prompts = _quality_prompts(base)
    q8 = compare(base, store.vlm(info, quantize="q8"), prompts, steps=16)
    q4 = compare(base, store.vlm(info, quantize="q4"), prompts, steps=16)
    assert q8.top1_agreement >= 0.9 and q8.mean_kl < 0.02, q8
    assert q8.mean_kl < q4.mean_kl < 1.5, q4
    manifest = json.loads((store.artifact(info, quantize="q4") / "manifest.json").read_text())
    assert any(k.startswith("text.layers.0.") for k in manifest["quantized"])
    assert any(k.startswith(("vision.", "projector.")) for k in manifest["quantized"])


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


def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store):
    """A second turn over the same image reuses the first's blocks (the whole tiled image
    sequence); another image behind the same ids reuses nothing past its first tile."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    m = store.vlm(store.ckpt("idefics3"))
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
    ids = prompts[1].ids
    last_image = len(ids) - ids[::-1].index(m.image_token_id)
    assert hits[0] == 0 and hits[1] >= last_image and hits[2] <= ids.index(m.image_token_id)


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests give one-at-a-time outputs; the vision
    cache serves a repeated image (all its tiles)."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.vision_cache import VisionFeatureCache

    m = store.vlm(store.ckpt("smolvlm"))
    a, b = ck.make_test_image(100, 70, seed=10), ck.make_test_image(40, 30, seed=11)
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
    for p, toks in zip(prompts[:2], alone):
        t, _ = run_vlmc(m, [p], steps=len(toks))
        assert t[0].tolist() == toks


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts (and with the model drafting for itself) is
    the output without them."""
    m = store.vlm(store.ckpt("idefics3"))
    image = ck.make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        plain = m.generate(max_tokens=24, **case)
        for draft in ("prompt-lookup", m):
            assert m.generate(max_tokens=24, draft=draft, **case).token_ids == plain.token_ids, (draft, case)


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_image_chats(store):
    """Both model types behind one `vlmc serve`: an image chat answers what the Python API
    generates for the same messages."""
    import io

    from serve_helpers import LiveServer, data_uri, image_message

    infos = [store.ckpt(f) for f in ("idefics3", "smolvlm")]
    buf = io.BytesIO()
    ck.make_test_image(100, 70, seed=10).save(buf, format="PNG")
    messages = image_message("Describe the picture.", data_uri(buf.getvalue()))
    server = LiveServer(*(str(store.artifact(i)) for i in infos))
    try:
        ids = [m["id"] for m in json.loads(server.get("/v1/models")[2])["data"]]
        assert len(ids) == 2
        for info, model_id in zip(infos, ids):
            status, body = server.post("/v1/chat/completions", {"model": model_id, "messages": messages,
                                                                 "temperature": 0, "max_tokens": 8})
            assert status == 200, body
            want = store.vlm(info).generate(messages=messages, max_tokens=8, temperature=0)
            # (the server trims the reply's outer whitespace: " The ..." here)
            assert body["choices"][0]["message"]["content"] == want.text.strip()
            assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_bench_smoke(store, family):
    from vlmc.bench import bench, format_report

    r = bench(str(store.artifact(store.ckpt(family))), prompt_lengths=[8], decode_tokens=4, image_size=64, runs=1)
    assert r["family"] == "idefics3" and r["decode"]["decode_tps"] > 0 and "image" in r
    assert "idefics3" in format_report(r)


@pytest.mark.parametrize("change,message", [
    (("preprocessor_config.json", {"max_image_size": {"longest_edge": 112}}), "max_image_size 112"),
    (("preprocessor_config.json", {"size": {"height": 10, "width": 10}}), "longest_edge"),
    (("config.json", {"scale_factor": 3}), "scale_factor 3"),
    (("config.json", {"vision_config": {"model_type": "siglip_vision_model"}}), "'siglip_vision_model' is not supported"),
    (("config.json", {"text_config": {"model_type": "gpt2"}}), "'gpt2' is not supported"),
])
def test_configs_vlmc_cannot_honour_are_refused(store, tmp_path, change, message):
    import shutil

    from vlmc.errors import VlmcError

    src = tmp_path / "ck"
    shutil.copytree(store.ckpt("idefics3")["path"], src)
    name, patch = change
    cfg = json.loads((src / name).read_text())
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "size" else value
    (src / name).write_text(json.dumps(cfg))
    with pytest.raises(VlmcError, match=message):
        vlmc_compile(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_literal_image_tokens_in_text_are_refused(store):
    from vlmc.errors import InputError

    m = store.vlm(store.ckpt("idefics3"))
    img = ck.make_test_image(64, 64, seed=3)
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("<image> what is this?", images=[img])
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("<image> what is this?")
